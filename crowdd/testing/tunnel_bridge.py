"""The group's tunnels between job processes on one machine, without daemons (benchmarks).

:class:`TunnelBridge` runs, in its own thread and event loop, the daemon's tunnel ends
(:class:`crowdd.node.tunnels.HostTunnels` and one :class:`WorkerTunnels` per worker) joined
by real TLS 1.3 connections pinned to per-member identities (:class:`crowdd.trust.group_tls.
GroupTLS`), so a benchmark measures TF traffic on exactly the path a session's takes: job →
relay (in the job's network namespace) → Unix socket → TLS → Unix socket → relay → job. What
is left out is the session channel: a worker is asked to dial back by a direct call instead of
a ``dial`` frame, and a stream's first frame is a bare hello instead of the token handshake
(both happen once per connection, not per byte).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from crowdd import wire
from crowdd.trust.group_tls import GroupTLS
from crowdd.hyperparams import GroupSettings, Job
from crowdd.trust.identity import Identity
from crowdd.node.tunnels import HostTunnels, RelaySetup, WorkerTunnels, task_name
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.trust.tls import peer_fingerprint


def plan_for(identities: list[Identity], index: int) -> SessionPlan:
    members = tuple(
        PlanMember(i, "host" if i == 0 else "worker", f"m{i}", "127.0.0.1", MemberPorts(1, 1, (1,)),
                   cert=ident.cert_pem, fingerprint=ident.fingerprint)
        for i, ident in enumerate(identities)
    )
    return SessionPlan("bench", "t" * 32, index, members, Job(), DatasetRef("0" * 64, 0, "bench"), GroupSettings())


class TunnelBridge:
    """Host + ``workers`` workers' tunnel ends; ``relays(base)`` says what each job's relay
    serves and reaches for the cluster at ports ``base``.. (see :func:`crowdd.node.host.cluster_spec`)."""

    def __init__(self, workers: int, *, isolated: bool = True) -> None:
        self.workers = workers
        self.isolated = isolated
        self._tmp = tempfile.TemporaryDirectory(prefix="crowdd-bridge-")
        ids = [Identity.load_or_create(Path(self._tmp.name), f"m{i}") for i in range(workers + 1)]
        self._tls = [GroupTLS(ids[i], plan_for(ids, i)) for i in range(workers + 1)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tunnel-bridge", daemon=True)
        self._thread.start()
        self.host: HostTunnels = self._call(self._make_host())
        self.worker_ends: list[WorkerTunnels] = [
            self._call(self._make_worker(j)) for j in range(1, workers + 1)
        ]

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    async def _make_host(self) -> HostTunnels:
        host = HostTunnels(dial=self._dial)
        tls = self._tls[0]

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            hello = await wire.read_frame(r, timeout=10)
            index = hello.get("index")
            if not isinstance(index, int) or tls.member_of(w) != index:
                w.close()
                return
            await host.accept(index, hello, (r, w))

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls.server())
        self._port = self._server.sockets[0].getsockname()[1]
        return host

    async def _make_worker(self, j: int) -> WorkerTunnels:
        tls = self._tls[j]

        async def connect(hello: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            r, w = await asyncio.open_connection("127.0.0.1", self._port, ssl=tls.client(0))
            assert peer_fingerprint(w) == tls.fingerprints[0]
            await wire.write_frame(w, {"type": "tunnel", "index": j, **hello})
            return r, w

        return WorkerTunnels(connect=connect)

    def _dial(self, member: int, stream: int, task: int) -> bool:
        self.worker_ends[member - 1].on_dial(stream, task)
        return True

    def relays(self, base: int) -> list[RelaySetup]:
        """Member i's relay, once the tunnels listen (call before starting the jobs)."""
        tasks: dict[int, int | None] = {j: j for j in range(1, self.workers + 1)}
        self._call(self.host.reach_workers(tasks))
        for j, end in enumerate(self.worker_ends, 1):
            end.serve(j)
        out = [RelaySetup(self.host.directory, ((task_name(0), base),),
                          tuple((task_name(j), base + j) for j in tasks), self.isolated)]
        out += [RelaySetup(end.directory, ((task_name(j), base + j),), (), self.isolated)
                for j, end in enumerate(self.worker_ends, 1)]
        return out

    def cut(self, member: int) -> None:
        """Take worker ``member`` out as its host daemon does (:meth:`HostTunnels.cut`)."""

        async def cut() -> None:
            self.host.cut(member)

        self._call(cut())

    def restore(self, member: int) -> None:
        async def restore() -> None:
            self.host.restore(member)

        self._call(restore())

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for end in (self.host, *self.worker_ends):
                await end.close()

        self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._tmp.cleanup()


__all__ = ["TunnelBridge", "plan_for"]
