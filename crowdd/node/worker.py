"""A worker's side of a session: follow the host — report over the session channel, fetch
the manifest, replicate the dataset from the group along the host's route, start the TF
server when the host says ``train``, and stop when the host ends the session (or goes away)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from crowdd import replication as rep
from crowdd import wire
from crowdd.trust.auth import AuthError
from crowdd.errors import SessionFailed
from crowdd.trust.group_tls import GroupTLS
from crowdd.data.manifest import Manifest, ManifestError
from crowdd.node import disk
from crowdd.node.context import SessionContext
from crowdd.node.ports import Reservation
from crowdd.node.session import HostLost, SessionRefused, WorkerSession, dead_after
from crowdd.node.states import State
from crowdd.node.tunnels import WorkerTunnels, socket_dir, task_name
from crowdd.node.status import PROGRESS_INTERVAL
from crowdd.aio import cancel_and_wait
from crowdd.plan import SessionPlan
from crowdd.protocol.session import Dial, End, HostMessage, MembersUpdate, Train, TrainingEvent


async def follow(c: SessionContext, plan: SessionPlan, res: Reservation) -> None:
    """Follow one session (:class:`WorkerRun`)."""
    c.to(State.REPLICATING)
    await WorkerRun(c, plan, res).run()


class WorkerRun:
    """One session this worker follows, from the host's manifest to the host's ``end``.

    The steps, in :meth:`run`: connect to the host's session, replicate the dataset along the
    host's route (serving it on to the others), wait for ``train``, run the TF server until the
    host ends the session, rejoining the slot if the channel breaks meanwhile. The cycle's
    handle (``c.handle``) carries the volunteer's away/back to the host while the channel is up.
    """

    def __init__(self, c: SessionContext, plan: SessionPlan, res: Reservation) -> None:
        self.c, self.plan, self.res = c, plan, res
        self.view = c.view
        d = c.cfg.daemon
        self.train: asyncio.Future[Train] = asyncio.get_running_loop().create_future()
        self.tls = GroupTLS(c.identity, plan)
        self.ws = WorkerSession(plan, tls=self.tls, heartbeat=d.heartbeat,
                                dead_after=dead_after(d.heartbeat, d.peer_timeout), on_message=self.on_message)
        self.tunnels = WorkerTunnels(directory=socket_dir(c.runtime_dir), connect=self.ws.open_stream)
        self.store: rep.ChunkStore | None = None
        self.server: rep.DataServer | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.workdir: Path | None = None
        self._progress = (0.0, (-1, -1))  # when and what was last reported

    def on_message(self, msg: HostMessage) -> None:
        if isinstance(msg, MembersUpdate):
            self.view.set_members([m.to_dict() for m in msg.members])
        elif isinstance(msg, Dial):
            self.tunnels.on_dial(msg.stream, msg.task)
        elif isinstance(msg, Train) and not self.train.done():
            self.train.set_result(msg)
        elif isinstance(msg, TrainingEvent):
            self.view.on_training_event(msg.event)

    async def run(self) -> None:
        c = self.c
        try:
            session_task = await self._connect()
            manifest, data_path = await self._replicate(session_task)
            self.ws.ready()
            self.view.log(logging.INFO, f"dataset verified ({manifest.size:,} bytes); waiting for the host to start "
                          "training")
            await _race(self.train, session_task)
            end = await self._train(self.train.result(), manifest, data_path, session_task)
            if end.error:
                raise SessionFailed(f"the host ended the session: {end.error}")
            self.view.finished(end.test_accuracy, None)  # the model file is the host's, not this node's
            c.to(State.FINISHED)
            self.view.log(logging.INFO, f"session finished: test accuracy {end.test_accuracy}")
            await c.jobs.stop()
            await asyncio.sleep(c.linger)
        finally:
            c.handle.bind_presence(None, None)
            await c.jobs.stop()
            await cancel_and_wait(*self.tasks)
            await self.tunnels.close()
            await self.ws.close()
            if self.server is not None:
                await self.server.close()
            if self.store is not None:
                self.store.close()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    async def _connect(self) -> asyncio.Task[End]:
        """The session channel, open and running."""
        try:
            await _connect(self.ws, self.c.cfg.daemon.peer_timeout, self.plan.joining)
        except SessionRefused as exc:
            raise SessionFailed(f"the host's session is unreachable: {exc}") from None
        session_task = asyncio.create_task(self.ws.run())
        self.tasks.append(session_task)
        self.ws.report_state("replicating")
        return session_task

    async def _replicate(self, session_task: asyncio.Task[End]) -> tuple[Manifest, Path]:
        """The dataset, fetched from the group and verified (and served on meanwhile)."""
        c, plan = self.c, self.plan
        peers = [rep.Peer(m.index, m.address, m.ports.data) for m in plan.members]
        manifest = await _fetch_manifest(c, peers[0], plan, session_task, self.tls)
        if c.cache.has(manifest) is None:
            gb = c.cfg.limits.disk_max_gb
            why = disk.no_room(manifest.size, disk.gb_to_bytes(gb) if gb > 0 else None, c.cache.root,
                               c.cache.partial_path(manifest))
            if why is not None:
                raise SessionFailed(f"cannot take part: {why}")
        self.store = store = rep.ChunkStore.open(c.cache, manifest)
        self.server = rep.DataServer(plan.token, manifest, store, sock=self.res.data_sock,
                                     targets=plan.route().targets, group_size=plan.size,
                                     stall_timeout=c.cfg.replication.stall_timeout, tls=self.tls,
                                     rate_limit=c.cfg.replication.upload_rate())
        await self.server.start()
        replicator = rep.Replicator(plan.index, peers, plan.token, manifest, c.cache, route=plan.settings.route,
                                    stall_timeout=c.cfg.replication.stall_timeout, on_progress=self.on_progress,
                                    store=store, tls=self.tls, reachable=plan.reachable, joining=plan.joining)
        rep_task = asyncio.create_task(replicator.run())
        self.tasks.append(rep_task)
        await _race(rep_task, session_task)
        try:
            return manifest, rep_task.result()
        except rep.ReplicationError as exc:
            raise SessionFailed(f"replication failed: {exc}") from None

    def on_progress(self, p: rep.Progress) -> None:
        """Replication progress: to the view and the host, at most every PROGRESS_INTERVAL s."""
        now, (last, reported) = time.monotonic(), self._progress
        if (p.done_bytes, p.total_bytes) == reported:
            return
        if p.done_bytes < p.total_bytes and now - last < PROGRESS_INTERVAL:
            return
        self._progress = (now, (p.done_bytes, p.total_bytes))
        index = self.plan.index
        self.view.set_member(index, replication={"done": p.done_bytes, "total": p.total_bytes})
        self.view.publish("replication", index=index, done=p.done_bytes, total=p.total_bytes, source=p.source)
        self.ws.report_replication(p.done_bytes, p.total_bytes, p.source)

    async def _train(self, order: Train, manifest: Manifest, data_path: Path,
                     session_task: asyncio.Task[End]) -> End:
        """This node's TF server in slot ``order.index``, until the host's ``end``."""
        c, ws = self.c, self.ws
        c.to(State.TRAINING)
        ws.report_state("training")
        self.workdir = c.jobs.job_dir(self.plan)

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "started":
                ws.job_started()
            elif ev.get("event") == "error":
                self.view.log(logging.ERROR, f"worker job: {ev.get('message')}")

        self.tunnels.serve(order.index)
        sup = await c.start_job(
            self.plan, order.index, order.cluster, data_path, manifest, on_event, self.res, self.tunnels.directory,
            serve=[(task_name(order.index), _port(order.cluster["worker"][order.index]))], reach=[],
        )
        c.handle.bind_presence(ws.away, ws.back)
        job_task = asyncio.create_task(sup.wait())
        self.tasks.append(job_task)
        while True:
            await asyncio.wait({job_task, session_task}, return_when=asyncio.FIRST_COMPLETED)
            if not session_task.done():
                code = job_task.result()
                ws.job_exited(code, sup.last_error)
                raise SessionFailed(f"this node's TF server exited (code {code}): {sup.last_error or 'see job.log'}")
            lost = session_task.exception() if not session_task.cancelled() else None
            if not isinstance(lost, HostLost) or job_task.done():
                return _session_result(session_task)
            session_task = await self._rejoin(lost)

    async def _rejoin(self, lost: HostLost) -> asyncio.Task[End]:
        """The channel broke (this machine froze or lost its network, or the host's did): the
        TF server kept its state, so go back to the host's session and its slot."""
        c, ws = self.c, self.ws
        self.view.log(logging.WARNING, f"lost the session host ({lost}); trying to rejoin the session")
        c.handle.bind_presence(None, None)
        await ws.drop_channel()
        d = c.cfg.daemon
        try:
            # briefly: a host that is gone for good sends this worker back to standby soon
            await ws.connect(retry_for=min(d.peer_timeout, 2 * d.heartbeat), hello={"rejoin": True, "job": "running"})
        except SessionRefused as exc:
            raise SessionFailed(f"the host went away ({lost}); it did not take this worker back: {exc}") from None
        session_task = asyncio.create_task(ws.run())
        self.tasks.append(session_task)
        ws.report_state("training")
        c.handle.bind_presence(ws.away, ws.back)
        self.view.log(logging.INFO, "rejoined the session; training again")
        return session_task


async def _connect(ws: WorkerSession, retry_for: float, joining: bool) -> None:
    """Open the session channel. A newcomer to a running session may reach the host before
    the matchmaker's word that pins its certificate there: it tries again a while."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            await ws.connect(retry_for=retry_for)
            return
        except SessionRefused:
            if not joining or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])  # checked on arrival: 127.0.0.1:PORT


def _session_result(session_task: asyncio.Task[End]) -> End:
    try:
        return session_task.result()
    except HostLost as exc:
        raise SessionFailed(f"the host went away ({exc})") from None


async def _race(work: asyncio.Future[Any], session_task: asyncio.Task[End]) -> None:
    """Wait for ``work``; if the session ends first (host gone, or ended), stop."""
    await asyncio.wait({work, session_task}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        end = _session_result(session_task)
        raise SessionFailed(f"the host ended the session early: {end.error or 'no reason given'}")


async def _fetch_manifest(
    c: SessionContext, host: rep.Peer, plan: SessionPlan, session_task: asyncio.Task[End], tls: GroupTLS
) -> Manifest:
    delay = 0.2
    deadline = time.monotonic() + c.cfg.daemon.peer_timeout
    while True:
        fetch = asyncio.create_task(rep.fetch_manifest(host, plan.token, plan.index, plan.dataset.digest, tls=tls))
        await _race(fetch, session_task)
        try:
            return fetch.result()
        except (AuthError, ManifestError, wire.WireError, wire.RemoteError, wire.ConnectionClosed,
                wire.FrameTimeout, OSError) as exc:  # retry a while, then give up
            if time.monotonic() > deadline:
                raise SessionFailed(f"cannot get the dataset manifest from the host: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


__all__ = ["WorkerRun", "follow"]
