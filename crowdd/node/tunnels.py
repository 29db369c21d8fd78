"""The daemon's ends of the group's TLS tunnels, which carry every TensorFlow connection.

A job's TF servers live in its private network namespace (:mod:`crowdd.job.confine`); the
only way in or out is a pair of Unix sockets per TF task in the session's socket directory:
``NAME.in`` (the job serves it; connecting reaches that TF server) and ``NAME.out`` (the
daemon serves it; the job connects to reach another member's task). The daemon carries each
connection over one TLS stream on the host's session port (mutual TLS pinned to the group,
plus the group token; :class:`crowdd.node.session.HostSession` checks both), so:

- TF traffic flows one way: only the host's coordinator opens TF connections. A worker's
  job has no ``.out`` socket at all (its relay reaches nothing), and the host refuses every
  tunnel stream a worker opens unless the host asked for it (a dial-back, below). There is no
  parameter server to reach: the coordinator holds the model.
- The host's coordinator reaches worker task ``t``: the host's job connects to ``wT.out``; the
  host daemon asks that worker over the session channel to dial back (:class:`Dial`, a stream
  id); the worker dials the host (``{"tunnel": "stream", "stream": id}``) and connects the
  stream to its job's ``wT.in``. Workers only ever dial out: none needs an inbound port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crowdd.aio import cancel_and_wait, spawn_tracked, splice

logger = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: How long the host waits for a worker to dial back a requested stream.
DIAL_TIMEOUT = 20.0


def task_name(task: int) -> str:
    """The relay name of TF worker task ``task``."""
    return f"w{task}"


@dataclass(frozen=True)
class RelaySetup:
    """What the job's relay serves and reaches (see :mod:`crowdd.job.confine`)."""

    directory: Path
    serve: tuple[tuple[str, int], ...]
    reach: tuple[tuple[str, int], ...]
    isolated: bool = True
    private_view: bool = False  # with isolated: mount and UTS namespaces too (userns.private_view)

    def argv(self) -> list[str]:
        out = ["--dir", str(self.directory)]
        out += [a for name, port in self.serve for a in ("--serve", f"{name}={port}")]
        out += [a for name, port in self.reach for a in ("--reach", f"{name}={port}")]
        out += ["--isolated"] if self.isolated else []
        return out + (["--private-view"] if self.isolated and self.private_view else [])


SOCKET_PREFIX = "tun-"
# a socket path has at most 107 bytes: BASE + "/tun-XXXXXXXX" + "/w999.out"
SOCKET_BASE_MAX = 107 - len(f"/{SOCKET_PREFIX}XXXXXXXX/w999.out")


def socket_dir(base: Path | None = None) -> Path:
    """A fresh private (0700) directory for a job's relay sockets: below ``base`` (the
    daemon's runtime directory, which goes with it even when it is killed) when its path is
    short enough, else in the temporary directory (a socket path must fit in 108 bytes)."""
    if base is not None and len(str(base)) <= SOCKET_BASE_MAX:
        try:
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX, dir=base))
        except OSError as exc:
            logger.info("tunnel sockets: cannot use %s (%s); using the temporary directory", base, exc.strerror)
    return Path(tempfile.mkdtemp(prefix="crowdd-"))


def remove_stale_socket_dirs(base: Path) -> None:
    """Remove the relay socket directories a killed daemon left in its runtime directory."""
    for d in base.glob(f"{SOCKET_PREFIX}*"):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)


async def _open_in(directory: Path, name: str) -> Streams | None:
    try:
        return await asyncio.open_unix_connection(str(directory / f"{name}.in"))
    except OSError as exc:
        logger.info("tunnel: the job does not serve %s (%s)", name, exc.strerror or exc)
        return None


