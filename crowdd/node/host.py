"""The host's side of a session: prepare the dataset, then lead the group — serve the data,
wait until every worker holds it, start training with the cluster spec, fan out progress,
keep the trained model and tell everyone the result."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.errors import SessionFailed
from crowdd.group_tls import GroupTLS
from crowdd.hyperparams import Job
from crowdd.manifest import Manifest
from crowdd.node.context import SessionContext
from crowdd.node.ports import Reservation
from crowdd.node.session import HostSession, Member, dead_after
from crowdd.node.states import State
from crowdd.node.tunnels import PS, HostTunnels, task_name
from crowdd.plan import SessionPlan
from crowdd.protocol.control import HostRequest
from crowdd.protocol.session import PRIVATE_HOST, End
from crowdd.replication import ChunkStore, DataServer

JOB_START_TIMEOUT = 180.0  # workers' TF servers must be up within this (TF import is slow)


@dataclass
class Prepared:
    """The host's dataset, ready to serve: the canonical file, its manifest, a display name,
    and the job it is hosted for."""

    data_path: Path
    manifest: Manifest
    name: str
    job: Job


async def prepare_dataset(c: SessionContext, req: HostRequest) -> Prepared:
    """Convert the dataset to the canonical file + manifest in the cache (in a thread)."""
    rec = c.view.session
    if rec is not None:
        rec.job = req.job

    def convert() -> Prepared:
        from crowdd import datasets  # numpy: only when hosting

        try:
            p = datasets.convert(req.dataset, c.cache.root, chunk_size=c.cfg.replication.chunk_size,
                                 test_fraction=req.test_fraction, name=datasets.default_name(req.shown))
        except datasets.DatasetError as exc:
            raise SessionFailed(f"cannot host {req.shown}: {req.as_shown(str(exc))}") from None
        path = c.cache.has(p.manifest) or p.data_path
        return Prepared(path, p.manifest, p.manifest.name or req.shown.name, req.job)

    c.view.log(logging.INFO, f"preparing {req.shown}")
    try:
        prepared = await asyncio.get_running_loop().run_in_executor(None, convert)
    except OSError as exc:
        raise SessionFailed(f"cannot host {req.shown}: {req.as_shown(str(exc))}") from None
    if rec is not None:
        rec.dataset = {"name": prepared.name, "size": prepared.manifest.size, "digest": prepared.manifest.digest()}
    return prepared


def cluster_spec(workers: int, base: int) -> dict[str, list[str]]:
    """The TF cluster as every member's job sees it: the host's PS at ``base`` and TF workers
    0 (the host's) to ``workers`` at the ports after it, all on the job's private loopback —
    each member's relay serves its own tasks there and reaches the others' through the
    tunnels (:mod:`crowdd.node.tunnels`)."""
    return {
        "ps": [f"{PRIVATE_HOST}:{base}"],
        "worker": [f"{PRIVATE_HOST}:{base + 1 + t}" for t in range(workers + 1)],
    }


def tf_base(workers: int, rng: random.Random | None = None) -> int:
    """A first TF port for this session. In a confined job any port is free; a random one
    makes a clash unlikely where jobs run exposed on a shared loopback."""
    return (rng or random.Random()).randrange(20000, 40000 - workers - 1)


async def check_tunnels(
    session: HostSession, tunnels: HostTunnels, live: list[Member], view: Any, min_workers: int
) -> list[Member]:
    """Each live worker dials a tunnel stream back; those that cannot are dropped now, with
    the reason, rather than holding up the start of training. Fewer than ``min_workers`` left
    (after a drop) fails the session."""
    ok = await asyncio.gather(*(tunnels.probe(m.index, m.index) for m in live))
    for m, up in zip(live, ok):
        if not up:
            why = f"its tunnel to the host did not come up within {tunnels.timeout:g} s"
            view.log(logging.WARNING, f"worker {m.index} ({m.name}) dropped: {why}")
            session.drop(m, why)
    kept = [m for m, up in zip(live, ok) if up and m.alive]
    if len(kept) < len(live) and len(kept) < min_workers:
        why = (f"only {len(kept)} worker(s) could reach this host through a tunnel; the job needs "
               f"min_workers = {min_workers}")
        await session.end(End(error=why))
        raise SessionFailed(why)
    return kept


async def lead(c: SessionContext, plan: SessionPlan, res: Reservation, prepared: Prepared) -> None:
    d = c.cfg.daemon
    view = c.view
    manifest = prepared.manifest
    c.to(State.REPLICATING)
    store = ChunkStore.complete(prepared.data_path, manifest)
    tls = GroupTLS(c.identity, plan)
    server = DataServer(plan.token, manifest, store, sock=res.data_sock, targets=plan.route().targets,
                        group_size=plan.size, stall_timeout=c.cfg.replication.stall_timeout, tls=tls,
                        rate_limit=c.cfg.replication.upload_rate())

    def on_change(m: Member | None) -> None:
        if m is not None:
            view.publish("replication", index=m.index, done=m.done, total=m.total, source=m.source)
        view.push_members(session)

    tunnels = HostTunnels(dial=lambda member, stream, task: session.dial(member, stream, task))
    session = HostSession(
        plan, res.session_sock, tls=tls, heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout),
        on_change=on_change, on_tunnel=tunnels.accept,
    )
    session.members[0].state = "replicating"
    try:
        await server.start()
        await session.start()
        view.push_members(session, now=True)
        live = await check_tunnels(session, tunnels, await session.wait_ready(), view, plan.job.min_workers)
        c.to(State.TRAINING)
        session.members[0].state = "training"
        base = tf_base(len(live))
        cluster = cluster_spec(len(live), base)
        tasks = {j: m.index for j, m in enumerate(live, 1)}
        await tunnels.reach_workers(tasks)
        for j, m in enumerate(live, 1):
            session.start_training(m, cluster, j)
        view.push_members(session, now=True)
        if live:
            view.log(logging.INFO, f"waiting for {len(live)} worker(s) to start their TF servers")
            started = await session.wait_started(live, JOB_START_TIMEOUT)
            if len(started) < len(live):
                view.log(logging.WARNING, f"{len(live) - len(started)} worker(s) did not start; training without them")
        workdir = c.jobs.job_dir(plan)
        done: dict[str, Any] = {}

        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind in ("progress", "eval"):
                view.on_training_event(ev)
                session.fan_out(ev)
            elif kind == "done":
                done.update(ev)
            elif kind == "error":
                view.log(logging.ERROR, f"host job: {ev.get('message')}")

        sup = await c.start_job(
            plan, 0, cluster, prepared.data_path, manifest, on_event, res, tunnels.directory,
            serve=[(PS, base), (task_name(0), base + 1)], reach=[(task_name(j), base + 1 + j) for j in tasks],
        )
        code = await sup.wait()
        if not done:
            err = sup.last_error or f"the host job exited with code {code}"
            await session.end(End(error=err))
            raise SessionFailed(f"training failed: {err}")
        model = done.get("model_path")
        if isinstance(model, str) and model and not os.path.isabs(model):
            model = str(workdir / model)
        accuracy = done.get("test_accuracy")
        view.finished(accuracy, model if isinstance(model, str) else None)
        c.to(State.FINISHED)
        session.members[0].state = "finished"
        view.log(logging.INFO, f"training finished: test accuracy {accuracy}, model {model}")
        await session.end(End(accuracy if isinstance(accuracy, (int, float)) else None,
                              model if isinstance(model, str) else None))
        await asyncio.sleep(c.linger)
    finally:
        await session.close()
        await tunnels.close()
        await server.close()
        store.close()


__all__ = ["JOB_START_TIMEOUT", "Prepared", "check_tunnels", "cluster_spec", "lead", "prepare_dataset", "tf_base"]
