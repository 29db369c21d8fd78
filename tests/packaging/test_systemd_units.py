"""The shipped units under a real systemd (PID 1 in namespaces: crowdd.testing.systemd_boot).

Each test boots a throw-away systemd (about a second), installs crowdd the way docs/install.md
says — a venv outside /home (here /srv/crowdd-test-*, made once per module by pip-installing
this checkout, with the dependencies taken from the running environment's site-packages
through a ``.pth`` file so that TensorFlow is not installed again), the sysusers.d entry and
``systemd-sysusers``, the unit file — plus a drop-in that points ExecStart at that venv (the
documented "installed elsewhere" drop-in) and turns off the unit's default dependencies (so
the machine's sysinit units, which would act on this machine's /tmp, never start). What each
test proves is in its docstring; the whole module takes about a minute and a half.

Needs root, systemd, cgroup2 and overlayfs; skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from crowdd.testing.systemd_boot import SYSTEMD, Container, deps_steps, install_venv, why_not
from crowdd.testing.bounds import at_least


# 4 epochs of digits (not a full run): 0.7994 under the unit in a clean-clone run 2026-12-07
# (CROWDD_METRICS, crowdd/testing/bounds.py), where it failed the 0.8 first set here without a
# measurement; the 3-epoch twin in test_session_plan reached 0.774-0.811 in three runs. One
# run's accuracy on 360 test images has a standard error of ~0.021: 0.7 is ~4.5 of them below
ACCURACY_THRESHOLD = 0.7

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
SOCK = "/run/crowdd/control.sock"



def _why_not() -> str | None:
    missing = [t for t in ("useradd", "runuser", "systemd-run", "journalctl", "ps") if shutil.which(t) is None]
    return why_not() or ("missing: " + ", ".join(missing) if missing else None)


pytestmark = [pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def crowdd_bin() -> Iterator[Path]:
    """crowdd pip-installed into a venv the hardened unit can see (not /root, /home, /tmp)."""
    base = Path(tempfile.mkdtemp(prefix="crowdd-test-", dir="/srv" if os.path.isdir("/srv") else "/opt"))
    try:
        base.chmod(0o755)
        yield install_venv(base / "venv", ROOT)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def system_setup(crowdd: Path, *, service: str = "", unit: str = "", config: str = "") -> list[str]:
    """Shell steps that install crowdd.service as docs/install.md says, with a drop-in."""
    q = shlex.quote
    dropin = (
        "[Unit]\nDefaultDependencies=no\n" + unit
        + f"[Service]\nExecStart=\nExecStart={crowdd} daemon --system\n"
        f"ExecReload=\nExecReload={crowdd} reload --socket {SOCK}\n" + service
    )
    steps = [
        *deps_steps(crowdd),
        f"install -Dm644 {q(str(UNITS / 'sysusers.d' / 'crowdd.conf'))} /etc/sysusers.d/crowdd.conf",
        "systemd-sysusers /etc/sysusers.d/crowdd.conf >/dev/null",
        f"install -Dm644 {q(str(UNITS / 'crowdd.service'))} /etc/systemd/system/crowdd.service",
        f"mkdir -p /etc/systemd/system/crowdd.service.d && printf %s {q(dropin)} > /etc/systemd/system/crowdd.service.d/test.conf",
        # users: alice may use the service (group crowdd), bob may not; homes on a tmpfs /home
        "mount -t tmpfs -o mode=0755 tmpfs /home",
        "useradd -m -G crowdd alice && useradd -m bob",
    ]
    if config:
        steps.append(f"install -Dm644 /dev/stdin /etc/crowdd/crowdd.toml <<'EOF'\n{config}EOF")
    return steps


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)


def as_user(c: Container, user: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return c.run("runuser", "-u", user, "--", *cmd, check=check, env={"HOME": f"/home/{user}"})


def proc_status(host_pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def mounts(host_pid: int) -> dict[str, tuple[str, str]]:
    """mount point -> (root within its file system, mount options) as the process sees them."""
    out: dict[str, tuple[str, str]] = {}
    for line in Path(f"/proc/{host_pid}/mountinfo").read_text().splitlines():
        f = line.split()
        out[f[4]] = (f[3], f[5])
    return out


def main_pid(c: Container) -> int:
    return int(c.show("crowdd", "MainPID")["MainPID"])


# --------------------------------------------------------------------------- tests


def test_notify_active_only_after_ready_and_the_socket_is_the_groups(crowdd_bin: Path, tmp_path: Path) -> None:
    """Type=notify: while the daemon starts the unit is "activating" and only once the control
    socket answers is it "active" (READY=1 after binding). STATUS= carries the state. The
    socket lets group crowdd in (alice) and no one else (bob); its log reaches the journal
    with priorities and crowdd.log in LogsDirectory, which alice reads with `crowdd logs`."""
    with Container(tmp_path, setup=system_setup(crowdd_bin)) as c:
        c.systemctl("start", "systemd-journald.socket", "systemd-journald.service")
        c.systemctl("start", "--no-block", "crowdd")
        samples: list[tuple[str, bool]] = []

        def sample() -> bool:
            state = c.systemctl("is-active", "crowdd", check=False).stdout.strip()
            bound = c.run("test", "-S", SOCK, check=False).returncode == 0
            samples.append((state, bound))
            return state == "active"

        wait_for("crowdd active", sample, 60, every=0.02)
        assert ("activating", False) in samples, samples
        assert all(bound for state, bound in samples if state == "active"), samples
        # READY came after the socket was bound: it answers at once
        st = json.loads(c.run(str(crowdd_bin), "status", "--json", "--socket", SOCK).stdout)
        assert st["state"] == "off"
        show = c.show("crowdd", "StatusText", "Type", "NotifyAccess", "User")
        assert show == {"StatusText": show["StatusText"], "Type": "notify", "NotifyAccess": "main", "User": "crowdd"}
        assert show["StatusText"].startswith("off"), show
        # LimitNOFILE=65536 (issue 29): the unit asks for it, and the daemon runs with as many
        # open files as its machine lets the service have (this test's container caps it at
        # what this process may hold), soft and hard
        import resource

        assert c.show("crowdd", "LimitNOFILE") == {"LimitNOFILE": "65536"}
        limits = Path(f"/proc/{c.host_pid(main_pid(c))}/limits").read_text().splitlines()
        expected = str(min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        assert next(ln for ln in limits if ln.startswith("Max open files")).split()[3:5] == [expected, expected]

        alice = as_user(c, "alice", str(crowdd_bin), "status")  # no --socket: the system one is found
        assert alice.returncode == 0 and "off" in alice.stdout, alice.stderr
        bob = as_user(c, "bob", str(crowdd_bin), "status", "--socket", SOCK)
        assert bob.returncode == 3 and "Permission denied" in bob.stderr, (bob.stdout, bob.stderr)
        assert as_user(c, "alice", str(crowdd_bin), "donate", "on").returncode == 0

        logs = as_user(c, "alice", str(crowdd_bin), "logs", "--system", "-n", "200")
        assert logs.returncode == 0 and "INFO crowdd.node.daemon: crowdd daemon" in logs.stdout, logs.stderr
        assert "cannot give" not in logs.stdout  # the socket is born in group crowdd; no chown needed
        journal = c.run("journalctl", "-u", "crowdd", "-o", "json", "--no-pager").stdout
        entries = [json.loads(line) for line in journal.splitlines() if line.startswith("{")]
        ready = [e for e in entries if "crowdd daemon" in str(e.get("MESSAGE")) and "ready" in str(e.get("MESSAGE"))]
        assert ready and ready[0]["PRIORITY"] == "6", entries[-5:]
        assert all(not str(e.get("MESSAGE", "")).startswith("<") for e in entries)
        assert as_user(c, "bob", str(crowdd_bin), "logs", "--system").returncode == 1

        c.systemctl("stop", "crowdd")
        assert c.systemctl("is-active", "crowdd", check=False).stdout.strip() == "inactive"


def test_the_watchdog_restarts_a_daemon_that_stops_answering(crowdd_bin: Path, tmp_path: Path) -> None:
    """With the watchdog shortened to 2 s (a drop-in), a daemon frozen with SIGSTOP misses its
    pings: systemd aborts it and Restart=on-failure brings a new one up."""
    service = "WatchdogSec=2\nRestartSec=1\nTimeoutAbortSec=5\n"
    with Container(tmp_path, setup=system_setup(crowdd_bin, service=service)) as c:
        c.systemctl("start", "crowdd")
        first = main_pid(c)
        time.sleep(3)  # it pings while it runs: still the same process
        assert main_pid(c) == first and c.show("crowdd", "NRestarts")["NRestarts"] == "0"
        c.run("kill", "-STOP", str(first))
        wait_for("a restart", lambda: c.show("crowdd", "NRestarts")["NRestarts"] == "1", 30)
        wait_for("active again", lambda: c.systemctl("is-active", "crowdd", check=False).stdout.strip() == "active", 30)
        assert main_pid(c) != first
        assert "Watchdog timeout" in c.console() or "watchdog" in c.run(
            "journalctl", "--no-pager", "-u", "crowdd", check=False).stdout.lower()
        assert c.run(str(crowdd_bin), "status", "--socket", SOCK).returncode == 0


def test_a_user_hosts_a_file_in_their_home_through_the_service(crowdd_bin: Path, tmp_path: Path) -> None:
    """ProtectHome=yes stays: the service cannot see /home/alice/digits.npz (mode 0600), yet
    alice hosts it (crowdd host hands the open file over); bob cannot host it."""
    with Container(tmp_path, setup=system_setup(crowdd_bin)) as c:
        c.systemctl("start", "crowdd")
        data = "/home/alice/digits.npz"
        c.run(str(crowdd_bin.parent / "python"), "-c", f"import numpy as np; r = np.random.default_rng(0); np.savez({data!r}, "
              "x_train=r.random((100, 4, 4)).astype('float32'), y_train=r.integers(0, 10, 100), "
              "x_test=r.random((20, 4, 4)).astype('float32'), y_test=r.integers(0, 10, 20))")
        c.run("chown", "alice:alice", data)
        c.run("chmod", "0600", data)
        c.run("chmod", "0700", "/home/alice")
        daemon = c.host_pid(main_pid(c))
        assert not os.path.exists(f"/proc/{daemon}/root{data}")  # the service's view: no /home/alice
        bob = as_user(c, "bob", str(crowdd_bin), "host", data, "--socket", SOCK)
        assert bob.returncode == 2 and "permission denied" in bob.stderr, bob.stderr
        alice = as_user(c, "alice", str(crowdd_bin), "host", data, "--workers", "1", "--socket", SOCK)
        assert alice.returncode == 0, alice.stderr

        def hosted() -> dict[str, Any] | None:
            st = json.loads(c.run(str(crowdd_bin), "status", "--json", "--socket", SOCK).stdout)
            return st if st.get("dataset") else None

        st = wait_for("the dataset prepared", hosted, 30)
        assert st["dataset"]["name"] == "digits" and st["role"] == "host"
        c.run(str(crowdd_bin), "stop", "--socket", SOCK)


# --------------------------------------------------------------------------- training under the unit


def _hardened(host_pid: int, *, job: bool = False) -> None:
    st = proc_status(host_pid)
    assert st["NoNewPrivs"] == "1", st
    assert st["Seccomp"] == "2" and int(st.get("Seccomp_filters", "1")) >= 1, st  # the syscall filter
    if not job:
        assert st["CapEff"] == "0000000000000000", st
    else:
        # the job's mapped root has capabilities only inside its own user namespace, which maps
        # its root to the unprivileged service user
        inside, outside, count = Path(f"/proc/{host_pid}/uid_map").read_text().split()[:3]
        assert (inside, count) == ("0", "1") and outside != "0", (inside, outside, count)
    m = mounts(host_pid)
    assert "ro" in m["/usr"][1].split(",") if "/usr" in m else "ro" in m["/"][1].split(","), m
    tmp_root, _ = m["/tmp"]
    assert "systemd-private-" in tmp_root, m["/tmp"]  # its own /tmp, not the machine's
    assert "inaccessible" in m["/home"][0] and "inaccessible" in m["/root"][0], m  # ProtectHome=yes


def test_tensorflow_trains_under_the_hardened_unit_and_stop_leaves_nothing(crowdd_bin: Path, tmp_path: Path) -> None:
    """A two-node session: a matchmaker and a host outside, the unit's daemon as the worker.
    Its TensorFlow job runs under the unit's hardening (NoNewPrivs, the seccomp filter, no
    capabilities, read-only /usr, private /tmp — checked in the daemon's and the job's
    /proc/PID) and trains: the host gets its model. Then a second session, and `systemctl stop`
    in the middle of training leaves no job or TensorFlow process and an empty cgroup.
    (A drop-in gives the unit normal CPU priority: under SCHED_IDLE a busy test machine could
    starve the worker for minutes; the hardening is untouched.)"""
    from crowdd.cli.demo import Crowd, node_config
    from crowdd.client.control import ControlClient

    crowd = Crowd(tmp_path / "crowd", 0, extra_config="[replication]\nstall_timeout = 5.0\n")
    config = node_config(crowd.matchmaker_addr, "unit-worker", 10, *crowd.job_settings,
                         fingerprint=crowd.matchmaker_fingerprint) + "[replication]\nstall_timeout = 5.0\n"
    service = "Nice=10\nCPUSchedulingPolicy=other\nIOSchedulingClass=best-effort\nCPUWeight=100\n"
    data = tmp_path / "digits.npz"
    from crowdd.data.datasets import load_digits
    import numpy as np

    a = load_digits()
    np.savez(data, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test, y_test=a.y_test)
    job = {"workers": 1, "min_workers": 1, "wait": 60.0, "epochs": 4, "learning_rate": 0.1, "sharding": "full"}

    def unit_status(c: Container) -> dict[str, Any]:
        return dict(json.loads(c.run(str(crowdd_bin), "status", "--json", "--socket", SOCK).stdout))

    def job_pids(c: Container) -> list[int]:
        out = c.run("ps", "-eo", "pid=,args=", check=False).stdout
        return [int(line.split()[0]) for line in out.splitlines() if "crowdd.job" in line]

    async def host() -> None:
        async with ControlClient(crowd.host.socket) as cl:
            assert (await cl.host(str(data), job))["type"] == "ok"

    with Container(tmp_path / "boot", setup=system_setup(crowdd_bin, service=service, config=config)) as c:
        crowd.start()
        try:
            asyncio.run(crowd.wait_up())
            c.systemctl("start", "crowdd")
            c.run(str(crowdd_bin), "donate", "on", "--socket", SOCK)
            _hardened(c.host_pid(main_pid(c)))
            asyncio.run(host())
            pids = wait_for("the worker's job", lambda: job_pids(c), 120, every=0.3)
            for pid in pids:
                _hardened(c.host_pid(pid), job=True)

            async def host_result() -> dict[str, Any]:
                async with ControlClient(crowd.host.socket) as cl:
                    deadline = time.monotonic() + 180
                    while time.monotonic() < deadline:
                        st = await cl.status()
                        if st.get("result"):
                            return dict(st["result"])
                        if st.get("error"):
                            raise AssertionError(f"the host failed: {st['error']}")
                        await asyncio.sleep(0.5)
                raise AssertionError("no result from the host")

            result = asyncio.run(host_result())
            at_least(result["test_accuracy"], ACCURACY_THRESHOLD)
            # donation is on: after the session the worker queues again at once
            wait_for("the worker free again", lambda: unit_status(c).get("state") in ("standby", "registering", "waiting"), 60)
            assert job_pids(c) == []

            # a second session, stopped in the middle of training by systemctl stop
            asyncio.run(host())
            wait_for("the second job", lambda: job_pids(c) and unit_status(c).get("state") == "training", 120, 0.3)
            c.systemctl("stop", "crowdd")
            assert c.systemctl("is-active", "crowdd", check=False).stdout.strip() == "inactive"
            assert c.show("crowdd", "Result")["Result"] == "success"
            assert job_pids(c) == []
            procs = c.run("sh", "-c", "cat /sys/fs/cgroup/system.slice/crowdd.service/cgroup.procs 2>/dev/null",
                          check=False).stdout
            assert procs.strip() == ""
            assert not [p for p in c.run("ps", "-eo", "user=", check=False).stdout.split() if p == "crowdd"]
        finally:
            crowd.close()


# --------------------------------------------------------------------------- the user unit


def test_the_user_unit_with_systemctl_user(crowdd_bin: Path, tmp_path: Path) -> None:
    """packaging/systemd/user/crowdd.service, installed as docs/install.md says (the unit in
    ~/.config/systemd/user, crowdd in ~/.local/bin), runs under alice's own service manager:
    `systemctl --user start` returns once it is READY, `crowdd status` finds it with no options,
    it runs with NoNewPrivs and the architecture filter, logs to its file, and stops clean.
    (A real login starts the manager as user@UID.service through logind; logind and D-Bus are
    not booted here, so the test starts the same `systemd --user` as a transient unit with a
    delegated cgroup, which is what user@.service gives it.)"""
    q = shlex.quote
    unit = UNITS / "user" / "crowdd.service"
    setup = [
        *deps_steps(crowdd_bin),
        "mount -t tmpfs -o mode=0755 tmpfs /home",
        "useradd -m alice",
        f"runuser -u alice -- install -Dm644 {q(str(unit))} /home/alice/.config/systemd/user/crowdd.service",
        f"runuser -u alice -- sh -c 'mkdir -p ~/.local/bin && ln -s {q(str(crowdd_bin))} ~/.local/bin/crowdd'",
    ]
    with Container(tmp_path, setup=setup) as c:
        uid = c.run("id", "-u", "alice").stdout.strip()
        runtime = f"/run/user/{uid}"
        c.run("sh", "-c", f"mkdir -p -m 0755 /run/user && install -d -m 0700 -o alice -g alice {runtime}")
        c.run("systemd-run", "--unit=user-manager-alice", "-p", "DefaultDependencies=no", "-p", "Type=notify",
              "-p", "Delegate=yes", "--uid=alice", f"--setenv=XDG_RUNTIME_DIR={runtime}",
              "--setenv=HOME=/home/alice", str(SYSTEMD), "--user")
        env = {"XDG_RUNTIME_DIR": runtime, "HOME": "/home/alice"}

        def user(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return c.run("runuser", "-u", "alice", "--", *cmd, check=check, env=env)

        user("systemctl", "--user", "start", "crowdd")
        props = dict(line.split("=", 1) for line in user(
            "systemctl", "--user", "show", "crowdd", "-p", "ActiveState", "-p", "StatusText", "-p", "MainPID",
            "-p", "Type", "-p", "Documentation").stdout.splitlines())
        # Documentation= names where pipx puts the docs (the wheel ships them), %h expanded
        assert props["Documentation"] == "file:///home/alice/.local/share/pipx/venvs/crowdd/share/doc/crowdd/install.md"
        assert props["ActiveState"] == "active" and props["Type"] == "notify", props
        assert props["StatusText"].startswith("off"), props
        st = user(str(crowdd_bin), "status")  # the per-user socket in $XDG_RUNTIME_DIR/crowdd
        assert "crowdd 0.1.0: off" in st.stdout or ": off" in st.stdout, st.stdout
        status = proc_status(c.host_pid(int(props["MainPID"])))
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        logs = user(str(crowdd_bin), "logs")
        assert "crowdd daemon" in logs.stdout and "ready" in logs.stdout, logs.stderr
        user("systemctl", "--user", "stop", "crowdd")
        assert user("systemctl", "--user", "is-active", "crowdd", check=False).stdout.strip() == "inactive"
        assert "crowdd daemon" not in c.run("ps", "-eo", "args=").stdout
