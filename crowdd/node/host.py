"""The host's side of a session: prepare the dataset, then lead the group — serve the data,
wait until every worker holds it, start training with the cluster spec, fan out progress,
keep the trained model and tell everyone the result."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.cache import DatasetCache
from crowdd.errors import InputError, SessionFailed
from crowdd.group_tls import GroupTLS
from crowdd.modelfile import check_model_file
from crowdd.job import MODEL_FILE, STOP_FILE
from crowdd.job.card import with_members
from crowdd.node.context import SessionContext
from crowdd.node.hosted import HostedJob
from crowdd.node.resume import HostingRecord
from crowdd.node.ports import Reservation
from crowdd.node.checkpoints import carry_checkpoint
from crowdd.aio import cancel_and_wait, spawn_tracked
from crowdd.matchmaker_client import OpenSlots
from crowdd.node.roster import Roster
from crowdd.node.slots import TrainingSlots
from crowdd.node.session import HostSession, Member, dead_after
from crowdd.node.states import State
from crowdd.node.tunnels import HostTunnels, socket_dir, task_name
from crowdd.plan import PlanMember, SessionPlan
from crowdd.platform import jobfiles
from crowdd.protocol.control import HostRequest
from crowdd.protocol.session import NOTE_MAX, PRIVATE_HOST, Away, Back, End, JobReport, Ready, WorkerMessage
from crowdd.replication import ChunkStore, DataServer


log = logging.getLogger(__name__)

#: How long training waits for the workers' TF servers before it starts with those that are
#: up (TF's import is slow on a loaded machine); the others join when theirs start.
JOB_START_WAIT = 60.0
#: the largest model card the daemon reads back from its job
CARD_LIMIT = 1 << 20


def convert_dataset(cache: DatasetCache, chunk_size: int, req: HostRequest) -> HostedJob:
    """Convert the dataset to the canonical file + manifest in the cache (blocking: run it in
    a thread). A dataset that cannot be hosted raises :class:`InputError` (field ``dataset``)
    naming the file and what is wrong, so the control socket refuses the request with it."""
    from crowdd import datasets  # numpy: only when hosting

    try:
        p = datasets.convert(req.dataset, cache.root, chunk_size=chunk_size, test_fraction=req.test_fraction,
                             label=req.label, images=datasets.ImageOptions(req.image_size, req.color), task=req.task,
                             name=datasets.default_name(req.shown))
    except datasets.DatasetError as exc:
        raise InputError(f"cannot host {req.shown}: {req.as_shown(str(exc))}", field="dataset") from None
    except OSError as exc:
        raise InputError(f"cannot host {req.shown}: {req.as_shown(str(exc))}", field="dataset") from None
    if req.model_file is not None and p.manifest.layout is not None:
        check_model_file(req.model_file, p.manifest.layout)  # InputError naming what does not fit
    path = cache.has(p.manifest) or p.data_path
    return HostedJob(path, p.manifest, p.manifest.name or req.shown.name, req.job, req.model_file)


def describe(prepared: HostedJob) -> dict[str, Any]:
    """What the host's ``ok`` reply and its status say about an accepted dataset."""
    m = prepared.manifest
    d: dict[str, Any] = {"name": prepared.name, "size": m.size, "digest": m.digest()}
    if m.layout is not None:
        d.update(train=m.layout.train_count, test=m.layout.test_count, classes=m.layout.num_classes,
                 shape=list(m.layout.feature_shape))
    return d


@dataclass(frozen=True)
class OpenLink:
    """How a running session stays open at the matchmaker, so that newcomers join it:
    ``hello(members, free)`` is the open hello (:func:`crowdd.node.registration.open_hello`)."""

    hello: Callable[[Sequence[PlanMember], int], dict[str, Any]]
    matchmaker: Callable[[], tuple[str, int]]
    fingerprint: Callable[[], str]
    heartbeat: float


class GracefulStop:
    """``crowdd stop`` on a host mid-training: ask the job to end early, keeping its work.

    :meth:`request` writes the job's stop file (:data:`crowdd.job.STOP_FILE`); the job then
    evaluates, checkpoints and saves the model trained so far, and ends with ``done``."""

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.requested = False

    def arm(self, workdir: Path | None) -> None:
        self.workdir = workdir

    def request(self) -> bool:
        """Ask the running job to stop; False when no host job is training (stop it the hard way)."""
        if self.workdir is None:
            return False
        try:
            (self.workdir / STOP_FILE).touch()
        except OSError as exc:
            log.warning("cannot ask the job to stop (%s); stopping it at once", exc)
            return False
        self.requested = True
        return True


