"""A worker's side of a session: follow the host — report over the session channel, fetch
the manifest, replicate the dataset from the group, start the TF server when the host sends
``train``, and stop when the host ends the session (or goes away)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from crowdd import replication as rep
from crowdd import wire
from crowdd.auth import AuthError
from crowdd.node.status import PROGRESS_INTERVAL
from crowdd.node.context import SessionContext, SessionFailed
from crowdd.manifest import Manifest, ManifestError
from crowdd.node.ports import Reservation
from crowdd.route import node_plan
from crowdd.node.session import (
    HostLost,
    SessionRefused,
    WorkerSession,
    dead_after,
)
from crowdd.node.states import State
from crowdd.aio import cancel_and_wait


async def follow(c: SessionContext, group: dict[str, Any], res: Reservation) -> None:
    d = c.cfg.daemon
    view = c.view
    token = str(group["token"])
    index = int(group["index"])
    members = group["members"]
    host = members[0]
    n = len(members)
    view.to(State.REPLICATING)
    train: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_message(frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "members" and isinstance(frame.get("members"), list):
            view.set_members(frame["members"])
        elif kind == "train" and not train.done():
            train.set_result(frame)
        elif kind in ("progress", "eval"):
            view.on_training_event(frame)

    ws = WorkerSession(
        str(host["address"]), int(host["ports"]["session"]), token, index,
        heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout), on_message=on_message,
    )
    store: rep.ChunkStore | None = None
    server: rep.DataServer | None = None
    tasks: list[asyncio.Task[Any]] = []
    workdir: Path | None = None
    try:
        try:
            await ws.connect(retry_for=d.peer_timeout)
        except SessionRefused as exc:
            raise SessionFailed(f"the host's session is unreachable: {exc}") from None
        session_task = asyncio.create_task(ws.run())
        tasks.append(session_task)
        ws.send({"type": "state", "state": "replicating"})
        peers = [rep.Peer(int(m["index"]), str(m["address"]), int(m["ports"]["data"])) for m in members]
        manifest = await _fetch_manifest(c, peers[0], token, index, str(group["dataset"]["digest"]), session_task)
        store = rep.ChunkStore.open(c.cache, manifest)
        plan = node_plan(n, index, c.cfg.replication.route)
        server = rep.DataServer(token, manifest, store, sock=res.data_sock, targets=plan.targets, group_size=n,
                            stall_timeout=c.cfg.replication.stall_timeout)
        await server.start()
        last = [0.0]
        reported: list[tuple[int, int]] = [(-1, -1)]

        def on_progress(p: rep.Progress) -> None:
            now = time.monotonic()
            if (p.done_bytes, p.total_bytes) == reported[0]:
                return
            if p.done_bytes < p.total_bytes and now - last[0] < PROGRESS_INTERVAL:
                return
            last[0] = now
            reported[0] = (p.done_bytes, p.total_bytes)
            view.set_member(index, replication={"done": p.done_bytes, "total": p.total_bytes})
            view.publish("replication", index=index, done=p.done_bytes, total=p.total_bytes, source=p.source)
            ws.send({"type": "replication", "done": p.done_bytes, "total": p.total_bytes, "source": p.source})

        replicator = rep.Replicator(index, peers, token, manifest, c.cache, route=c.cfg.replication.route,
                                stall_timeout=c.cfg.replication.stall_timeout, on_progress=on_progress, store=store)
        rep_task = asyncio.create_task(replicator.run())
        tasks.append(rep_task)
        await _race(rep_task, session_task)
        try:
            data_path = rep_task.result()
        except rep.ReplicationError as exc:
            raise SessionFailed(f"replication failed: {exc}") from None
        ws.send({"type": "ready"})
        view.log(logging.INFO, f"dataset verified ({manifest.size:,} bytes); waiting for the host to start training")
        await _race(train, session_task)
        frame = train.result()
        view.to(State.TRAINING)
        ws.send({"type": "state", "state": "training"})
        workdir = c.jobs.job_dir(group, index)

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "started":
                ws.send({"type": "job", "event": "started"})
            elif ev.get("event") == "error":
                view.log(logging.ERROR, f"worker job: {ev.get('message')}")

        sup = await c.start_job("worker", int(frame["index"]), frame["cluster"], workdir, data_path, manifest, on_event, res)
        job_task = asyncio.create_task(sup.wait())
        tasks.append(job_task)
        await asyncio.wait({job_task, session_task}, return_when=asyncio.FIRST_COMPLETED)
        if not session_task.done():
            code = job_task.result()
            ws.send({"type": "job", "event": "exited", "code": code, "message": sup.last_error})
            raise SessionFailed(f"this node's TF server exited (code {code}): {sup.last_error or 'see job.log'}")
        end = _session_result(session_task)
        if end.get("error"):
            raise SessionFailed(f"the host ended the session: {end['error']}")
        view.finished(end.get("test_accuracy"), end.get("model_path"))
        view.log(logging.INFO, f"session finished: test accuracy {end.get('test_accuracy')}")
        await c.jobs.stop()
        await asyncio.sleep(c.linger)
    finally:
        await c.jobs.stop()
        await cancel_and_wait(*tasks)
        await ws.close()
        if server is not None:
            await server.close()
        if store is not None:
            store.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _session_result(session_task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
    try:
        return session_task.result()
    except HostLost as exc:
        raise SessionFailed(f"the host went away ({exc})") from None


async def _race(work: asyncio.Future[Any], session_task: asyncio.Task[dict[str, Any]]) -> None:
    """Wait for ``work``; if the session ends first (host gone, or ended), stop."""
    await asyncio.wait({work, session_task}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        end = _session_result(session_task)
        raise SessionFailed(f"the host ended the session early: {end.get('error') or 'no reason given'}")


async def _fetch_manifest(
    c: SessionContext, host: rep.Peer, token: str, index: int, digest: str, session_task: asyncio.Task[dict[str, Any]]
) -> Manifest:
    delay = 0.2
    deadline = time.monotonic() + c.cfg.daemon.peer_timeout
    while True:
        fetch = asyncio.create_task(rep.fetch_manifest(host, token, index, digest))
        await _race(fetch, session_task)
        try:
            return fetch.result()
        except (AuthError, ManifestError, wire.WireError, wire.RemoteError, wire.ConnectionClosed,
                wire.FrameTimeout, OSError) as exc:  # retry a while, then give up
            if time.monotonic() > deadline:
                raise SessionFailed(f"cannot get the dataset manifest from the host: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)


__all__ = ["follow"]
