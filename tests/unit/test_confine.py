"""The job's private network (crowdd.job.confine under unshare): its TF-like servers answer
only through the relay's Unix sockets, and reach other members only through the daemon's."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crowdd.node.tunnels import RelaySetup, socket_dir
from crowdd.platform.userns import confined, probe

pytestmark = pytest.mark.skipif(not probe().available, reason=f"cannot confine here: {probe().reason}")

# A stand-in job: an echo server on 0.0.0.0:PORT (as a TF server binds), and one connection
# to 127.0.0.1:REACH whose answer it prints.
JOB = textwrap.dedent("""
    import socket, sys, threading
    port, reach = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    def serve():
        while True:
            c, _ = srv.accept()
            c.sendall(b"echo:" + c.recv(100)); c.close()
    threading.Thread(target=serve, daemon=True).start()
    sys.stdin.readline()
    try:
        with socket.create_connection(("127.0.0.1", reach), timeout=10) as c:
            c.sendall(b"hi from the job")
            print("reply", c.recv(100).decode(), flush=True)
    except OSError as exc:
        print("refused", exc, flush=True)
    sys.stdin.readline()
""")


def _start(directory: Path, *, isolated: bool, port: int, reach: int) -> subprocess.Popen[str]:
    relay = RelaySetup(directory, (("job", port),), (("peer", reach),), isolated=isolated)
    argv = [sys.executable, "-m", "crowdd.job.confine", *relay.argv(), "--", sys.executable, "-c", JOB, str(port), str(reach)]
    return subprocess.Popen(confined(argv) if isolated else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[str], directory: Path) -> None:
    """As the supervisor does: the whole process group (relay, job) goes."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


async def _exchange(path: Path, data: bytes) -> bytes:
    r, w = await asyncio.open_unix_connection(str(path))
    w.write(data)
    await w.drain()
    out = await asyncio.wait_for(r.read(100), 10)
    w.close()
    return out


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports the kernel hands out on this host (free when asked)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_an_unconfined_job_s_port_is_open_on_the_host(tmp_path: Path) -> None:
    """The control for the test below: the same job and relay without the namespace."""
    directory = socket_dir()
    port, reach = free_ports(2)
    proc = _start(directory, isolated=False, port=port, reach=reach)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"in")
            assert c.recv(100) == b"echo:in"
    finally:
        _stop(proc, directory)


def test_confined_job_is_reachable_only_through_its_relay(tmp_path: Path) -> None:
    directory = socket_dir()
    peer_path = directory / "peer.out"
    port, reach = free_ports(2)
    proc = _start(directory, isolated=True, port=port, reach=reach)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"

        async def scenario() -> str:
            got: list[bytes] = []

            async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                got.append(await r.read(100))
                w.write(b"hello job")
                await w.drain()
                w.close()

            server = await asyncio.start_unix_server(peer, path=str(peer_path))
            # in: the daemon's end of the job's server
            assert await _exchange(directory / "job.in", b"ping") == b"echo:ping"
            # out: the job reaches a "remote task" through the daemon's socket
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
            server.close()
            assert got == [b"hi from the job"]
            return line.strip()

        assert asyncio.run(scenario()) == "reply hello job"
        # The attacker's view: the port the job's server listens on is closed on this host.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        _stop(proc, directory)


def test_relay_refuses_when_nothing_serves(tmp_path: Path) -> None:
    """A connection to a task whose server is not up (or whose tunnel is not open) is closed,
    and the relay goes on serving."""
    directory = socket_dir()
    port, reach = free_ports(2)
    proc = _start(directory, isolated=True, port=port, reach=reach)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()  # the job dials the peer, whose tunnel is not open: refused

        async def after() -> bytes:
            return await _exchange(directory / "job.in", b"still")

        assert asyncio.run(after()) == b"echo:still"
    finally:
        _stop(proc, directory)


