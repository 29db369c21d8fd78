"""crowdd.service's sandbox, enforced by a real systemd: a job can still be confined in it.

The daemon starts each job as ``unshare --user --map-root-user --net -- python -m
crowdd.job.confine ...``; inside, the mapped root brings ``lo`` up and reaches the daemon
through path-based Unix sockets in the runtime directory. This test boots systemd as PID 1 in
fresh PID/mount/UTS/IPC/cgroup namespaces (a throw-away "container" sharing this machine's
root, with tmpfs over /run, /var/lib and /var/log and an overlay over /etc, so nothing on the
machine changes) and starts a one-shot probe unit made from crowdd.service's own lines: every
``[Service]`` setting is kept (User=crowdd from the shipped sysusers file, the directories, all
of the hardening) except what makes it a long-running notify daemon, and ExecStart runs the
probe below instead of crowdd. The probe, as the service user in that sandbox:

- listens on ``probe.sock`` in a ``mkdtemp`` of its private /tmp (where crowdd.node.tunnels
  makes the job's sockets) and in ``$RUNTIME_DIRECTORY``;
- runs ``unshare --user --map-root-user --net -- python3 -c CHILD``, where CHILD brings ``lo``
  up (SIOCSIFFLAGS as the mapped root), serves and connects on 127.0.0.1, sees only ``lo``,
  and reports back over both Unix sockets (crossing the network namespace);
- tries ``unshare --user --map-root-user`` with ``--mount``, ``--ipc``, ``--uts`` and
  ``--cgroup``, which RestrictNamespaces=user net pid must refuse (crowdd's own probe, run
  there too, makes the job's user + network + PID namespaces).

A second boot with ``RestrictNamespaces=yes`` (the unit before jobs were confined) shows the
probe can tell the difference. Needs root, systemd, util-linux unshare, cgroup2 and overlayfs.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.testing.systemd_boot import Container, why_not

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
SYSUSERS = UNITS / "sysusers.d" / "crowdd.conf"
PROBE_UNIT = "crowdd-sandbox-probe.service"
BOOT_TIMEOUT = 90

# The service cannot see /root or /home (ProtectHome=yes): the probe needs a system python.
PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
NAMESPACES_REFUSED = ("mount", "ipc", "uts", "cgroup")
# crowdd's namespace probe (stdlib only), copied where the service can read it wherever this
# checkout lives (ProtectHome=yes and PrivateTmp=yes hide /home, /root and /tmp)
SOURCE = Path(f"/opt/crowdd-unit-probe-{os.getpid()}")
PROBE_MODULES = ("crowdd/__init__.py", "crowdd/platform/__init__.py", "crowdd/platform/userns.py")


def _why_not() -> str | None:
    if PYTHON is None and why_not() is None:
        return "missing: a python3 outside /root and /home"
    return why_not()


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


# --------------------------------------------------------------------------- the probe

# Runs in the new user + network namespace, as its mapped root.
_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, struct, sys
    IFREQ = struct.Struct("16sH14x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = IFREQ.unpack(fcntl.ioctl(s.fileno(), 0x8913, IFREQ.pack(b"lo", 0)))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s.fileno(), 0x8914, IFREQ.pack(b"lo", flags | 0x1))  # SIOCSIFFLAGS, IFF_UP
    server = socket.create_server(("127.0.0.1", 0))
    with socket.create_connection(server.getsockname(), timeout=5) as c:
        peer, _ = server.accept()
        c.sendall(b"ping")
        echoed = peer.recv(4)
    report = {"uid": os.getuid(), "loopback": echoed.decode(),
              "interfaces": sorted(name for _, name in socket.if_nameindex())}
    for path in sys.argv[1:]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
            u.connect(path)
            u.sendall(json.dumps(report).encode())
    print("ok")
    """
)

