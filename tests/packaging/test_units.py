"""The systemd units: `systemd-analyze verify`, the exposure score, the settings the issue asks for.

`systemd-analyze verify` refuses a unit whose ExecStart binary does not exist, so each unit is
verified as a copy in a temporary directory whose Exec*= executables are rewritten to this
Python interpreter (the arguments and every other line stay as shipped); the shipped path and
arguments are checked separately against the CLI parser.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crowdd.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
SYSTEM_UNITS = ["crowdd.service", "crowdd-matchmaker.service"]
USER_UNIT = UNITS / "user" / "crowdd.service"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line; keys may repeat, as systemd allows."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in directives(path) if k == key]


def runnable_copy(unit: Path, dest_dir: Path, extra: str = "") -> Path:
    """A copy of ``unit`` in ``dest_dir`` whose ExecStart runs an executable that exists."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("Exec") and value:
            argv = shlex.split(value)
            line = f"{key}=" + shlex.join([sys.executable, *argv[1:]])
        lines.append(line)
        if extra and line.startswith("[Service]"):
            lines.append(extra)
    dest = dest_dir / unit.name
    dest.write_text("\n".join(lines) + "\n")
    return dest


def analyze(*args: str, user: bool = False, tmp: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    cmd = [ANALYZE]
    if user:
        runtime = tmp / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)  # the user manager wants one, even offline
        cmd.append("--user")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


# --------------------------------------------------------------------------- verify


@needs_analyze
@pytest.mark.parametrize("name", SYSTEM_UNITS)
def test_verify_system_units(name: str, tmp_path: Path) -> None:
    unit = runnable_copy(UNITS / name, tmp_path / "units")
    res = analyze("verify", "--man=no", str(unit), tmp=tmp_path)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@needs_analyze
def test_verify_user_unit(tmp_path: Path) -> None:
    unit = runnable_copy(USER_UNIT, tmp_path / "user")
    res = analyze("verify", "--man=no", str(unit), user=True, tmp=tmp_path)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@needs_analyze
def test_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above is meaningful: a bad line makes verify speak (its exit status stays 0)."""
    unit = runnable_copy(UNITS / "crowdd.service", tmp_path / "bad", extra="Nice=banana\nNoSuchKey=1")
    res = analyze("verify", "--man=no", str(unit), tmp=tmp_path)
    text = res.stdout + res.stderr
    assert "banana" in text and "NoSuchKey" in text


# --------------------------------------------------------------------------- exposure


def exposure(text: str, name: str) -> float:
    m = re.search(rf"Overall exposure level for {re.escape(name)}:\s*([0-9.]+)", text)
    if not m:
        raise AssertionError(f"no exposure line in:\n{text[-2000:]}")
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("name", SYSTEM_UNITS)
def test_exposure_score(name: str, tmp_path: Path) -> None:
    unit = runnable_copy(UNITS / name, tmp_path / "units")
    res = analyze("security", "--offline=yes", "--no-pager", str(unit), tmp=tmp_path)
    score = exposure(res.stdout + res.stderr, name)
    assert score <= MAX_EXPOSURE, f"{name}: exposure {score} > {MAX_EXPOSURE}\n{res.stdout}"


@needs_analyze
@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("crowdd.service", r"`systemd-analyze security crowdd` scores it ([0-9.]+)"),
        ("crowdd-matchmaker.service", r"\(exposure ([0-9.]+);"),
    ],
)
def test_install_doc_quotes_the_exposure(name: str, quoted: str, tmp_path: Path) -> None:
    """docs/install.md states each unit's exposure: it is the figure systemd-analyze gives."""
    unit = runnable_copy(UNITS / name, tmp_path / "units")
    res = analyze("security", "--offline=yes", "--no-pager", str(unit), tmp=tmp_path)
    doc = " ".join((ROOT / "docs" / "install.md").read_text().split())
    m = re.search(quoted, doc)
    assert m, f"docs/install.md no longer quotes {name}'s exposure"
    assert float(m.group(1)) == exposure(res.stdout + res.stderr, name)


@needs_analyze
def test_exposure_of_a_bare_unit_is_high(tmp_path: Path) -> None:
    """The score parser reads real output: a unit without hardening scores badly."""
    bare = tmp_path / "bare" / "bare.service"
    bare.parent.mkdir()
    bare.write_text(f"[Service]\nExecStart={sys.executable} -c pass\n")
    res = analyze("security", "--offline=yes", "--no-pager", str(bare), tmp=tmp_path)
    assert exposure(res.stdout + res.stderr, "bare.service") > 9.0


# --------------------------------------------------------------------------- contents