def cluster_spec(workers: int, base: int) -> dict[str, list[str]]:
    """The TF cluster: worker tasks 0 (the host's) to ``workers`` at ports ``base``.., each on
    its member's private loopback. There is no parameter server (the host's coordinator
    holds the model); the host's relay reaches every worker's task through the tunnels
    (:mod:`crowdd.node.tunnels`) and a worker's relay reaches nothing."""
    return {"worker": [f"{PRIVATE_HOST}:{base + t}" for t in range(workers + 1)]}


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


def carry(view: Any, old: Path, new: Path) -> None:
    """Start the new job from the last checkpoint of the interrupted session's job in ``old``."""
    try:
        step = carry_checkpoint(old, new)
    except OSError as exc:
        view.log(logging.WARNING, f"cannot carry the interrupted session's checkpoint over ({exc}); training starts afresh")
        return
    if step is not None:
        view.log(logging.INFO, f"training resumes from step {step} (the interrupted session's checkpoint)")


async def lead(
    c: SessionContext, plan: SessionPlan, res: Reservation, prepared: HostedJob, graceful: GracefulStop | None = None,
    *, record: HostingRecord | None = None, resume_from: Path | None = None, link: OpenLink | None = None,
) -> None:
    """Lead one session. ``record`` keeps where its job works (a restart resumes from there);
    ``resume_from``: the job directory of the session a restart interrupted, whose last
    checkpoint the new job starts from. ``link``: hold the session open at the matchmaker
    while it trains with free places (join in progress)."""
    d = c.cfg.daemon
    view = c.view
    manifest = prepared.manifest
    c.to(State.REPLICATING)
    store = ChunkStore.complete(prepared.data_path, manifest)
    tls = GroupTLS(c.identity, plan)
    server = DataServer(plan.token, manifest, store, sock=res.data_sock, targets=plan.route().targets,
                        group_size=plan.size, stall_timeout=c.cfg.replication.stall_timeout, tls=tls,
                        rate_limit=c.cfg.replication.upload_rate())

    slots: TrainingSlots | None = None  # once training starts
    cluster: dict[str, list[str]] = {}
    opener: OpenSlots | None = None

    def on_change(m: Member | None) -> None:
        if m is not None:
            view.publish("replication", index=m.index, done=m.done, total=m.total, source=m.source)
        view.push_members(session)
        if slots is not None:
            slots.sync()

    def on_message(m: Member, msg: WorkerMessage) -> None:
        if isinstance(msg, Away):
            view.log(logging.INFO, f"worker {m.index} ({m.name}) is away ({msg.reason}); "
                     + ("training goes on without it" if msg.staying else "it leaves the session"))
        elif isinstance(msg, Back):
            view.log(logging.INFO, f"worker {m.index} ({m.name}) is back")
        if slots is None or m.slot is None:
            return
        if isinstance(msg, JobReport) and msg.event == "started":
            slots.started(m)
        elif isinstance(msg, Ready) and not m.started:  # a newcomer holds the data: its turn
            session.start_training(m, cluster, m.slot)

    def on_joined(pm: PlanMember) -> None:
        """The matchmaker sent a newcomer: pin it, seat it in a free slot; it fetches the data
        from this host and, once it holds it, starts its TF server there."""
        if slots is None or pm.index != len(session.members):
            log.warning("the matchmaker sent member %d, expected %d; ignored", pm.index, len(session.members))
            return
        m = session.add_member(pm)
        server.group_size = session.plan.size
        slot = slots.seat(m)
        if slot is None:
            session.drop(m, "no free place left in this session")
        else:
            view.log(logging.INFO, f"worker {m.index} ({m.name}) joins the running session in slot {slot}")

    def on_rejoin(m: Member, running: bool) -> None:
        view.log(logging.INFO, f"worker {m.index} ({m.name}) came back"
                 + ("" if running else "; it starts its TF server again"))
        if not running and slots is not None and m.slot is not None:
            session.start_training(m, cluster, m.slot)

    tunnels = HostTunnels(directory=socket_dir(c.runtime_dir),
                          dial=lambda member, stream, task: session.dial(member, stream, task))
    session = HostSession(
        plan, res.session_sock, tls=tls, heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout),
        on_change=on_change, on_tunnel=tunnels.accept, on_message=on_message, on_rejoin=on_rejoin,
    )
    session.members[0].state = "replicating"
    opener_task: asyncio.Task[None] | None = None
    reports: set[asyncio.Task[None]] = set()  # telling the matchmaker whom this host expelled
    try:
        await server.start()
        await session.start()
        view.push_members(session, now=True)
        live = await check_tunnels(session, tunnels, await session.wait_ready(), view, plan.job.min_workers)
        c.to(State.TRAINING)
        session.members[0].state = "training"
        # one TF worker slot per wanted worker, each a fixed relay address in the job's
        # namespace: worker i takes slot i; a worker that goes away and comes back (or whose
        # server starts late) takes its own slot again while the others train on, and a free
        # slot (never taken, or its worker gone) takes a newcomer (join in progress)
        wanted = max(len(session.workers), plan.job.workers)
        base = tf_base(wanted)
        cluster = cluster_spec(wanted, base)
        workdir = c.jobs.job_dir(plan)
        if resume_from is not None and resume_from != workdir:
            carry(view, resume_from, workdir)
        if record is not None:
            record.training_in(workdir)

        def on_free(n: int) -> None:
            if opener is not None:
                opener.set_free(n)

        slots = TrainingSlots(session, tunnels, Roster(workdir), list(range(1, wanted + 1)),
                              say=lambda text: view.log(logging.INFO, text), on_free=on_free)
        await tunnels.reach_workers(slots.holders())
        if link is not None:
            opener = OpenSlots(
                lambda: link.hello(session.plan.members, len(slots.free()) if slots is not None else 0),
                matchmaker=link.matchmaker, on_joined=on_joined, fingerprint=link.fingerprint,
                heartbeat=link.heartbeat,
            )
            opener_task = asyncio.create_task(opener.run(), name="crowdd-open-slots")
        for m in live:
            session.start_training(m, cluster, m.index)  # slot = index for the first members
        session.rejoin_open = True
        view.push_members(session, now=True)
        if live:
            view.log(logging.INFO, f"waiting for {len(live)} worker(s) to start their TF servers")
            started = await session.wait_started(live, JOB_START_WAIT)
            if len(started) < len(live):
                if len(started) < plan.job.min_workers:
                    reasons = "; ".join(f"worker {m.index}: {m.why_gone or 'not up in time'}"
                                        for m in live if m not in started)
                    why = (f"only {len(started)} worker(s) started their TF servers within {JOB_START_WAIT:g} s "
                           f"({reasons}); the job needs min_workers = {plan.job.min_workers}")
                    await session.end(End(error=why))
                    raise SessionFailed(why)
                view.log(logging.WARNING, f"{len(live) - len(started)} worker(s) did not start their TF servers "
                         "(gone, or not within "
                         f"{JOB_START_WAIT:g} s); training starts without them and they join when they are up")
        if prepared.model_file is not None:  # the host job builds the network from it
            try:
                shutil.copyfile(prepared.model_file, workdir / MODEL_FILE)
            except OSError as exc:
                await session.end(End(error=f"cannot read the model file: {exc}"))
                raise SessionFailed(f"cannot read the model file {prepared.model_file}: {exc}") from None
        slots.sync()  # the first members file, before the job starts
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
            elif kind == "resumed":
                view.log(logging.INFO, f"the job resumed from its checkpoint at step {ev.get('step')}")
            elif kind == "expel":
                expel(ev)
            elif kind == "slot":
                task, state = ev.get("task"), ev.get("state")
                if state == "left" and isinstance(task, int):
                    view.worker_left(task)
                why = f": {ev['why']}" if isinstance(ev.get("why"), str) and ev["why"] else ""
                view.log(logging.INFO, f"worker {task} {'joined' if state == 'joined' else 'left'} training{why}")

        def expel(ev: dict[str, Any]) -> None:
            """The job expelled slot ``task``: its changes kept failing validation. The member
            holding it is cut from the session (its slot freed for a newcomer), the reason is
            said where the host looks, and the matchmaker is told."""
            task, why = ev.get("task"), ev.get("why")
            if not isinstance(task, int) or isinstance(task, bool) or not isinstance(why, str) or slots is None:
                return
            why = "".join(ch for ch in why if ch.isprintable())[:NOTE_MAX]
            m = slots.holder(task)
            if m is None:
                return
            view.worker_left(task)
            view.log(logging.WARNING, f"worker {m.index} ({m.name}) expelled: {why}")
            session.expel(m, why)
            slots.sync()
            view.push_members(session, now=True)
            spawn_tracked(reports, tell_matchmaker(m, why))

        async def tell_matchmaker(m: Member, why: str) -> None:
            """So that the matchmaker never places ``m`` with this host again."""
            if c.report_expelled is None:
                return
            try:
                await c.report_expelled(session.plan, session.plan.members[m.index].fingerprint, why)
                view.log(logging.INFO, f"told the matchmaker: worker {m.index} ({m.name}) is never placed with this "
                         "host again")
            except Exception as exc:  # noqa: BLE001 - the expulsion stands; only the report failed
                view.log(logging.WARNING, f"could not tell the matchmaker that worker {m.index} ({m.name}) "
                         f"was expelled: {exc}")

        sup = await c.start_job(
            plan, 0, cluster, prepared.data_path, manifest, on_event, res, tunnels.directory,
            serve=[(task_name(0), base)], reach=[(task_name(j), base + j) for j in slots.slots],
        )
        if graceful is not None:
            graceful.arm(workdir)
        code = await sup.wait()
        if graceful is not None:
            graceful.arm(None)
        if not done:
            err = sup.last_error or f"the host job exited with code {code}"
            await session.end(End(error=err))
            raise SessionFailed(f"training failed: {err}")
        # the job's words: paths are taken only if they name regular files inside its directory
        model: str | None = None
        model_sha256: str | None = None
        try:
            rel = jobfiles.is_file(workdir, done.get("model_path"))
            # hashed as the job left it (its processes are gone): `crowdd model` checks the file against it
            model_sha256 = jobfiles.sha256(workdir, rel)
            model = str(workdir / rel)
        except jobfiles.JobFileError as exc:
            view.log(logging.WARNING, f"the job reported no usable model: {exc}")
        accuracy = done.get("test_accuracy")
        if done.get("card_path"):
            try:
                card = jobfiles.relative(workdir, done.get("card_path"))
                updated = with_members(jobfiles.read(workdir, card, CARD_LIMIT), [
                    {"index": m.index, "role": m.role, "name": m.name, "fingerprint": m.fingerprint,
                     "trained": m.index == 0 or m.index in slots.trained}
                    for m in session.plan.members
                ])
                if updated is not None:
                    jobfiles.write(workdir, card, updated)
                view.log(logging.INFO, f"model card: {workdir / card}")
            except jobfiles.JobFileError as exc:
                view.log(logging.WARNING, f"model card: {exc}")
        if isinstance(done.get("usage"), str):
            view.log(logging.INFO, f"use the model: {done['usage']}")
        session.rejoin_open = False
        await cancel_and_wait(opener_task)  # no newcomers for a session that ended
        if done.get("stopped"):
            view.log(logging.INFO, f"stopped by the user at step {done.get('steps')} of {done.get('total_steps')}: "
                     f"kept the checkpoint {done.get('checkpoint')} and the model trained so far")
        metrics = {k: done[k] for k in ("test_mae", "test_mse") if isinstance(done.get(k), (int, float))}
        view.finished(accuracy, model, model_sha256=model_sha256, **metrics)
        c.to(State.FINISHED)
        session.members[0].state = "finished"
        score = f"test MAE {metrics['test_mae']:.4g}" if "test_mae" in metrics else f"test accuracy {accuracy}"
        view.log(logging.INFO, f"training finished: {score}, model {model}"
                 + (f" (sha256 {model_sha256})" if model_sha256 else ""))
        await session.end(End(accuracy if isinstance(accuracy, (int, float)) else None, model))
        await asyncio.sleep(c.linger)
    finally:
        await cancel_and_wait(opener_task)
        if reports:  # a report under way gets a few seconds to land
            await asyncio.wait(reports, timeout=5.0)
            await cancel_and_wait(*reports)
        await session.close()
        await tunnels.close()
        await server.close()
        store.close()


__all__ = ["JOB_START_WAIT", "OpenLink", "HostedJob", "check_tunnels", "cluster_spec", "GracefulStop", "convert_dataset", "describe", "lead", "tf_base"]
