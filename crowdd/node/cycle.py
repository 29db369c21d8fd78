"""One cycle of the daemon: reserve this node's ports, register at the matchmaker until a group
forms, then lead the session (a host, :mod:`crowdd.node.host`) or follow it (a worker,
:mod:`crowdd.node.worker`). The daemon's main loop starts a cycle when there is something to do
and tears it down after (:mod:`crowdd.node.daemon`).
"""

from __future__ import annotations

import logging

from crowdd.errors import SessionFailed
from crowdd.node.context import SessionContext
from crowdd.node.host import lead
from crowdd.node.hosted import HostedJob
from crowdd.node.hosting import HostingDesk, describe
from crowdd.node.ports import Reservation
from crowdd.node.registration import Registrar
from crowdd.node.states import State
from crowdd.node.worker import follow


async def run_cycle(role: str, c: SessionContext, hosting: HostingDesk, registrar: Registrar) -> None:
    """One pass as ``role`` ("host": what ``hosting`` holds); a session that cannot go on
    raises :class:`SessionFailed` with the reason."""
    prepared: HostedJob | None = None
    if role == "host":
        c.to(State.REGISTERING)
        prepared = hosting.prepared
        if hosting.request is None or prepared is None:
            raise SessionFailed("nothing to host")
        rec = c.view.session
        if rec is not None:
            rec.job = prepared.job
            info = describe(prepared)
            rec.dataset = {k: info[k] for k in ("name", "size", "digest")}
    d = c.cfg.daemon
    try:
        res = Reservation(d.listen_host, d.data_port, d.session_port, 2 if role == "host" else 1)
    except OSError as exc:
        raise SessionFailed(f"cannot bind the session ports: {exc}") from None
    try:
        plan = await registrar.until_grouped(role, registrar.hello(role, res, prepared), c.states, c.view)
        c.view.joined(plan)
        c.view.log(logging.INFO, f"joined group {plan.group_id} as node {plan.index} of {plan.size}")
        if role == "host" and prepared is not None:
            c.handle.link = registrar.open_link(plan)
            await lead(c, plan, res, prepared, record=hosting.record, resume_from=hosting.resume_from)
        else:
            await follow(c, plan, res)
    finally:
        await c.jobs.stop()
        res.close()


__all__ = ["run_cycle"]
