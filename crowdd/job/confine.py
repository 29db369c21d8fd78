"""``python -m crowdd.job.confine`` — the job's private network, from inside it.

The launcher starts this under ``unshare --user --map-root-user --net`` (see
:mod:`crowdd.platform.userns`). It brings ``lo`` up, then relays between the namespace's
loopback and path-based Unix sockets in ``--dir`` (which cross network namespaces), then runs
the job (the argv after ``--``) as its child and exits with the job's exit code:

- ``--serve NAME=PORT``: a TF server of this job listens on ``PORT`` in here; the daemon
  reaches it by connecting to ``DIR/NAME.in`` (each connection is relayed to 127.0.0.1:PORT).
- ``--reach NAME=PORT``: a TF task of another member; a connection to 127.0.0.1:PORT in here
  is relayed to ``DIR/NAME.out``, where the daemon carries it over a TLS tunnel to that member.

Every TF address of the job is 127.0.0.1, so nothing in here faces any network: the only way
in or out is the daemon's end of those Unix sockets. Without ``--isolated`` (a machine that
cannot confine jobs, ``[security] allow_exposed_tensorflow``) the same relay runs on the real
loopback and the TF servers are exposed.

With ``--sandbox`` the job (and every TF server it starts) runs under the Landlock policy
of :mod:`crowdd.platform.sandbox`: read-only runtime and ``--data``, read-write ``--workdir``,
TCP bind only to the ``--serve`` ports (and ``--own`` ones), connect only to those and the
``--reach`` ones; no capabilities, ``no_new_privs``; and, in a new user namespace, no nested
one. ``--guard DIR`` names a directory (the daemon's state) no runtime path may expose.

The relay runs in this process (no TensorFlow here, so it never waits behind TF's GIL use).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from crowdd.aio import spawn_tracked, splice
from crowdd.platform import sandbox
from crowdd.platform.process import die_with_parent, exit_with_parent
from crowdd.platform.userns import loopback_up, private_view

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
EXIT_SETUP = 70


def _pair(value: str) -> tuple[str, int]:
    name, _, port = value.partition("=")
    if not name.replace("-", "").isalnum() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected NAME=PORT, got {value!r}")
    return name, int(port)


class Relay:
    """The in-namespace ends of the tunnels (see the module doc)."""

    def __init__(self, directory: Path, serve: Sequence[tuple[str, int]], reach: Sequence[tuple[str, int]]) -> None:
        self.dir = directory
        self.serve = list(serve)
        self.reach = list(reach)
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for name, port in self.serve:
            path = self.dir / f"{name}.in"
            path.unlink(missing_ok=True)
            self._servers.append(await asyncio.start_unix_server(self._inbound(port), path=str(path)))
        for name, port in self.reach:
            self._servers.append(await asyncio.start_server(self._outbound(self.dir / f"{name}.out"), LOOPBACK, port))

    def _inbound(self, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        return lambda r, w: self._track(self._to_tcp(r, w, port))

    def _outbound(self, path: Path) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        return lambda r, w: self._track(self._to_unix(r, w, path))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn_tracked(self._tasks, coro)

    async def _to_tcp(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int) -> None:
        try:
            peer = await asyncio.open_connection(LOOPBACK, port)
        except OSError as exc:
            log.info("relay: nothing serves port %d yet (%s)", port, exc.strerror)
            w.close()
            return
        await splice((r, w), peer)

    async def _to_unix(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, path: Path) -> None:
        try:
            peer = await asyncio.open_unix_connection(str(path))
        except OSError as exc:
            log.info("relay: the tunnel %s is not open (%s)", path.name, exc.strerror)
            w.close()
            return
        await splice((r, w), peer)


def _run_relay(relay: Relay, ready: threading.Event, failed: list[BaseException]) -> None:
    async def main() -> None:
        try:
            await relay.start()
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            return
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port, got {value!r}")
    return int(value)


def _die_with_us() -> None:
    die_with_parent(signal.SIGKILL)


def _sandboxed(prepared: sandbox.SandboxRules) -> Callable[[], None]:
    def enter() -> None:
        die_with_parent(signal.SIGKILL)
        prepared.enforce()

    return enter


def _prepare_sandbox(args: argparse.Namespace) -> sandbox.SandboxRules:
    """The job's Landlock ruleset from the arguments (raises :class:`sandbox.SandboxError`)."""
    serve = [port for _, port in args.serve] + list(args.own)
    policy = sandbox.job_policy(
        args.workdir, args.data, bind=serve, connect=serve + [port for _, port in args.reach], guarded=args.guard,
    )
    prepared = sandbox.prepare(policy)
    log.info("sandbox: Landlock ABI %d; %s", prepared.abi, policy.describe())
    if policy.skipped:
        log.warning("sandbox: left out of the job's reach: %s", ", ".join(policy.skipped))
    return prepared


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args_list:
        print("usage: python -m crowdd.job.confine --dir DIR [--serve N=P]... [--reach N=P]... -- JOB ARGV", file=sys.stderr)
        return 2
    cut = args_list.index("--")
    p = argparse.ArgumentParser(prog="python -m crowdd.job.confine")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--serve", action="append", type=_pair, default=[])
    p.add_argument("--reach", action="append", type=_pair, default=[])
    p.add_argument("--isolated", action="store_true", help="this is a new network namespace: bring lo up")
    p.add_argument("--private-view", action="store_true",
                   help="with --isolated, in new mount and UTS namespaces too: the job's own /proc, host name, passwd")
    p.add_argument("--sandbox", action="store_true", help="run the job under Landlock (crowdd.platform.sandbox)")
    p.add_argument("--workdir", type=Path, help="the job's read-write directory (with --sandbox)")
    p.add_argument("--data", type=Path, help="the job's dataset file, read-only (with --sandbox)")
    p.add_argument("--own", action="append", type=_port, default=[], help="another TCP port the job binds")
    p.add_argument("--guard", action="append", type=Path, default=[], help="a directory kept out of reach")
    args = p.parse_args(args_list[:cut])
    if args.sandbox and args.workdir is None:
        p.error("--sandbox needs --workdir")
    job_argv = args_list[cut + 1:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[relay] %(message)s")
    exit_with_parent(os.getppid())  # entering the user namespace cleared the launcher's death signal
    if args.isolated:
        try:
            loopback_up()
        except OSError as exc:
            print(f"cannot bring up the job's loopback: {exc}", file=sys.stderr)
            return EXIT_SETUP
        if args.private_view:  # before the sandbox: its rules name the job's own /proc and /etc files
            scratch = args.dir / "view"
            try:
                scratch.mkdir(exist_ok=True)
                problems = private_view(str(scratch))
            except OSError as exc:
                problems = [f"cannot make the job's view private: {exc}"]
            for problem in problems:
                log.warning("private view: %s", problem)
        if args.sandbox and (why := sandbox.close_nested_user_namespaces()) is not None:
            log.warning("sandbox: %s", why)
    prepared: sandbox.SandboxRules | None = None
    if args.sandbox:
        try:
            prepared = _prepare_sandbox(args)
        except (sandbox.SandboxError, OSError) as exc:
            print(f"cannot sandbox the job: {exc}", file=sys.stderr)
            return EXIT_SETUP
    relay = Relay(args.dir, args.serve, args.reach)
    ready = threading.Event()
    failed: list[BaseException] = []
    threading.Thread(target=_run_relay, args=(relay, ready, failed), name="relay", daemon=True).start()
    ready.wait()
    if failed:
        print(f"cannot start the job's relay: {failed[0]}", file=sys.stderr)
        return EXIT_SETUP
    # the job goes with this process (the daemon's death reaches us through exit_with_parent;
    # the job is in another network namespace, where nothing else would ever reap it)
    enter = _die_with_us if prepared is None else _sandboxed(prepared)
    env = None
    if prepared is not None:  # libraries look for their settings in ~ (Keras: ~/.keras): the job's own
        env = {**os.environ, "HOME": str(args.workdir), "KERAS_HOME": str(args.workdir / ".keras")}
    try:
        child = subprocess.Popen(job_argv, preexec_fn=enter, env=env)  # noqa: PLW1509 - system calls only
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"cannot start the job{' in its sandbox' if prepared else ''}: {exc}", file=sys.stderr)
        return EXIT_SETUP
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