def test_daemon_unit_settings() -> None:
    unit = UNITS / "crowdd.service"
    want = {
        "Type": "notify",
        "Restart": "on-failure",
        "User": "crowdd",
        "Group": "crowdd",
        "StateDirectory": "crowdd",
        "RuntimeDirectory": "crowdd",
        "RuntimeDirectoryMode": "0750",
        "LogsDirectory": "crowdd",
        "Nice": "19",
        "CPUSchedulingPolicy": "idle",
        "IOSchedulingClass": "idle",
        "NotifyAccess": "main",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
    }
    for key, value in want.items():
        assert values(unit, key) == [value], key
    assert int(values(unit, "WatchdogSec")[0]) > 0
    families = values(unit, "RestrictAddressFamilies")[0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert values(unit, "PrivateNetwork") in ([], ["no"])  # it serves peers over the network
    # a job's private network needs exactly a user and a network namespace, and nothing more
    assert values(unit, "RestrictNamespaces") == ["user net pid"]
    # nothing writable outside the state/runtime/log directories
    assert not values(unit, "ReadWritePaths")


@pytest.mark.parametrize(
    ("unit", "argv"),
    [
        (UNITS / "crowdd.service", ["daemon", "--system"]),
        (UNITS / "crowdd-matchmaker.service", ["matchmaker", "--config", "/etc/crowdd/matchmaker.toml"]),
        (USER_UNIT, ["daemon"]),
    ],
)
def test_exec_start_matches_the_cli(unit: Path, argv: list[str]) -> None:
    (line,) = values(unit, "ExecStart")
    shipped = shlex.split(line)
    assert shipped[0].endswith("/crowdd") and shipped[1:] == argv
    build_parser().parse_args(shipped[1:])  # the CLI accepts exactly these arguments
    for reload_line in values(unit, "ExecReload"):
        reload_argv = shlex.split(reload_line)
        assert reload_argv[0] == shipped[0] and reload_argv[1] == "reload"
        build_parser().parse_args(reload_argv[1:])


def test_user_unit_settings() -> None:
    assert values(USER_UNIT, "Type") == ["notify"]
    assert values(USER_UNIT, "Nice") == ["19"]
    assert values(USER_UNIT, "WantedBy") == ["default.target"]
    assert not values(USER_UNIT, "User")  # a user manager runs it as that user


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    res = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d" / "crowdd.conf")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert res.returncode == 0, res.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    (user,) = [line for line in passwd.splitlines() if line.startswith("crowdd:")]
    fields = user.split(":")
    assert fields[5] == "/var/lib/crowdd" and fields[6] == "/usr/sbin/nologin"
    assert int(fields[2]) < 1000  # a system user
    assert any(line.startswith("crowdd:") for line in group.splitlines())


# --------------------------------------------------------------------------- W^X for the matchmaker

_MDWE_CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("no-mdwe", flush=True); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("not-enforced", flush=True); sys.exit(0)
    except OSError:
        pass
    print("enforced", flush=True)
    from crowdd.cli.main import main
    sys.exit(main(["matchmaker", "--listen", "127.0.0.1:0", "--config", sys.argv[1]]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux only")
def test_matchmaker_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """crowdd-matchmaker.service sets MemoryDenyWriteExecute=yes: the matchmaker must run under
    W^X (the kernel's PR_SET_MDWE enforces the same rule). crowdd.service cannot: TF's oneDNN
    JIT aborts under it. Under MDWE the matchmaker serves a real registration: a TLS 1.3
    handshake to its pinned certificate, a signed hello checked, a wait frame back."""
    import asyncio

    from crowdd.matchmaker.client import register
    from crowdd.protocol import matchmaker as mmp
    from crowdd.protocol.matchmaker import MemberPorts
    from crowdd.testing.identities import identity
    from crowdd.wire import FrameTimeout

    proc = subprocess.Popen(
        [sys.executable, "-c", _MDWE_CHILD, str(tmp_path / "none.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == "enforced", f"the kernel cannot enforce MDWE here ({first})"
        port, fingerprint, seen = 0, "", []
        while not (port and fingerprint) and len(seen) < 50:
            line = proc.stdout.readline()
            assert line, f"matchmaker exited {proc.wait(10)} under MDWE:\n{''.join(seen)}"
            seen.append(line)
            if m := re.search(r"listening on [^\s]+:(\d+)", line):
                port = int(m.group(1))
            if m := re.search(r"fingerprint (sha256:[0-9a-f]{64})", line):
                fingerprint = m.group(1)
        assert port and fingerprint, "".join(seen)
        me = identity("mdwe-worker")
        hello = mmp.make_hello("worker", "mdwe-worker", MemberPorts(8001, 8002, (8003,)), cert=me.cert_pem,
                               fingerprint=me.fingerprint)
        waits: list[object] = []

        async def queue() -> None:
            with pytest.raises(FrameTimeout):  # alone in the queue: it waits, answered
                await register(("127.0.0.1", port), hello, fingerprint=fingerprint, timeout=3.0, heartbeat=0.5,
                               on_wait=waits.append)

        asyncio.run(queue())
        assert waits, "the matchmaker under MDWE never answered the hello"
        assert proc.poll() is None, f"matchmaker exited {proc.returncode} under MDWE"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
