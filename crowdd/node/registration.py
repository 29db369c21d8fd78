"""Getting in line at the matchmaker: the ``hello`` a node sends, and registering until a
group forms — retrying with jittered backoff while the matchmaker is away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from crowdd import wire
from crowdd.config import Config
from crowdd.errors import ErrorCode, SessionFailed
from crowdd.hyperparams import GroupSettings
from crowdd.trust.identity import Identity
from crowdd.matchmaker.client import register, report_expelled
from crowdd.node.backoff import Backoff
from crowdd.node.handle import OpenLink
from crowdd.node.hosted import HostedJob
from crowdd.node.ports import Reservation
from crowdd.node.states import State, StateMachine
from crowdd.node.status import StatusView
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.protocol import matchmaker as mmp


def group_settings(cfg: Config, prepared: HostedJob) -> GroupSettings:
    """What the group must agree on, as this host decides it: its ``[replication]`` route, its
    ``[job]`` K, steps per function and merge, and the chunk size its dataset was cut into."""
    j = cfg.job
    return GroupSettings(
        route=cfg.replication.route,
        sync_every=min(j.sync_every, j.steps_per_function),
        steps_per_function=j.steps_per_function,
        merge=j.merge,
        chunk_size=prepared.manifest.chunk_size,
    )


def make_hello(
    cfg: Config, name: str, role: str, res: Reservation, prepared: HostedJob | None, identity: Identity
) -> dict[str, Any]:
    """This node's hello: its ports, its certificate (which the group will pin) and, for a
    host, the job, the dataset's digest and the group-wide settings."""
    d = cfg.daemon
    ports = MemberPorts(res.data_port, res.session_port, tuple(res.tf_ports))
    cert, fingerprint = identity.cert_pem, identity.fingerprint
    if role != mmp.HOST or prepared is None:
        return mmp.make_hello(role, name, ports, tag=d.tag, want_tag=d.want_tag, advertise=d.advertise_host,
                              cert=cert, fingerprint=fingerprint)
    m = prepared.manifest
    return mmp.make_hello(
        role, name, ports, tag=d.tag, want_tag=d.want_tag, advertise=d.advertise_host, cert=cert, fingerprint=fingerprint,
        job=prepared.job, dataset=DatasetRef(m.digest(), m.size, prepared.name[:255] or "dataset"),
        settings=group_settings(cfg, prepared),
    )


def open_hello(cfg: Config, plan: SessionPlan, members: Sequence[PlanMember], free: int) -> dict[str, Any]:
    """The hello that holds this host's running session open at the matchmaker (join in
    progress): the host's hello as the group was formed (its job, dataset and settings are
    the plan's, whatever the config says now), its members so far and its free places."""
    d = cfg.daemon
    me = plan.host
    hello = mmp.make_hello(mmp.HOST, me.name, me.ports, tag=d.tag, want_tag=d.want_tag, advertise=d.advertise_host,
                           cert=me.cert, fingerprint=me.fingerprint, job=plan.job, dataset=plan.dataset,
                           settings=plan.settings)
    return mmp.make_open(hello, plan.group_id, plan.token, members, free)


async def register_until_grouped(
    role: str,
    hello: dict[str, Any],
    states: StateMachine,
    view: StatusView,
    *,
    matchmaker: Callable[[], tuple[str, int]],
    heartbeat: float,
    backoff: Callable[[], Backoff],
    fingerprint: Callable[[], str] = lambda: "",
) -> SessionPlan:
    """Register (again and again) until the matchmaker sends this node's ``group`` frame.
    ``fingerprint()`` is the matchmaker's pinned certificate ("" = the system trust store).
    A host whose job the matchmaker refuses, or that it cannot reach, gets a :class:`SessionFailed`."""
    while True:
        states.to(State.REGISTERING)
        mm = matchmaker()
        try:
            plan = await register(mm, hello, heartbeat=heartbeat, on_wait=view.on_wait, fingerprint=fingerprint())
            view.problem(None)
            return plan
        except wire.RemoteError as exc:
            if exc.code in (ErrorCode.BAD_FIELD, ErrorCode.VERSION) and role == mmp.HOST:
                raise SessionFailed(f"the matchmaker refused this job: {exc.message}") from None
            if exc.code == ErrorCode.UNREACHABLE and role == mmp.HOST:
                raise SessionFailed(f"cannot host: {exc.message}") from None
            why = f"the matchmaker said {exc.code}: {exc.message}"
        except (wire.ConnectionClosed, wire.FrameTimeout, wire.WireError, OSError) as exc:
            why = str(exc) or type(exc).__name__
        delay = backoff().next()
        view.problem(f"cannot reach the matchmaker {mm[0]}:{mm[1]}: {why} (retrying)")
        view.log(logging.WARNING, f"matchmaker {mm[0]}:{mm[1]}: {why}; retrying in {delay:.1f} s")
        await asyncio.sleep(delay)


class Registrar:
    """How this node reaches its matchmaker: ``cfg()`` (a reload replaces it), this node's
    ``name`` and ``identity()``, the matchmaker's address ``matchmaker()`` (the command line's,
    or the config's) and the retry ``backoff()``."""

    def __init__(self, cfg: Callable[[], Config], name: str, identity: Callable[[], Identity],
                 matchmaker: Callable[[], tuple[str, int]], backoff: Callable[[], Backoff]) -> None:
        self.cfg, self.name, self.identity, self.matchmaker, self.backoff = cfg, name, identity, matchmaker, backoff

    def fingerprint(self) -> str:
        """The matchmaker's pinned certificate ("" = the system trust store)."""
        return self.cfg().daemon.matchmaker_fingerprint

    def hello(self, role: str, res: Reservation, prepared: HostedJob | None) -> dict[str, Any]:
        return make_hello(self.cfg(), self.name, role, res, prepared, self.identity())

    async def until_grouped(self, role: str, hello: dict[str, Any], states: StateMachine,
                            view: StatusView) -> SessionPlan:
        """Register until grouped (:func:`register_until_grouped`); the backoff starts over."""
        plan = await register_until_grouped(role, hello, states, view, matchmaker=self.matchmaker,
                                            heartbeat=self.cfg().daemon.heartbeat, backoff=self.backoff,
                                            fingerprint=self.fingerprint)
        self.backoff().reset()
        return plan

    def open_link(self, plan: SessionPlan) -> OpenLink:
        """How ``plan``'s running session stays open at the matchmaker (join in progress)."""
        return OpenLink(hello=lambda members, free: open_hello(self.cfg(), plan, members, free),
                        matchmaker=self.matchmaker, fingerprint=self.fingerprint,
                        heartbeat=self.cfg().daemon.heartbeat)

    async def report_expelled(self, plan: SessionPlan, member: str, why: str) -> None:
        """Tell the matchmaker this host expelled ``member`` (a fingerprint) from ``plan``'s
        group: it will not place them together again."""
        await report_expelled(self.matchmaker(), self.identity(), plan.group_id, member, why,
                              fingerprint=self.fingerprint())


__all__ = ["Registrar", "group_settings", "make_hello", "open_hello", "register_until_grouped"]