# Runs as ExecStart= of the probe unit, i.e. as the service user inside crowdd.service's sandbox.
_PROBE = textwrap.dedent(
    """
    import json, os, socket, subprocess, sys, tempfile
    CHILD = __CHILD__
    out = {"uid": os.getuid(), "user": os.environ.get("USER", "")}
    # where crowdd.node.tunnels puts them (a mkdtemp in the service's private /tmp), and the
    # runtime directory
    paths = {"tmp": os.path.join(tempfile.mkdtemp(prefix="crowdd-"), "probe.sock"),
             "runtime": os.path.join(os.environ["RUNTIME_DIRECTORY"], "probe.sock")}
    servers = {}
    for where, path in paths.items():
        servers[where] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        servers[where].bind(path)
        servers[where].listen(1)
        servers[where].settimeout(0.2)
    child = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "--", sys.executable, "-c", CHILD,
                              *paths.values()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for where, server in servers.items():
        out["over " + where] = "nothing came"
        for _ in range(150):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if child.poll() is not None:
                    break
                continue
            with conn:
                conn.settimeout(30)
                try:
                    out["over " + where] = json.loads(conn.recv(65536).decode())
                except (OSError, ValueError) as exc:
                    out["over " + where] = repr(exc)
            break
    try:
        stdout, stderr = child.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
    out["user+net"] = {"rc": child.returncode, "out": stdout, "err": stderr}
    for kind in __REFUSED__:
        extra = ["--fork"] if kind == "pid" else []
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--" + kind, *extra, "--", "true"],
                              capture_output=True, text=True, timeout=30)
        out[kind] = {"rc": done.returncode, "err": done.stderr}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--", "true"], capture_output=True, text=True, timeout=30)
    out["user only"] = {"rc": done.returncode, "err": done.stderr}
    # crowdd's own check, as the daemon makes it at start (from a copy of its module placed
    # where the service sees it: not below /home, /root or /tmp)
    os.environ["PYTHONPATH"] = __SOURCE__
    sys.path.insert(0, __SOURCE__)
    from crowdd.platform.userns import probe_now
    out["crowdd probe"] = probe_now(sys.executable).to_dict()
    print(json.dumps(out), flush=True)
    """
).replace("__CHILD__", repr(_CHILD)).replace("__REFUSED__", repr(NAMESPACES_REFUSED)).replace("__SOURCE__", repr(str(SOURCE)))

# What makes crowdd.service a long-running notify daemon; everything else stays as shipped.
_DROPPED = {
    "Unit": {"Wants", "After", "Requires", "BindsTo"},
    "Service": {"Type", "NotifyAccess", "ExecStart", "ExecReload", "ExecStop", "WatchdogSec",
                "Restart", "RestartSec", "StandardOutput", "StandardError"},
}


def probe_unit(shipped: Path, out_file: Path, override: dict[str, str] | None = None) -> str:
    """A one-shot unit: ``shipped``'s lines (minus _DROPPED and [Install], plus ``override``),
    whose ExecStart runs _PROBE and whose end stops the throw-away systemd."""
    override = dict(override or {})
    code = base64.b64encode(_PROBE.encode()).decode()
    lines: list[str] = []
    section = ""
    for raw in shipped.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
            if section == "Install":
                continue
            lines.append(line)
            if section == "Unit":
                lines += ["DefaultDependencies=no", "SuccessAction=exit-force", "FailureAction=exit-force"]
            if section == "Service":
                lines += [
                    "Type=oneshot",
                    f"ExecStart={PYTHON} -c \"import base64; exec(base64.b64decode('{code}'))\"",
                    f"StandardOutput=file:{out_file}",
                    "StandardError=inherit",
                    "TimeoutStartSec=60",
                ]
            continue
        if section == "Install" or not line or line.startswith(("#", ";")):
            continue
        key = line.partition("=")[0].strip()
        if key in _DROPPED.get(section, set()):
            continue
        if section == "Service" and key in override:
            line = f"{key}={override.pop(key)}"
        lines.append(line)
    assert not override, f"not in the unit: {override}"
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the throw-away systemd


def boot(unit_text: str, tmp: Path) -> tuple[int, str]:
    """Boot systemd as PID 1 in new namespaces (crowdd.testing.systemd_boot) with only
    ``unit_text`` (as PROBE_UNIT) to start; it exits when that unit ends. Returns systemd's
    exit status and its console output."""
    (tmp / "units").mkdir()
    (tmp / "units" / PROBE_UNIT).write_text(unit_text)
    q = shlex.quote
    setup = [
        f"cp {q(str(tmp / 'units' / PROBE_UNIT))} /run/systemd/system/",
        # the user and group exactly as the package creates them
        f"systemd-sysusers {q(str(SYSUSERS))}",
    ]
    container = Container(tmp, setup=setup, unit=PROBE_UNIT, exit_on_unit_end=True, boot_timeout=BOOT_TIMEOUT,
                          keep=[tmp])
    try:
        container.boot()
        rc = container.wait(BOOT_TIMEOUT)
        return rc, container.console()
    finally:
        container.close()


