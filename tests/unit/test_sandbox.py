"""crowdd.platform.sandbox, enforced for real: a child process under a job's policy (through
``crowdd.job.confine --sandbox``, the way the launcher starts every job) tries what a
malicious graph would, next to a control that shows the same thing works outside it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.platform import sandbox
from crowdd.platform.userns import probe as userns_probe

SUPPORT = sandbox.probe_now()
needs_landlock = pytest.mark.skipif(not SUPPORT.available, reason=f"no Landlock here: {SUPPORT.reason}")
needs_userns = pytest.mark.skipif(not userns_probe().available, reason="no unprivileged user namespaces here")

# What the sandboxed child tries; it prints one JSON object.
PROBE = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    args = json.loads(sys.argv[1])
    out = {}
    if args.get("forbid_writes"):  # as a TF server does first thing
        from crowdd.platform.sandbox import forbid_writes
        out["forbid_writes"] = forbid_writes() or "ok"
    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as exc:
            out[name] = exc.strerror or str(exc)
    for i, p in enumerate(args["read"]):
        attempt(f"read{i}", lambda p=p: open(p, "rb").read())
    for i, p in enumerate(args["write"]):
        attempt(f"write{i}", lambda p=p: open(p, "w").write("x"))
    for i, p in enumerate(args["list"]):
        attempt(f"list{i}", lambda p=p: os.listdir(p))
    for i, port in enumerate(args["connect"]):
        attempt(f"connect{i}", lambda port=port: socket.create_connection(("127.0.0.1", port), timeout=5).close())
    for i, port in enumerate(args["bind"]):
        attempt(f"bind{i}", lambda port=port: socket.create_server(("127.0.0.1", port)).close())
    for i, pid in enumerate(args["signal"]):
        attempt(f"signal{i}", lambda pid=pid: os.kill(pid, 0))
    for i, name in enumerate(args["abstract"]):
        def abstract(name=name):
            s = socket.socket(socket.AF_UNIX); s.connect("\\0" + name); s.close()
        attempt(f"abstract{i}", abstract)
    for i, path in enumerate(args["unix"]):
        def unix(path=path):
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
        attempt(f"unix{i}", unix)
    if args.get("setsid"):
        attempt("setpgid", lambda: os.setpgid(0, os.getpgid(0)))  # its own group again: allowed, unfiltered
        attempt("setsid", os.setsid)
    if args.get("io_uring"):
        import ctypes
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(425, 4, params)  # io_uring_setup(4 entries)
        out["io_uring"] = "ok" if fd >= 0 else os.strerror(ctypes.get_errno())
        if fd >= 0:
            os.close(fd)
    status = open("/proc/self/status").read()
    out["caps"] = status.split("CapEff:")[1].split()[0]
    out["no_new_privs"] = status.split("NoNewPrivs:")[1].split()[0]
    if args.get("userns"):
        r = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
        out["userns"] = "ok" if r.returncode == 0 else r.stderr.strip()
    out["home"] = os.environ.get("HOME")
    import numpy  # the installed packages are readable
    out["numpy"] = "ok"
    print(json.dumps(out))
""")


def confine_argv(tmp: Path, workdir: Path, *, data: Path | None = None, isolated: bool = False,
                 serve: int | None = None, guard: list[Path] | None = None) -> list[str]:
    sock_dir = tmp / "sockets"
    sock_dir.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "crowdd.job.confine", "--dir", str(sock_dir), "--sandbox", "--workdir", str(workdir)]
    if data is not None:
        argv += ["--data", str(data)]
    if serve is not None:
        argv += ["--serve", f"own={serve}"]
    for g in guard or []:
        argv += ["--guard", str(g)]
    if isolated:
        argv = ["unshare", "--user", "--map-root-user", "--net", "--", *argv, "--isolated"]
    return argv