@dataclass
class _Base:
    directory: Path = field(default_factory=socket_dir)
    _servers: list[asyncio.base_events.Server] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def _listen(self, name: str, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        path = self.directory / f"{name}.out"
        path.unlink(missing_ok=True)
        self._servers.append(await asyncio.start_unix_server(
            lambda r, w: self._spawn(handler(r, w)), path=str(path)))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        spawn_tracked(self._tasks, run())

    async def close(self) -> None:
        for s in self._servers:
            s.close()
        await cancel_and_wait(*self._tasks)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class HostTunnels(_Base):
    """The host's ends. ``dial(member, stream, task)`` asks a worker (over its session channel)
    to dial stream ``stream`` back for task ``task``; False if it cannot be asked."""

    dial: Callable[[int, int, int], bool] = lambda member, stream, task: False
    timeout: float = DIAL_TIMEOUT
    _pending: dict[int, tuple[int, asyncio.Future[Streams]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _slots: dict[int, int | None] = field(default_factory=dict)
    _cut: set[int] = field(default_factory=set)
    _active: dict[int, set[asyncio.Task[Any]]] = field(default_factory=dict)

    def cut(self, member: int) -> None:
        """Take worker ``member`` out of training now: close every TF connection carried to or
        from it and refuse new ones until :meth:`restore`. A call from the host's coordinator
        to a frozen machine then fails at once instead of hanging."""
        self._cut.add(member)
        tasks = self._active.pop(member, set())
        for t in tasks:
            t.cancel()
        if tasks:
            logger.info("tunnel: cut %d connection(s) of worker %d", len(tasks), member)

    def restore(self, member: int) -> None:
        """Let worker ``member``'s TF connections through again."""
        self._cut.discard(member)

    def is_cut(self, member: int) -> bool:
        return member in self._cut

    async def _carry(self, member: int, a: Streams, b: Streams) -> None:
        """Splice two connections of worker ``member``'s; :meth:`cut` ends it."""
        task = asyncio.current_task()
        assert task is not None
        if member in self._cut:
            for _, w in (a, b):
                w.close()
            return
        self._active.setdefault(member, set()).add(task)
        try:
            await splice(a, b)
        finally:
            self._active.get(member, set()).discard(task)

    async def reach_workers(self, tasks: dict[int, int | None]) -> None:
        """Serve ``wT.out`` for each worker task (slot) in ``tasks``, mapped to the member
        index that holds it (None: a free slot, whose connections are closed at once).
        :meth:`assign` changes a slot's member."""
        self._slots = dict(tasks)
        for task in tasks:
            await self._listen(task_name(task), self._outbound(task))

    def assign(self, task: int, member: int | None) -> None:
        """Slot ``task`` now belongs to ``member`` (a newcomer), or to nobody."""
        old = self._slots.get(task)
        if old is not None and old != member:
            self.cut(old)
        self._slots[task] = member

    def _outbound(self, task: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            member = self._slots.get(task)
            if member is None or member in self._cut:
                w.close()
                return
            stream = await self.open_stream(member, task)
            if stream is None:
                w.close()
                return
            await self._carry(member, (r, w), stream)

        return handle

    async def open_stream(self, member: int, task: int) -> Streams | None:
        """Ask worker ``member`` to dial back a stream for its task ``task``; wait for it."""
        stream = next(self._ids)
        fut: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()
        self._pending[stream] = (member, fut)
        try:
            if not self.dial(member, stream, task):
                return None
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            logger.warning("worker %d did not dial back tunnel stream %d within %.0f s", member, stream, self.timeout)
            return None
        finally:
            self._pending.pop(stream, None)

    async def probe(self, member: int, task: int) -> bool:
        """Whether worker ``member`` can dial this host's tunnel port now."""
        streams = await self.open_stream(member, task)
        if streams is None:
            return False
        streams[1].close()
        return True

    async def accept(self, member: int, hello: dict[str, Any], streams: Streams) -> None:
        """An authenticated tunnel connection from worker ``member``: only a stream this host
        asked it to dial back is taken; anything else a worker opens is refused."""
        kind = hello.get("tunnel")
        stream = hello.get("stream")
        pending = self._pending.get(stream) if isinstance(stream, int) and not isinstance(stream, bool) else None
        if kind != "stream" or pending is None or pending[0] != member or pending[1].done():
            logger.warning("tunnel: refused an unrequested stream %r from worker %d", stream, member)
            streams[1].close()
            return
        pending[1].set_result(streams)


@dataclass
class WorkerTunnels(_Base):
    """A worker's ends. ``connect(hello)`` opens an authenticated TLS stream to the host."""

    connect: Callable[[dict[str, Any]], Awaitable[Streams]] | None = None
    task: int | None = None

    def serve(self, task: int) -> None:
        """This worker's job is TF worker ``task``: connect the host's streams for ``task``
        (and no other) to the job. The job reaches nothing: no ``.out`` socket is served."""
        self.task = task

    async def _dial_host(self, hello: dict[str, Any]) -> Streams | None:
        assert self.connect is not None
        try:
            return await self.connect(hello)
        except Exception as exc:  # any failure ends this one stream; TF retries
            logger.warning("tunnel: cannot dial the host: %s", exc)
            return None

    def on_dial(self, stream: int, task: int) -> None:
        """The host asked for stream ``stream`` to this worker's task ``task``."""
        self._spawn(self._dial_back(stream, task))

    async def _dial_back(self, stream: int, task: int) -> None:
        host = await self._dial_host({"tunnel": "stream", "stream": stream})
        if host is None:
            return
        job = await _open_in(self.directory, task_name(task)) if task == self.task else None
        if job is None:  # a probe before the job runs, the job is gone, or not this worker's task
            host[1].close()
            with contextlib.suppress(Exception):
                await host[1].wait_closed()
            return
        await splice(host, job)


__all__ = ["DIAL_TIMEOUT", "HostTunnels", "RelaySetup", "WorkerTunnels", "remove_stale_socket_dirs", "socket_dir",
           "task_name"]