def test_the_job_goes_when_its_relay_does(tmp_path: Path) -> None:
    """The job lives in its own network namespace, where no netns teardown would find it: when
    the relay process dies (the daemon died, say), the kernel kills the job too."""
    import psutil

    directory = socket_dir()
    relay = RelaySetup(directory, (), (), isolated=True)
    argv = [sys.executable, "-m", "crowdd.job.confine", *relay.argv(), "--", sys.executable, "-c",
            "import os, time; print(os.readlink('/proc/self'), flush=True); time.sleep(600)"]
    proc = subprocess.Popen(confined(argv), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        job = psutil.Process(int(proc.stdout.readline()))
        proc.kill()  # the relay alone, not its process group
        proc.wait(10)
        job.wait(10)  # raises TimeoutExpired if the job outlived its relay
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_process_that_leaves_the_job_still_goes_with_its_relay_and_is_known_by_its_pid(tmp_path: Path) -> None:
    """A graph's process double-forks and calls ``setsid()``: out of the job's process group and
    parentage, it is still in the job's PID namespace, whose init is the relay; when the relay
    dies, it dies. The pids a job reports (``host_pid``) name its processes outside."""
    import psutil

    directory = socket_dir()
    relay = RelaySetup(directory, (), (), isolated=True)
    escape = ("import os, sys, time\n"
              "from crowdd.platform.process import host_pid\n"
              "r, w = os.pipe()\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              "    if os.fork() == 0:\n"
              "        os.write(w, str(host_pid()).encode()); time.sleep(600)\n"
              "    os._exit(0)\n"
              "os.wait()\n"
              "print(host_pid(), os.read(r, 20).decode(), flush=True); time.sleep(600)\n")
    argv = [sys.executable, "-m", "crowdd.job.confine", *relay.argv(), "--", sys.executable, "-c", escape]
    proc = subprocess.Popen(confined(argv), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        job_pid, orphan_pid = map(int, proc.stdout.readline().split())
        job, orphan = psutil.Process(job_pid), psutil.Process(orphan_pid)
        assert "-c" in job.cmdline() and "-c" in orphan.cmdline()  # the pids name them out here
        assert os.getpgid(orphan_pid) != os.getpgid(job_pid) and orphan.ppid() != job_pid  # it left
        proc.kill()  # unshare alone: the relay goes with it (--kill-child), and the namespace with the relay
        proc.wait(10)
        job.wait(10)
        orphan.wait(10)  # raises TimeoutExpired if it outlived its job
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# What a job's process sees of the machine: every pid in /proc, whether a volunteer's program
# (by a secret in its command line) is among them, the host name, the user names.
LOOK = textwrap.dedent("""
    import json, os, socket, sys
    secret = sys.stdin.read().strip()  # not on its own command line
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    seen = False
    for p in pids:
        try:
            seen = seen or secret.encode() in open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            pass
    users = [line.split(":")[0] for line in open("/etc/passwd")]
    print(json.dumps({"pids": len(pids), "seen": seen, "host": socket.gethostname(), "users": users}), flush=True)
""")


def _look(directory: Path, private: bool, secret: str) -> dict[str, object]:
    import json

    relay = RelaySetup(directory, (), (), isolated=True, private_view=private)
    argv = [sys.executable, "-m", "crowdd.job.confine", *relay.argv(), "--", sys.executable, "-c", LOOK]
    done = subprocess.run(confined(argv, private_view=private), input=secret, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not probe().private_view, reason=f"no private view here: {probe().view_reason}")
def test_a_job_sees_its_own_processes_host_name_and_users_not_the_machines(tmp_path: Path) -> None:
    """A volunteer's program with a secret on its command line runs beside the job: with the
    private view the job's /proc holds only its own processes, its host name and users are
    made up. The control: confined without it, the same look finds the program, the machine's
    name and its users."""
    import uuid

    secret = f"volunteers-secret-{uuid.uuid4().hex}"
    program = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", secret])
    try:
        control = _look(socket_dir(tmp_path), False, secret)
        assert control["seen"] is True and control["host"] == socket.gethostname(), control
        got = _look(socket_dir(tmp_path), True, secret)
    finally:
        program.kill()
        program.wait()
    assert got["seen"] is False and 0 < int(got["pids"]) <= 3, got  # the relay, the job
    assert got["host"] == "crowdd-job" and got["users"] == ["root", "nobody"], got
    assert control["users"] != got["users"]
    assert not list(tmp_path.glob("**/view/*")), "the view's files are left in the relay directory"