def run_probe(argv: list[str] | None, **what: object) -> dict[str, str]:
    """The probe under ``argv`` (a confine command line), or as a plain child (None): the control."""
    args = {"read": [], "write": [], "list": [], "connect": [], "bind": [], "signal": [], "abstract": [], "unix": [], **what}
    prefix = [] if argv is None else [*argv, "--"]
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[dict[str, Path]]:
    state = tmp_path / "state"
    (state / "identity").mkdir(parents=True)
    (state / "identity" / "node.key").write_text("PRIVATE KEY")
    workdir = state / "jobs" / "g-1"
    workdir.mkdir(parents=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    data = cache / "dataset.data"
    data.write_bytes(b"\x00" * 64)
    (workdir / "dataset.bin").symlink_to(data)
    home_canary = Path.home() / f".crowdd-test-canary-{os.getpid()}"
    home_canary.write_text("the volunteer's")
    try:
        yield {"state": state, "workdir": workdir, "data": data, "home_canary": home_canary, "tmp": tmp_path}
    finally:
        home_canary.unlink(missing_ok=True)


@needs_landlock
def test_files_outside_the_job_are_out_of_reach(layout: dict[str, Path]) -> None:
    wd, data = layout["workdir"], layout["data"]
    secrets = [layout["state"] / "identity" / "node.key", layout["home_canary"], Path("/etc/shadow")]
    what = {"read": [*map(str, secrets), str(wd / "dataset.bin"), str(data)],
            "write": [str(layout["state"] / "pwned"), str(layout["tmp"] / "pwned"), str(wd / "dataset.bin"),
                      str(data), str(wd / "mine")],
            "list": [str(layout["state"]), str(Path.home()), str(wd)]}
    control = run_probe(None, **what)
    assert control["read0"] == control["read1"] == "ok" and control["write0"] == "ok"  # not sandboxed: it could
    (layout["state"] / "pwned").unlink()
    (layout["tmp"] / "pwned").unlink()
    data.write_bytes(b"\x00" * 64)

    got = run_probe(confine_argv(layout["tmp"], wd, data=data, guard=[layout["state"]]), **what)
    assert got["read0"] == got["read1"] == got["read2"] == "Permission denied", got
    assert got["read3"] == got["read4"] == "ok", got  # its dataset, through the link and directly
    assert got["write0"] == got["write1"] == "Permission denied", got
    assert got["write2"] == got["write3"] == "Permission denied", got  # the dataset is read-only, link or not
    assert got["write4"] == "ok" and (wd / "mine").read_text() == "x", got
    assert got["list0"] == got["list1"] == "Permission denied" and got["list2"] == "ok", got
    assert not (layout["state"] / "pwned").exists() and not (layout["tmp"] / "pwned").exists()
    assert data.read_bytes() == b"\x00" * 64
    assert got["numpy"] == "ok" and got["home"] == str(wd)
    assert got["no_new_privs"] == "1" and got["caps"] == "0000000000000000", got


@needs_landlock
@needs_landlock
def test_a_tf_server_writes_no_file_not_even_in_the_job_s_directory(layout: dict[str, Path]) -> None:
    """Graphs run on the job's TF servers; each forbids itself every write (a further Landlock
    layer): the job's directory, its TMPDIR (where the coordinator's autograph modules go) and
    a new file there are all refused, /dev/null is not. The control: the job's own process,
    under the same sandbox without that layer, writes there."""
    wd = layout["workdir"]
    (wd / "tmp").mkdir()
    what = {"write": [str(wd / "mine"), str(wd / "tmp" / "planted.py"), "/dev/null"], "list": [str(wd)]}
    argv = confine_argv(layout["tmp"], wd, data=layout["data"], guard=[layout["state"]])
    control = run_probe(argv, **what)
    assert control["write0"] == control["write1"] == "ok", control
    (wd / "mine").unlink()
    (wd / "tmp" / "planted.py").unlink()
    got = run_probe(argv, forbid_writes=True, **what)
    assert got["forbid_writes"] == "ok", got
    assert got["write0"] == got["write1"] == "Permission denied", got
    assert got["write2"] == "ok" and got["list0"] == "ok", got  # /dev/null; reading is as before
    assert not (wd / "mine").exists() and not (wd / "tmp" / "planted.py").exists()


@pytest.mark.skipif(not SUPPORT.network_rules, reason="Landlock ABI < 4: no TCP rules")
def test_tcp_only_to_the_job_s_ports(layout: dict[str, Path]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other, socket.create_server(("127.0.0.1", 0)) as own:
        others, owns = other.getsockname()[1], own.getsockname()[1]
        control = run_probe(None, connect=[others])
        assert control["connect0"] == "ok"
        own.close()
        got = run_probe(confine_argv(layout["tmp"], layout["workdir"], serve=owns), connect=[others, owns],
                        bind=[owns, owns + 1 if owns < 65535 else owns - 1])
    assert got["connect0"] == "Permission denied", got  # e.g. the daemon's data port, another service
    assert got["bind0"] == "ok" and got["bind1"].startswith("Permission denied"), got
    assert got["connect1"] != "Permission denied", got  # its own port: allowed (nothing listens now)


@needs_landlock
@pytest.mark.skipif(not SUPPORT.scopes, reason="Landlock ABI < 6: no signal or abstract-socket scopes")
def test_no_signals_or_abstract_sockets_outside_the_job(layout: dict[str, Path]) -> None:
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    name = f"crowdd-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind("\0" + name)
    srv.listen()
    try:
        got = run_probe(confine_argv(layout["tmp"], layout["workdir"]), signal=[outsider.pid], abstract=[name])
        assert got["signal0"] == "Operation not permitted", got
        assert got["abstract0"] == "Operation not permitted", got
        assert outsider.poll() is None
    finally:
        srv.close()
        outsider.kill()
        outsider.wait()


@needs_landlock
def test_no_unix_sockets_io_uring_or_setsid_in_the_job(layout: dict[str, Path]) -> None:
    # a pathname socket like a session D-Bus or ssh-agent (Landlock below ABI 9 lets it through)
    path = layout["tmp"] / "bus.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    try:
        control = run_probe(None, unix=[str(path)], io_uring=True, setsid=True)
        assert control["unix0"] == "ok" and control["io_uring"] == "ok", control  # outside the job: all work
        assert control["setsid"] == "ok" and control["setpgid"] == "ok", control
        got = run_probe(confine_argv(layout["tmp"], layout["workdir"]), unix=[str(path)], io_uring=True, setsid=True)
        assert got["unix0"] == "Operation not permitted", got
        assert got["io_uring"] == "Operation not permitted", got
        assert got["setsid"] == got["setpgid"] == "Operation not permitted", got  # it stays in the job's group
        assert got["numpy"] == "ok", got  # the job itself runs
    finally:
        srv.close()


@needs_landlock
@needs_userns
def test_no_user_namespace_inside_the_job_s(layout: dict[str, Path]) -> None:
    got = run_probe(confine_argv(layout["tmp"], layout["workdir"], isolated=True), userns=True)
    assert got["userns"] != "ok" and "No space left" in got["userns"], got
    assert got["caps"] == "0000000000000000", got  # root of its namespace, with no capability


def test_sys_path_entries_that_expose_guarded_directories_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "home" / "me" / ".local" / "share" / "crowdd"
    state.mkdir(parents=True)
    pkgs = tmp_path / "home" / "me" / "venv" / "site-packages"
    pkgs.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "home" / "me"), str(pkgs), "/", ""])
    paths, skipped = sandbox.runtime_paths([state])
    assert pkgs.resolve() in paths  # a venv below the home: readable, the rest of the home not
    assert (tmp_path / "home" / "me").resolve() not in paths and Path("/") not in paths
    assert str(tmp_path / "home" / "me") in skipped and "/" in skipped


