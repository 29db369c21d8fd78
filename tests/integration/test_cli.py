"""The CLI against a real daemon process, and without one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crowdd.cli.main import build_parser
from crowdd.cli.commands import EXIT_NO_DAEMON, job_from_args
from crowdd.cli.demo import permissive_idle_table
from crowdd.node.ports import free_port
from crowdd.hyperparams import HyperparamError
from crowdd.platform.process import kill_group as stop_group

pytestmark = pytest.mark.timeout(120)


def crowdd(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crowdd", *args, "--root", str(root)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    root = tmp_path / "node"
    root.mkdir()
    (root / "crowdd.toml").write_text('[daemon]\nlisten_host = "127.0.0.1"\nretry_min = 0.2\nretry_max = 1.0\n'
                                      + permissive_idle_table())
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        sock = root / "run" / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (root / "daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        yield root, proc
    finally:
        stop_group(proc, 15.0)
        log.close()


def wait_state(root: Path, state: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(crowdd("status", "--json", root=root).stdout)
        if st["state"] == state or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def test_no_daemon_says_so_plainly(tmp_path: Path) -> None:
    for cmd in (["status"], ["status", "--json"], ["donate", "on"], ["stop"], ["reload"], ["pause", "2h"], ["resume"]):
        r = crowdd(*cmd, root=tmp_path)
        assert r.returncode == EXIT_NO_DAEMON, (cmd, r.stderr)
        assert "no crowdd daemon is running" in r.stderr
        assert "start it with `crowdd daemon`" in r.stderr
        assert "Traceback" not in r.stderr


def test_cli_against_a_real_daemon(
    daemon: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, proc = daemon
    r = crowdd("status", root=root)
    assert r.returncode == 0
    assert "off" in r.stdout and "donation:  off" in r.stdout

    r = crowdd("donate", "on", root=root)
    assert r.returncode == 0 and "donation is on" in r.stdout
    st = wait_state(root, "registering")  # the matchmaker is down: it keeps trying
    assert st["donating"] is True and st["role"] == "worker"
    assert crowdd("donate", "off", root=root).returncode == 0
    assert wait_state(root, "off")["donating"] is False

    data = tmp_path / "data.npz"
    data.write_bytes(b"not really")
    bad = crowdd("host", str(data), "--lr", "0", root=root)
    assert bad.returncode == 2 and "--lr" in bad.stderr
    bad = crowdd("host", str(data), "--hidden", "10,x", root=root)
    assert bad.returncode == 2 and "--hidden" in bad.stderr
    bad = crowdd("host", str(tmp_path / "nope.npz"), root=root)
    assert bad.returncode == 2 and "no such file" in bad.stderr
    bad = crowdd("host", str(data), "--test-fraction", "1.5", root=root)
    assert bad.returncode == 2 and "--test-fraction" in bad.stderr
    named = tmp_path / "named.csv"
    named.write_text("a,b,kind\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(20)))
    bad = crowdd("host", str(named), "--label", "class", root=root)
    assert bad.returncode == 2 and "no column named 'class' (the columns: a, b, kind)" in bad.stderr, bad.stderr
    bad = crowdd("host", str(named), "--label", "kind", "--model-file", str(tmp_path / "none.keras"), root=root)
    assert bad.returncode == 2 and "--model-file" in bad.stderr
    bad = crowdd("host", str(named), "--workers", "0", root=root)
    assert bad.returncode == 2 and "--workers: must be at least 1" in bad.stderr

    monkeypatch.chdir(tmp_path)  # a relative dataset path is made absolute by the CLI
    r = crowdd("host", "data.npz", "--epochs", "2", "--workers", "1", root=root)
    # not a real dataset: `crowdd host` waits for the daemon's verdict and fails with it
    assert r.returncode == 2 and "cannot host" in r.stderr and str(data) in r.stderr, r.stderr
    st = wait_state(root, "off")
    assert st["role"] is None

    r = crowdd("stop", root=root)
    assert r.returncode == 0 and "stopping" in r.stdout
    assert crowdd("reload", root=root).returncode == 0

    (root / "crowdd.toml").write_text("[daemon]\nheartbeat = -1\n")
    r = crowdd("reload", root=root)
    assert r.returncode == 2 and "daemon.heartbeat" in r.stderr
    assert proc.poll() is None  # a bad config never takes the daemon down
    assert crowdd("status", root=root).returncode == 0  # a client needs no settings
    (root / "crowdd.toml").write_text("")

    second = subprocess.run(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode == 1 and "already listening" in second.stderr

    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert not (root / "run" / "control.sock").exists()


def test_pause_and_resume_from_the_cli(daemon: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """`crowdd pause 2h` holds donation back until a time status shows; bad input is refused with
    exit 2 and loses nothing; the pause survives a restart of the daemon; `crowdd resume` ends it."""
    root, proc = daemon
    assert crowdd("donate", "on", root=root).returncode == 0
    wait_state(root, "registering")  # the matchmaker is down: it keeps trying
    before = time.time()
    r = crowdd("pause", "2h", root=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("paused until ") and ("(1 h 59 min left)" in r.stdout or "(2 h left)" in r.stdout)
    st = wait_state(root, "standby")  # it left the registration at once
    until = st["idle"]["paused_until"]  # type: ignore[index]
    assert before + 7200 - 5 <= until <= time.time() + 7200
    assert st["idle"]["rule"] == "paused"  # type: ignore[index]
    human = crowdd("status", root=root).stdout
    same_day = time.localtime(until)[:3] == time.localtime()[:3]  # past midnight it names the day
    when = time.strftime("%H:%M" if same_day else "%a %H:%M", time.localtime(until))
    assert f"  pause:     paused until {when} (1 h 59 min left); `crowdd resume` ends it" in human, human

    for bad, why in ((["2x"], "expected a duration like 2h"), (["0"], "more than 0"),
                     (["-1h"], "unrecognized arguments: -1h"),
                     (["400d"], "at most a year"), (["1h30"], "expected a duration")):
        r = crowdd("pause", *bad, root=root)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    r = subprocess.run([sys.executable, "-m", "crowdd", "pause", "--root", str(root), "--", "-1h"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "crowdd pause: expected a duration like 2h" in r.stderr, r.stderr
    st = json.loads(crowdd("status", "--json", root=root).stdout)
    assert st["idle"]["paused_until"] == until  # nothing lost

    os.killpg(proc.pid, signal.SIGTERM)  # a restart keeps the pause (state/daemon.json)
    assert proc.wait(timeout=15) == 0
    log = open(root / "daemon2.log", "wb")  # noqa: SIM115 - closed below
    again = subprocess.Popen(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (root / "run" / "control.sock").exists():
            assert again.poll() is None and time.monotonic() < deadline, (root / "daemon2.log").read_text()
            time.sleep(0.05)
        st = wait_state(root, "standby")
        assert st["donating"] is True and st["idle"]["paused_until"] == pytest.approx(until, abs=1.0)  # type: ignore[index]
        assert st["idle"]["rule"] == "paused"  # type: ignore[index]

        r = crowdd("resume", root=root)
        assert r.returncode == 0 and "pause ended" in r.stdout, r.stderr
        st = wait_state(root, "registering", timeout=5)  # at once, not after the 30 s policy interval
        assert st["state"] == "registering" and st["idle"]["paused_until"] is None  # type: ignore[index]
        r = crowdd("resume", root=root)
        assert r.returncode == 0 and "not paused" in r.stdout
        assert "paused until" not in crowdd("status", root=root).stdout
    finally:
        stop_group(again, 15.0)
        log.close()


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["host", "d.npz", *argv])


def test_host_collects_only_given_flags() -> None:
    assert job_from_args(_args()) == {}
    job = job_from_args(_args("--lr", "0.3", "--batch", "50", "--hidden", "128,64", "--sharding", "overlap",
                              "--workers", "3", "--min-workers", "2", "--wait", "5"))
    assert job == {"learning_rate": 0.3, "batch_size": 50, "hidden": [128, 64], "sharding": "overlap",
                   "workers": 3, "min_workers": 2, "wait": 5.0}
    with pytest.raises(HyperparamError) as err:
        job_from_args(_args("--workers", "2", "--min-workers", "3"))
    assert err.value.field == "--min-workers"
    with pytest.raises(HyperparamError) as err:
        job_from_args(_args("--epochs", "0"))
    assert err.value.field == "--epochs"
    with pytest.raises(HyperparamError) as err:
        job_from_args(_args("--workers", "0"))
    assert err.value.field == "--workers" and "at least 1" in err.value.message


def test_human_status_shows_everything() -> None:
    import io

    from crowdd.cli.commands import format_status

    st = {
        "version": "0.1.0", "state": "training", "donating": True, "role": "worker",
        "idle": {"allowed": True, "rule": None, "reason": "idle policy off: always donate"},
        "queue": None,
        "group": {"id": "3f2c9a1e7b6d4c08", "index": 1, "members": [
            {"index": 0, "name": "alice", "address": "192.0.2.10", "role": "host", "state": "training",
             "replication": {"done": 100, "total": 100}},
            {"index": 1, "name": "bob", "address": "192.0.2.11", "role": "worker", "state": "training",
             "replication": {"done": 50, "total": 100}}]},
        "job": {"model": "mlp", "hidden": [100], "optimizer": "sgd", "learning_rate": 0.5, "batch_size": 100,
                "epochs": 2, "sharding": "full"},
        "dataset": {"name": "fashion-mnist", "size": 54880000, "digest": "ab" * 32},
        "training": {"epoch": 1, "epochs": 2, "step": 120, "loss": 0.31, "accuracy": 0.9, "test_accuracy": None,
                     "samples_per_sec": 1234.5},
        "result": {"test_accuracy": 0.8761, "model_path": "/var/lib/crowdd/jobs/x/output/model.keras"},
        "error": "the host went away",
    }
    out = io.StringIO()
    format_status(st, out)
    text = out.getvalue()
    for needle in ("training as worker", "donation:  on", "fashion-mnist (54,880,000 bytes", "mlp 100 sgd",
                   "3f2c9a1e7b6d4c08 (this node is 1 of 2)", "bob", "50%", "epoch 1/2 step 120",
                   "test accuracy 0.8761", "model.keras", "error:     the host went away",
                   "keras.models.load_model('/var/lib/crowdd/jobs/x/output/model.keras')",
                   "model card (classes, metrics, how it was trained): /var/lib/crowdd/jobs/x/output/model.card.json"):
        assert needle in text, needle
    held = {**st, "idle": {"allowed": False, "rule": "user_idle", "reason": "active 2 min ago"},
            "dataset": {"name": None, "size": None, "digest": None}, "group": None, "training": None}
    out = io.StringIO()
    format_status(held, out)
    assert "held back by user_idle (active 2 min ago)" in out.getvalue()


class _StatusOnly:
    def __init__(self, st: dict[str, Any]) -> None:
        self.st = st

    async def status(self) -> dict[str, Any]:
        return self.st


def _follow(events: list[dict[str, Any] | None], st: dict[str, Any]) -> tuple[int, str]:
    import asyncio
    import io

    from crowdd.cli.commands import follow_session

    async def go() -> tuple[int, str]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        for ev in events:
            queue.put_nowait(ev)
        out = io.StringIO()
        code = await follow_session(queue, out, _StatusOnly(st))  # type: ignore[arg-type]
        return code, out.getvalue()

    return asyncio.run(go())


def test_host_follow_streams_the_session_to_its_end() -> None:
    events: list[dict[str, Any] | None] = [
        {"event": "state", "state": "standby", "previous": "waiting"},  # a worker cycle that hosting ended
        {"event": "state", "state": "registering", "previous": "standby"},
        {"event": "state", "state": "training", "previous": "replicating"},
        {"event": "progress", "epoch": 1, "epochs": 2, "step": 10, "total_steps": 20, "loss": 0.5, "accuracy": 0.8},
        {"event": "eval", "epoch": 1, "test_accuracy": 0.85},
        {"event": "log", "level": "warning", "message": "worker 2 dropped"},
        {"event": "state", "state": "finished", "previous": "training"},
        {"event": "state", "state": "standby", "previous": "finished"},
        {"event": "progress", "epoch": 9},  # after the end: not read
    ]
    st = {"result": {"test_accuracy": 0.87, "model_path": "/x/output/model.keras"}, "error": None}
    code, out = _follow(events, st)
    assert code == 0, out
    for needle in ("state: registering", "epoch 1/2 step 10/20 loss 0.500 accuracy 0.800", "epoch 1: test accuracy 0.8500",
                   "warning: worker 2 dropped", "done: test accuracy 0.8700; model: /x/output/model.keras",
                   "keras.models.load_model('/x/output/model.keras')"):
        assert needle in out, needle
    assert "epoch 9" not in out


def test_host_follow_fails_with_the_sessions_error() -> None:
    events: list[dict[str, Any] | None] = [
        {"event": "state", "state": "registering", "previous": "off"},
        {"event": "log", "level": "error", "message": "training failed: loss diverged at step 40; lower the learning rate"},
        {"event": "state", "state": "off", "previous": "training"},
    ]
    code, out = _follow(events, {"result": None, "error": "training failed: loss diverged at step 40"})
    assert code == 1 and "crowdd host: training failed: loss diverged at step 40" in out
    code, out = _follow([None], {})
    assert code == 1 and "the daemon went away" in out


def test_model_describes_the_card_and_how_to_load_it(tmp_path: Path) -> None:
    import io

    from crowdd.cli.export import describe

    model = tmp_path / "model.keras"
    model.write_bytes(b"zip")
    (tmp_path / "model.card.json").write_text(json.dumps({
        "output": {"kind": "classification", "classes": ["cat", "dog"]}, "test_accuracy": 0.91,
        "dataset": {"name": "pets", "digest": "ab" * 32}, "input": {"shape": [8, 8, 1]}, "steps": 120, "seconds": 3.5,
        "stopped_early": True}))
    out = io.StringIO()
    describe(model, out)
    text = out.getvalue()
    for needle in (f"model: {model}", "test accuracy 0.91; classes cat, dog", "dataset pets (abababababab)",
                   "[8, 8, 1] raw features; 120 steps in 3.5 s (stopped early)", f"keras.models.load_model({str(model)!r})"):
        assert needle in text, needle
    args = build_parser().parse_args(["model", "export", str(tmp_path / "out")])
    assert args.dest == tmp_path / "out"
    assert build_parser().parse_args(["model"]).dest is None


def test_model_without_a_daemon_or_a_model_says_so(tmp_path: Path, daemon: tuple[Path, subprocess.Popen[bytes]]) -> None:
    r = crowdd("model", root=tmp_path / "nobody")
    assert r.returncode == EXIT_NO_DAEMON
    root, _ = daemon
    r = crowdd("model", root=root)
    assert r.returncode == 1 and "no trained model" in r.stderr


def _loaded(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


def test_a_daemon_at_rest_holds_no_key_and_loads_no_crypto_library(daemon: tuple[Path, subprocess.Popen[bytes]]
                                                                    ) -> None:
    """Lean at rest (benchmarks/idle_footprint.py measures it): donation off, the daemon has made
    no identity and has not loaded cryptography (~10 MB of a 30 MB budget). The control: once a
    cycle starts (donation on; the matchmaker is away, so it keeps registering), the identity is
    made and the library is loaded."""
    root, proc = daemon
    st = wait_state(root, "off")
    assert st["state"] == "off"
    key = root / "state" / "identity" / "node.key"
    assert not key.exists() and not _loaded(proc.pid, "cryptography")
    assert crowdd("donate", "on", root=root).returncode == 0
    wait_state(root, "registering")
    assert key.is_file() and _loaded(proc.pid, "cryptography")


def _nofile(pid: int) -> tuple[int, int]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_a_daemon_raises_its_open_file_limit(tmp_path: Path) -> None:
    """The common soft limit of 1024 open files must not be what stops a host's run (issue 29):
    started under 1024, the daemon raises it to the hard limit (the units set that to 65536).
    The control: another program started the same way keeps 1024."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    start = 1024 if hard == resource.RLIM_INFINITY or hard > 1024 else hard // 2

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (start, hard))

    root = tmp_path / "node"
    root.mkdir()
    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=low)  # noqa: PLW1509
    proc = subprocess.Popen(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=low,  # noqa: PLW1509
    )
    try:
        assert _nofile(control.pid)[0] == start
        deadline = time.monotonic() + 30
        while not (root / "run" / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        soft, got_hard = _nofile(proc.pid)
        assert soft == got_hard > start
    finally:
        control.kill()
        control.wait()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
