"""The host's side of a session: prepare the dataset, then lead the group — serve the data,
wait until every worker holds it, start training with the cluster spec, fan out progress,
keep the trained model and tell everyone the result."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
from pathlib import Path
from typing import Any

from crowdd.errors import SessionFailed
from crowdd.trust.group_tls import GroupTLS
from crowdd.job import MODEL_FILE
from crowdd.job.card import with_members
from crowdd.node.context import SessionContext
from crowdd.node.hosted import HostedJob
from crowdd.node.resume import HostingRecord
from crowdd.node.ports import Reservation
from crowdd.node.checkpoints import carry_checkpoint
from crowdd.aio import cancel_and_wait, spawn_tracked
from crowdd.matchmaker.client import OpenSlots
from crowdd.node.roster import Roster
from crowdd.node.slots import TrainingSlots
from crowdd.node.session import HostSession, Member, dead_after
from crowdd.node.states import State
from crowdd.node.tunnels import HostTunnels, socket_dir, task_name
from crowdd.plan import PlanMember, SessionPlan
from crowdd.platform import jobfiles
from crowdd.protocol.session import NOTE_MAX, PRIVATE_HOST, Away, Back, End, JobReport, Ready, WorkerMessage
from crowdd.replication import ChunkStore, DataServer


log = logging.getLogger(__name__)

#: How long training waits for the workers' TF servers before it starts with those that are
#: up (TF's import is slow on a loaded machine); the others join when theirs start.
JOB_START_WAIT = 60.0
#: the largest model card the daemon reads back from its job
CARD_LIMIT = 1 << 20


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


async def lead(c: SessionContext, plan: SessionPlan, res: Reservation, prepared: HostedJob, *,
               record: HostingRecord | None = None, resume_from: Path | None = None) -> None:
    """Lead one session (:class:`HostRun`)."""
    c.to(State.REPLICATING)
    await HostRun(c, plan, res, prepared, record=record, resume_from=resume_from).run()


class HostRun:
    """One session this host leads, from serving the dataset to the trained model.

    ``record`` keeps where its job works (a restart resumes from there); ``resume_from``: the
    job directory of the session a restart interrupted, whose last checkpoint the new job
    starts from. The cycle's handle (``c.handle``) carries the daemon's graceful stop and,
    when set, the link that holds the session open at the matchmaker while it trains with free
    places (join in progress).

    The steps, in :meth:`run`: replicate (every worker holds the data and dials a tunnel),
    seat the workers in TF slots and start their servers, start the host's job, and once it
    says ``done``, keep the model and tell everyone the result. The session's callbacks
    (``on_*``) follow the members as they come, go and report.
    """

    def __init__(self, c: SessionContext, plan: SessionPlan, res: Reservation, prepared: HostedJob, *,
                 record: HostingRecord | None = None, resume_from: Path | None = None) -> None:
        self.c, self.plan, self.res, self.prepared = c, plan, res, prepared
        self.record, self.resume_from = record, resume_from
        self.view = c.view
        d = c.cfg.daemon
        self.store = ChunkStore.complete(prepared.data_path, prepared.manifest)
        tls = GroupTLS(c.identity, plan)
        self.server = DataServer(plan.token, prepared.manifest, self.store, sock=res.data_sock,
                                 targets=plan.route().targets, group_size=plan.size,
                                 stall_timeout=c.cfg.replication.stall_timeout, tls=tls,
                                 rate_limit=c.cfg.replication.upload_rate())
        self.slots: TrainingSlots | None = None  # once training starts
        self.cluster: dict[str, list[str]] = {}
        self.base = 0  # the first TF port
        self.opener: OpenSlots | None = None
        self.opener_task: asyncio.Task[None] | None = None
        self.reports: set[asyncio.Task[None]] = set()  # telling the matchmaker whom this host expelled
        self.done: dict[str, Any] = {}  # the job's last word
        self.tunnels = HostTunnels(directory=socket_dir(c.runtime_dir),
                                   dial=lambda member, stream, task: self.session.dial(member, stream, task))
        self.session = HostSession(
            plan, res.session_sock, tls=tls, heartbeat=d.heartbeat,
            dead_after=dead_after(d.heartbeat, d.peer_timeout), on_change=self.on_change,
            on_tunnel=self.tunnels.accept, on_message=self.on_message, on_rejoin=self.on_rejoin,
        )
        self.session.members[0].state = "replicating"

    # -- the steps
    async def run(self) -> None:
        try:
            live = await self._replicate()
            workdir = await self._seat(live)
            await self._wait_started(live)
            await self._train(workdir)
            await self._finish(workdir)
        finally:
            await cancel_and_wait(self.opener_task)
            if self.reports:  # a report under way gets a few seconds to land
                await asyncio.wait(self.reports, timeout=5.0)
                await cancel_and_wait(*self.reports)
            await self.session.close()
            await self.tunnels.close()
            await self.server.close()
            self.store.close()

    async def _replicate(self) -> list[Member]:
        """Serve the dataset until every worker holds it; those whose tunnel fails are dropped."""
        session = self.session
        await self.server.start()
        await session.start()
        self.view.push_members(session, now=True)
        return await check_tunnels(session, self.tunnels, await session.wait_ready(), self.view,
                                   self.plan.job.min_workers)

    async def _seat(self, live: list[Member]) -> Path:
        """Training begins: one TF worker slot per wanted worker, each a fixed relay address in
        the job's namespace. Worker i takes slot i; a worker that goes away and comes back (or
        whose server starts late) takes its own slot again while the others train on, and a
        free slot (never taken, or its worker gone) takes a newcomer (join in progress)."""
        c, session, plan = self.c, self.session, self.plan
        c.to(State.TRAINING)
        session.members[0].state = "training"
        wanted = max(len(session.workers), plan.job.workers)
        self.base = tf_base(wanted)
        self.cluster = cluster_spec(wanted, self.base)
        workdir = c.jobs.job_dir(plan)
        if self.resume_from is not None and self.resume_from != workdir:
            carry(self.view, self.resume_from, workdir)
        if self.record is not None:
            self.record.training_in(workdir)
        self.slots = slots = TrainingSlots(session, self.tunnels, Roster(workdir), list(range(1, wanted + 1)),
                                           say=lambda text: self.view.log(logging.INFO, text), on_free=self.on_free)
        await self.tunnels.reach_workers(slots.holders())
        link = c.handle.link
        if link is not None:
            self.opener = OpenSlots(
                lambda: link.hello(session.plan.members, len(slots.free())),
                matchmaker=link.matchmaker, on_joined=self.on_joined, fingerprint=link.fingerprint,
                heartbeat=link.heartbeat,
            )
            self.opener_task = asyncio.create_task(self.opener.run(), name="crowdd-open-slots")
        for m in live:
            session.start_training(m, self.cluster, m.index)  # slot = index for the first members
        session.rejoin_open = True
        self.view.push_members(session, now=True)
        return workdir

    async def _wait_started(self, live: list[Member]) -> None:
        """Wait a while for the workers' TF servers; start with those up if enough are."""
        if not live:
            return
        session, min_workers = self.session, self.plan.job.min_workers
        self.view.log(logging.INFO, f"waiting for {len(live)} worker(s) to start their TF servers")
        started = await session.wait_started(live, JOB_START_WAIT)
        if len(started) >= len(live):
            return
        if len(started) < min_workers:
            reasons = "; ".join(f"worker {m.index}: {m.why_gone or 'not up in time'}" for m in live if m not in started)
            why = (f"only {len(started)} worker(s) started their TF servers within {JOB_START_WAIT:g} s "
                   f"({reasons}); the job needs min_workers = {min_workers}")
            await session.end(End(error=why))
            raise SessionFailed(why)
        self.view.log(logging.WARNING, f"{len(live) - len(started)} worker(s) did not start their TF servers "
                      f"(gone, or not within {JOB_START_WAIT:g} s); training starts without them and they join "
                      "when they are up")

    async def _train(self, workdir: Path) -> None:
        """The host's job, from the first members file to its last word."""
        prepared, session, slots = self.prepared, self.session, self.slots
        assert slots is not None
        if prepared.model_file is not None:  # the host job builds the network from it
            try:
                shutil.copyfile(prepared.model_file, workdir / MODEL_FILE)
            except OSError as exc:
                await session.end(End(error=f"cannot read the model file: {exc}"))
                raise SessionFailed(f"cannot read the model file {prepared.model_file}: {exc}") from None
        slots.sync()  # the first members file, before the job starts
        base = self.base
        sup = await self.c.start_job(
            self.plan, 0, self.cluster, prepared.data_path, prepared.manifest, self.on_event, self.res,
            self.tunnels.directory, serve=[(task_name(0), base)], reach=[(task_name(j), base + j) for j in slots.slots],
        )
        self.c.handle.arm_stop(workdir)
        code = await sup.wait()
        self.c.handle.arm_stop(None)
        if not self.done:
            err = sup.last_error or f"the host job exited with code {code}"
            await session.end(End(error=err))
            raise SessionFailed(f"training failed: {err}")

    async def _finish(self, workdir: Path) -> None:
        """The job said ``done``: keep its model, complete its card, tell everyone the result."""
        c, view, done, session = self.c, self.view, self.done, self.session
        model, model_sha256 = self._model(workdir)
        accuracy = done.get("test_accuracy")
        self._card(workdir)
        if isinstance(done.get("usage"), str):
            view.log(logging.INFO, f"use the model: {done['usage']}")
        session.rejoin_open = False
        await cancel_and_wait(self.opener_task)  # no newcomers for a session that ended
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

    def _model(self, workdir: Path) -> tuple[str | None, str | None]:
        """The job's model file and its digest. The job's words: paths are taken only if they
        name regular files inside its directory."""
        try:
            rel = jobfiles.is_file(workdir, self.done.get("model_path"))
            # hashed as the job left it (its processes are gone): `crowdd model` checks the file against it
            return str(workdir / rel), jobfiles.sha256(workdir, rel)
        except jobfiles.JobFileError as exc:
            self.view.log(logging.WARNING, f"the job reported no usable model: {exc}")
            return None, None

    def _card(self, workdir: Path) -> None:
        """The model card the job wrote, with the group's members added."""
        if not self.done.get("card_path") or self.slots is None:
            return
        trained = self.slots.trained
        try:
            card = jobfiles.relative(workdir, self.done.get("card_path"))
            updated = with_members(jobfiles.read(workdir, card, CARD_LIMIT), [
                {"index": m.index, "role": m.role, "name": m.name, "fingerprint": m.fingerprint,
                 "trained": m.index == 0 or m.index in trained}
                for m in self.session.plan.members
            ])
            if updated is not None:
                jobfiles.write(workdir, card, updated)
            self.view.log(logging.INFO, f"model card: {workdir / card}")
        except jobfiles.JobFileError as exc:
            self.view.log(logging.WARNING, f"model card: {exc}")

    # -- the session's callbacks
    def on_change(self, m: Member | None) -> None:
        if m is not None:
            self.view.publish("replication", index=m.index, done=m.done, total=m.total, source=m.source)
        self.view.push_members(self.session)
        if self.slots is not None:
            self.slots.sync()

    def on_message(self, m: Member, msg: WorkerMessage) -> None:
        view = self.view
        if isinstance(msg, Away):
            view.log(logging.INFO, f"worker {m.index} ({m.name}) is away ({msg.reason}); "
                     + ("training goes on without it" if msg.staying else "it leaves the session"))
        elif isinstance(msg, Back):
            view.log(logging.INFO, f"worker {m.index} ({m.name}) is back")
        if self.slots is None or m.slot is None:
            return
        if isinstance(msg, JobReport) and msg.event == "started":
            self.slots.started(m)
        elif isinstance(msg, Ready) and not m.started:  # a newcomer holds the data: its turn
            self.session.start_training(m, self.cluster, m.slot)

    def on_joined(self, pm: PlanMember) -> None:
        """The matchmaker sent a newcomer: pin it, seat it in a free slot; it fetches the data
        from this host and, once it holds it, starts its TF server there."""
        session = self.session
        if self.slots is None or pm.index != len(session.members):
            log.warning("the matchmaker sent member %d, expected %d; ignored", pm.index, len(session.members))
            return
        m = session.add_member(pm)
        self.server.group_size = session.plan.size
        slot = self.slots.seat(m)
        if slot is None:
            session.drop(m, "no free place left in this session")
        else:
            self.view.log(logging.INFO, f"worker {m.index} ({m.name}) joins the running session in slot {slot}")

    def on_rejoin(self, m: Member, running: bool) -> None:
        self.view.log(logging.INFO, f"worker {m.index} ({m.name}) came back"
                      + ("" if running else "; it starts its TF server again"))
        if not running and self.slots is not None and m.slot is not None:
            self.session.start_training(m, self.cluster, m.slot)

    def on_free(self, n: int) -> None:
        if self.opener is not None:
            self.opener.set_free(n)

    def on_event(self, ev: dict[str, Any]) -> None:
        """One event of the host's job."""
        view, kind = self.view, ev.get("event")
        if kind in ("progress", "eval"):
            view.on_training_event(ev)
            self.session.fan_out(ev)
        elif kind == "done":
            self.done.update(ev)
        elif kind == "error":
            view.log(logging.ERROR, f"host job: {ev.get('message')}")
        elif kind == "resumed":
            view.log(logging.INFO, f"the job resumed from its checkpoint at step {ev.get('step')}")
        elif kind == "expel":
            self.expel(ev)
        elif kind == "slot":
            task, state = ev.get("task"), ev.get("state")
            if state == "left" and isinstance(task, int):
                view.worker_left(task)
            why = f": {ev['why']}" if isinstance(ev.get("why"), str) and ev["why"] else ""
            view.log(logging.INFO, f"worker {task} {'joined' if state == 'joined' else 'left'} training{why}")

    def expel(self, ev: dict[str, Any]) -> None:
        """The job expelled slot ``task``: its changes kept failing validation. The member
        holding it is cut from the session (its slot freed for a newcomer), the reason is
        said where the host looks, and the matchmaker is told."""
        task, why = ev.get("task"), ev.get("why")
        if not isinstance(task, int) or isinstance(task, bool) or not isinstance(why, str) or self.slots is None:
            return
        why = "".join(ch for ch in why if ch.isprintable())[:NOTE_MAX]
        m = self.slots.holder(task)
        if m is None:
            return
        self.view.worker_left(task)
        self.view.log(logging.WARNING, f"worker {m.index} ({m.name}) expelled: {why}")
        self.session.expel(m, why)
        self.slots.sync()
        self.view.push_members(self.session, now=True)
        spawn_tracked(self.reports, self.tell_matchmaker(m, why))

    async def tell_matchmaker(self, m: Member, why: str) -> None:
        """So that the matchmaker never places ``m`` with this host again."""
        report = self.c.report_expelled
        if report is None:
            return
        try:
            await report(self.session.plan, self.session.plan.members[m.index].fingerprint, why)
            self.view.log(logging.INFO, f"told the matchmaker: worker {m.index} ({m.name}) is never placed with this "
                          "host again")
        except Exception as exc:  # noqa: BLE001 - the expulsion stands; only the report failed
            self.view.log(logging.WARNING, f"could not tell the matchmaker that worker {m.index} ({m.name}) "
                          f"was expelled: {exc}")


__all__ = ["JOB_START_WAIT", "HostRun", "HostedJob", "check_tunnels", "cluster_spec", "lead",
           "tf_base"]
