"""The host's side of a session: prepare the dataset, then lead the group — serve the data,
wait until every worker holds it, start training with the cluster spec, fan out progress,
keep the trained model and tell everyone the result."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.node.context import SessionContext, SessionFailed
from crowdd.hyperparams import Job
from crowdd.manifest import Manifest
from crowdd.node.ports import Reservation
from crowdd.replication import ChunkStore, DataServer
from crowdd.route import node_plan
from crowdd.node.session import HostSession, Member, dead_after
from crowdd.node.states import State

JOB_START_TIMEOUT = 180.0  # workers' TF servers must be up within this (TF import is slow)


@dataclass
class HostRequest:
    dataset: Path
    job: Job
    test_fraction: float | None = None


@dataclass
class Prepared:
    data_path: Path
    manifest: Manifest
    name: str


async def prepare_dataset(c: SessionContext, req: HostRequest) -> Prepared:
    """Convert the dataset to the canonical file + manifest in the cache (in a thread)."""
    c.view.job = req.job.to_dict()

    def convert() -> Prepared:
        from crowdd import datasets  # numpy: only when hosting

        try:
            p = datasets.convert(req.dataset, c.cache.root, chunk_size=c.cfg.replication.chunk_size,
                                 test_fraction=req.test_fraction)
        except datasets.DatasetError as exc:
            raise SessionFailed(f"cannot host {req.dataset}: {exc}") from None
        path = c.cache.has(p.manifest) or p.data_path
        return Prepared(path, p.manifest, p.manifest.name or req.dataset.name)

    c.view.log(logging.INFO, f"preparing {req.dataset}")
    try:
        prepared = await asyncio.get_running_loop().run_in_executor(None, convert)
    except OSError as exc:
        raise SessionFailed(f"cannot host {req.dataset}: {exc}") from None
    c.view.dataset = {"name": prepared.name, "size": prepared.manifest.size, "digest": prepared.manifest.digest()}
    return prepared


async def lead(c: SessionContext, group: dict[str, Any], res: Reservation, prepared: Prepared) -> None:
    d = c.cfg.daemon
    view = c.view
    token = str(group["token"])
    members = group["members"]
    n = len(members)
    manifest = prepared.manifest
    view.to(State.REPLICATING)
    store = ChunkStore.complete(prepared.data_path, manifest)
    plan = node_plan(n, 0, c.cfg.replication.route)
    server = DataServer(token, manifest, store, sock=res.data_sock, targets=plan.targets, group_size=n,
                        stall_timeout=c.cfg.replication.stall_timeout)

    def on_change(m: Member | None) -> None:
        if m is not None:
            view.publish("replication", index=m.index, done=m.done, total=m.total, source=m.source)
        view.push_members(session)

    session = HostSession(
        group, res.session_sock, heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout),
        on_change=on_change,
    )
    session.members[0].state = "replicating"
    try:
        await server.start()
        await session.start()
        view.push_members(session, now=True)
        live = await session.wait_ready()
        view.to(State.TRAINING)
        session.members[0].state = "training"
        host_addr = str(members[0]["address"])
        cluster = {
            "ps": [f"{host_addr}:{res.tf_ports[0]}"],
            "worker": [f"{host_addr}:{res.tf_ports[1]}"] + [f"{m.address}:{m.ports['tf'][0]}" for m in live],
        }
        for j, m in enumerate(live, 1):
            session.send(m.index, {"type": "train", "cluster": cluster, "index": j})
        view.push_members(session, now=True)
        if live:
            view.log(logging.INFO, f"waiting for {len(live)} worker(s) to start their TF servers")
            started = await session.wait_started(live, JOB_START_TIMEOUT)
            if len(started) < len(live):
                view.log(logging.WARNING, f"{len(live) - len(started)} worker(s) did not start; training without them")
        workdir = c.jobs.job_dir(group, 0)
        done: dict[str, Any] = {}

        def on_event(ev: dict[str, Any]) -> None:
            kind = ev.get("event")
            if kind in ("progress", "eval"):
                view.on_training_event(ev)
                session.broadcast({**{k: v for k, v in ev.items() if k != "event"}, "type": kind})
            elif kind == "done":
                done.update(ev)
            elif kind == "error":
                view.log(logging.ERROR, f"host job: {ev.get('message')}")

        sup = await c.start_job("host", 0, cluster, workdir, prepared.data_path, manifest, on_event, res)
        code = await sup.wait()
        if not done:
            err = sup.last_error or f"the host job exited with code {code}"
            await session.end({"test_accuracy": None, "model_path": None, "error": err})
            raise SessionFailed(f"training failed: {err}")
        model = done.get("model_path")
        if isinstance(model, str) and model and not os.path.isabs(model):
            model = str(workdir / model)
        if view.training is not None:
            view.training["test_accuracy"] = done.get("test_accuracy")
        view.finished(done.get("test_accuracy"), model)
        session.members[0].state = "finished"
        view.log(logging.INFO, f"training finished: test accuracy {done.get('test_accuracy')}, model {model}")
        await session.end({**(view.result or {}), "error": None})
        await asyncio.sleep(c.linger)
    finally:
        await session.close()
        await server.close()
        store.close()


__all__ = ["JOB_START_TIMEOUT", "HostRequest", "Prepared", "lead", "prepare_dataset"]