def run_probe(tmp: Path, override: dict[str, str] | None = None) -> dict[str, object]:
    out_file = tmp / "probe.out"
    rc, log = boot(probe_unit(UNITS / "crowdd.service", out_file, override), tmp)
    text = out_file.read_text() if out_file.exists() else ""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"the probe unit printed no report (systemd exit {rc}):\n{text}\n--- systemd:\n{log[-6000:]}"
    report: dict[str, object] = json.loads(lines[-1])
    report["_log"] = log
    return report


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def probe_source() -> Iterator[Path]:
    try:
        for rel in PROBE_MODULES:
            (SOURCE / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, SOURCE / rel)
        SOURCE.chmod(0o755)
        for d in (SOURCE / "crowdd", SOURCE / "crowdd" / "platform"):
            d.chmod(0o755)
        yield SOURCE
    finally:
        shutil.rmtree(SOURCE, ignore_errors=True)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The probe's report from crowdd.service's sandbox exactly as shipped."""
    return run_probe(tmp_path_factory.mktemp("shipped"))


def _result(report: dict[str, object], key: str) -> dict[str, object]:
    got = report[key]
    assert isinstance(got, dict), report
    return got


def test_the_probe_ran_as_the_service_user(shipped: dict[str, object]) -> None:
    assert shipped["user"] == "crowdd" and shipped["uid"] != 0, shipped
    assert f"{PROBE_UNIT}: Deactivated successfully" in str(shipped["_log"]), shipped["_log"]


def test_job_confinement_works_in_the_service_sandbox(shipped: dict[str, object]) -> None:
    net = _result(shipped, "user+net")
    assert net["rc"] == 0 and str(net["out"]).strip() == "ok", shipped
    # path-based Unix sockets, in the private /tmp and in the runtime directory, cross the netns
    assert _result(shipped, "over tmp") == _result(shipped, "over runtime")
    inside = _result(shipped, "over tmp")
    assert inside["uid"] == 0  # the mapped root, who may bring lo up
    assert inside["loopback"] == "ping"  # lo is up: 127.0.0.1 serves and connects
    assert inside["interfaces"] == ["lo"]  # a private network: nothing but its own loopback
    assert _result(shipped, "user only") == {"rc": 0, "err": ""}


def test_crowdds_own_probe_says_jobs_can_be_confined(shipped: dict[str, object]) -> None:
    """crowdd.platform.userns.probe_now, run in the sandbox, finds confinement available."""
    assert _result(shipped, "crowdd probe") == {"confined": True, "reason": ""}


@pytest.mark.parametrize("kind", NAMESPACES_REFUSED)
def test_other_namespaces_are_refused_in_the_service_sandbox(shipped: dict[str, object], kind: str) -> None:
    got = _result(shipped, kind)
    assert got["rc"] != 0 and "Operation not permitted" in str(got["err"]), got


def test_those_namespaces_work_outside_the_sandbox() -> None:
    """So the refusals above are the unit's doing, not this kernel's."""
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", *(f"--{kind}" for kind in NAMESPACES_REFUSED), "--fork", "--", "true"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_probe_tells_restrict_namespaces_yes_apart(tmp_path: Path) -> None:
    """Under the old RestrictNamespaces=yes the same probe cannot make its private network."""
    report = run_probe(tmp_path, {"RestrictNamespaces": "yes"})
    net = _result(report, "user+net")
    assert net["rc"] != 0 and "Operation not permitted" in str(net["err"]), report
    assert report["over tmp"] == report["over runtime"] == "nothing came"
    assert _result(report, "user only")["rc"] != 0
    probe = _result(report, "crowdd probe")
    assert probe["confined"] is False and "not allowed" in str(probe["reason"]), probe