def test_policy_reads_runtime_and_dataset_and_writes_only_the_workdir(tmp_path: Path) -> None:
    data = tmp_path / "d.data"
    data.write_bytes(b"x")
    pol = sandbox.job_policy(tmp_path / "wd", data, bind=[5, 5, 3], connect=[7], guarded=[tmp_path / "state"])
    assert data.resolve() in pol.read and Path(sys.prefix).resolve() in pol.read
    assert pol.write[0] == (tmp_path / "wd").resolve() and all(str(w).startswith("/dev/") for w in pol.write[1:])
    assert pol.bind == (3, 5) and pol.connect == (7,)
    assert not any(p == Path.home() or p in Path.home().parents for p in pol.read)


def test_sandbox_needs_a_workdir(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "crowdd.job.confine", "--dir", str(tmp_path), "--sandbox", "--",
                           "true"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--sandbox needs --workdir" in done.stderr


@needs_landlock
def test_an_unusable_sandbox_stops_the_job_before_it_starts(tmp_path: Path) -> None:
    """A path the policy names that cannot be opened: the job never runs, the error says why."""
    marker = tmp_path / "ran"
    done = subprocess.run([*confine_argv(tmp_path, tmp_path / "missing-workdir"), "--", sys.executable, "-c",
                           f"open({str(marker)!r}, 'w')"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 70 and "cannot sandbox the job" in done.stderr, done.stderr
    assert not marker.exists()


def test_probe_reports_the_abi_or_why_not() -> None:
    s = sandbox.probe_now()
    assert (s.available and s.abi >= 1 and not s.reason) or (not s.available and s.abi == 0 and s.reason)


@needs_landlock
def test_of_sys_a_job_reads_only_the_cpu_and_memory_topology(layout: dict[str, Path]) -> None:
    """The machine's hardware, devices and firmware (/sys/class, /sys/block, /sys/firmware) are
    out of reach; the CPU topology TF reads is not. The control: outside the job all read."""
    hidden = [p for p in ("/sys/class", "/sys/block", "/sys/bus", "/sys/firmware") if Path(p).is_dir()]
    assert hidden, "this machine's /sys has none of the directories to hide"
    what = {"list": [*hidden, "/sys/devices/system/cpu"], "read": ["/sys/devices/system/cpu/online"]}
    control = run_probe(None, **what)
    assert all(v == "ok" for k, v in control.items() if k.startswith(("list", "read"))), control
    got = run_probe(confine_argv(layout["tmp"], layout["workdir"], data=layout["data"]), **what)
    for i in range(len(hidden)):
        assert got[f"list{i}"] == "Permission denied", (hidden[i], got)
    assert got[f"list{len(hidden)}"] == "ok" and got["read0"] == "ok", got
