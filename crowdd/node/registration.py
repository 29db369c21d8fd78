"""Getting in line at the matchmaker: the ``hello`` a node sends, and registering until a
group forms — retrying with jittered backoff while the matchmaker is away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from crowdd import wire
from crowdd.node.backoff import Backoff
from crowdd.node.status import StatusView
from crowdd.config import DaemonConfig
from crowdd.node.context import SessionFailed
from crowdd.node.host import HostRequest, Prepared
from crowdd.matchmaker_client import register
from crowdd.node.ports import Reservation
from crowdd.node.states import State


def make_hello(
    d: DaemonConfig, name: str, role: str, res: Reservation, prepared: Prepared | None, request: HostRequest | None
) -> dict[str, Any]:
    hello: dict[str, Any] = {
        "role": role,
        "name": name,
        "ports": {"data": res.data_port, "session": res.session_port, "tf": res.tf_ports},
        "tag": d.tag,
        "want_tag": d.want_tag,
    }
    if d.advertise_host:
        hello["advertise"] = d.advertise_host
    if role == "host" and prepared is not None and request is not None:
        hello["job"] = request.job.to_dict()
        hello["dataset"] = {"digest": prepared.manifest.digest(), "size": prepared.manifest.size, "name": prepared.name[:255] or "dataset"}
    return hello


async def register_until_grouped(
    role: str,
    hello: dict[str, Any],
    view: StatusView,
    *,
    matchmaker: Callable[[], tuple[str, int]],
    heartbeat: float,
    backoff: Callable[[], Backoff],
) -> dict[str, Any]:
    """Register (again and again) until the matchmaker sends this node's ``group`` frame.
    A host whose job the matchmaker refuses gets a :class:`SessionFailed`."""
    while True:
        view.to(State.REGISTERING)
        view.queue = None
        mm = matchmaker()
        try:
            return await register(mm, hello, heartbeat=heartbeat, on_wait=view.on_wait)
        except wire.RemoteError as exc:
            if exc.code in (wire.ErrorCode.BAD_FIELD.value, wire.ErrorCode.VERSION.value) and role == "host":
                raise SessionFailed(f"the matchmaker refused this job: {exc.message}") from None
            why = f"the matchmaker said {exc.code}: {exc.message}"
        except (wire.ConnectionClosed, wire.FrameTimeout, wire.WireError, OSError) as exc:
            why = str(exc) or type(exc).__name__
        delay = backoff().next()
        view.log(logging.WARNING, f"matchmaker {mm[0]}:{mm[1]}: {why}; retrying in {delay:.1f} s")
        await asyncio.sleep(delay)


__all__ = ["make_hello", "register_until_grouped"]
