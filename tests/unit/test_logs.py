"""crowdd.logs: journal priorities on stderr under systemd, the rotating file, ``crowdd logs [-f]``."""

from __future__ import annotations

import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


def _journal_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_syslog_priorities() -> None:
    assert [logs.syslog_priority(lv) for lv in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]


def test_under_journal_only_when_the_variable_names_this_very_stream(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with a.open("w") as fa, b.open("w") as fb:
        env = _journal_env(a)
        assert logs.under_journal(fa, env)
        assert not logs.under_journal(fb, env)  # a child that redirected its stderr
        for bad in ("", "1", "x:y", "1:", ":2", "1:2:3"):
            assert not logs.under_journal(fa, {"JOURNAL_STREAM": bad}), bad
        assert not logs.under_journal(fa, {})


def test_under_the_journal_every_line_carries_its_priority(tmp_path: Path, restore_root: None) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        logs.configure(logging.DEBUG, stream=stream, env=_journal_env(out))
        log = logging.getLogger("crowdd.test")
        log.info("hello")
        log.warning("careful")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke")
        log.debug("detail")
    lines = out.read_text().splitlines()
    assert lines[0] == "<6>crowdd.test: hello"
    assert lines[1] == "<4>crowdd.test: careful"
    assert lines[2] == "<3>crowdd.test: it broke"
    # the traceback's lines keep the record's priority (journald splits at newlines)
    assert all(line.startswith("<3>") for line in lines[3:-1]) and "ValueError: boom" in lines[-2]
    assert lines[-1] == "<7>crowdd.test: detail"


def test_outside_the_journal_plain_lines_with_time(tmp_path: Path, restore_root: None) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        logs.configure(logging.INFO, stream=stream, env={})
        logging.getLogger("crowdd.test").info("hello")
    line = out.read_text().strip()
    assert not line.startswith("<") and line.endswith(" INFO crowdd.test: hello")


def test_the_log_directory_gets_a_rotating_file(tmp_path: Path, restore_root: None) -> None:
    with (tmp_path / "stderr").open("w") as stream:
        logs.configure(logging.INFO, log_dir=tmp_path / "log", stream=stream, env={})
        logging.getLogger("crowdd.test").info("to the file")
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.handlers.RotatingFileHandler)]
        assert len(files) == 1
        assert (files[0].maxBytes, files[0].backupCount) == (logs.MAX_BYTES, logs.BACKUPS)
        assert "INFO crowdd.test: to the file" in (tmp_path / "log" / logs.LOG_FILE).read_text()
        # configuring again replaces crowdd's own handlers, and only those
        logs.configure(logging.INFO, log_dir=tmp_path / "log", stream=stream, env={})
        ours = [h for h in logging.getLogger().handlers if getattr(h, "_crowdd_handler", False)]
        assert len(ours) == 2


def test_an_unwritable_log_directory_is_said_and_skipped(tmp_path: Path, restore_root: None) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        logs.configure(logging.INFO, log_dir=blocker, stream=stream, env={})
        logging.getLogger("crowdd.test").info("still logging")
    text = out.read_text()
    assert f"not logging to {blocker / logs.LOG_FILE}" in text
    assert "still logging" in text


def test_tail(tmp_path: Path) -> None:
    f = tmp_path / "x.log"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    assert logs.tail(f, 3) == ["line 97\n", "line 98\n", "line 99\n"]
    assert logs.tail(f, 0) == []
    assert len(logs.tail(f, 1000)) == 100


def test_follow_reads_across_rotation_and_truncation(tmp_path: Path) -> None:
    f = tmp_path / "x.log"
    f.write_text("old\n")
    seen: list[str] = []
    steps = iter([
        lambda: f.open("a").write("one\ntw"),
        lambda: f.open("a").write("o\n"),
        lambda: (f.rename(tmp_path / "x.log.1"), (tmp_path / "x.log.1").open("a").write("late\n"),
                 f.write_text("three\n")),
        lambda: f.write_text("4\n"),  # truncated and rewritten in place
    ])
    done = False

    def sleep(_: float) -> None:
        nonlocal done
        try:
            next(steps)()
        except StopIteration:
            done = True

    for line in logs.follow(f, should_stop=lambda: done, sleep=sleep):
        seen.append(line)
    assert seen == ["one\n", "two\n", "late\n", "three\n", "4\n"]


# --------------------------------------------------------------------------- the command


def crowdd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crowdd", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_crowdd_logs_shows_the_last_lines(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / logs.LOG_FILE).write_text("".join(f"line {i}\n" for i in range(80)))
    r = crowdd("logs", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"line {i}" for i in range(30, 80)]
    r = crowdd("logs", "--root", str(tmp_path), "-n", "2")
    assert r.stdout == "line 78\nline 79\n"


def test_crowdd_logs_bad_input_and_no_log(tmp_path: Path) -> None:
    r = crowdd("logs", "--root", str(tmp_path), "-n", "-1")
    assert r.returncode == 2 and "-n: expected 0 or more lines, got -1" in r.stderr
    r = crowdd("logs", "--root", str(tmp_path))
    assert r.returncode == 1
    assert f"{tmp_path / 'log' / logs.LOG_FILE}: no log yet" in r.stderr and "journalctl -u crowdd" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user cannot read")
def test_crowdd_logs_says_permission_denied(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    f = tmp_path / "log" / logs.LOG_FILE
    f.write_text("secret\n")
    os.chown(f, 65534, 65534)  # nobody's, and only nobody's
    f.chmod(0o600)
    # root without a capability (an empty bounding set: none at exec): this checkout stays
    # readable wherever it lives, the log does not
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m",
                        "crowdd", "logs", "--root", str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": "/nonexistent"}, check=False)
    assert r.returncode == 1 and "permission denied" in r.stderr, r.stderr
    control = subprocess.run([sys.executable, "-m", "crowdd", "logs", "--root", str(tmp_path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert control.returncode == 0 and "secret" in control.stdout, control.stderr  # with its capabilities: read


def test_crowdd_logs_follow(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    f = log_dir / logs.LOG_FILE
    f.write_text("before\n")
    proc = subprocess.Popen([sys.executable, "-m", "crowdd", "logs", "--root", str(tmp_path), "-f", "-n", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None

        def next_line() -> str:
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, "crowdd logs -f printed nothing"
            return proc.stdout.readline()  # type: ignore[union-attr]

        assert next_line() == "before\n"
        with f.open("a") as fh:
            fh.write("after\n")
        assert next_line() == "after\n"
        f.rename(log_dir / (logs.LOG_FILE + ".1"))
        time.sleep(0.3)
        f.write_text("rotated\n")
        assert next_line() == "rotated\n"
    finally:
        proc.send_signal(2)
        try:
            rc = proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()
    assert rc == 0 and "Traceback" not in err, err
