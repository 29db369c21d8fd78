"""The session plan: everything one group session computes from, fixed when the group forms.

The matchmaker's ``group`` frame is checked once on arrival (:func:`crowdd.protocol.matchmaker.
check_group`) and becomes a :class:`SessionPlan`, which the daemon passes explicitly to
replication, the session channel and the job launcher. The host decided every group-wide
setting (:class:`crowdd.hyperparams.GroupSettings`); a node's own config only sets local things
(threads, nice, ports, caps) and never changes what the group computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crowdd.hyperparams import GroupSettings, Job
from crowdd.route import Plan, node_plan

HOST_INDEX = 0


@dataclass(frozen=True)
class MemberPorts:
    """Where a member serves: the data port, the session port (the host's), its TF ports."""

    data: int
    session: int
    tf: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "session": self.session, "tf": list(self.tf)}


@dataclass(frozen=True)
class PlanMember:
    """One member of the group as the matchmaker vouches for it. ``name`` is the name it
    registered with; ``cert`` (PEM) and its ``fingerprint`` are the identity every peer pins
    for it; ``reachable`` says whether the matchmaker could connect back to its data port."""

    index: int
    role: str
    name: str
    address: str
    ports: MemberPorts
    cert: bytes = b""
    fingerprint: str = ""
    reachable: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "role": self.role, "name": self.name, "address": self.address,
                "ports": self.ports.to_dict(), "cert": self.cert.decode("ascii"), "fingerprint": self.fingerprint,
                "reachable": self.reachable}


@dataclass(frozen=True)
class DatasetRef:
    """The host's dataset as the group knows it before replication: the manifest's sha256
    (the only thing data is trusted against), the data size and a display name."""

    digest: str
    size: int
    name: str

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "name": self.name}


@dataclass(frozen=True)
class SessionPlan:
    """One group session as this node (``index``) takes part in it. ``joining``: the session
    is already running and this node joins it as its newest member (the matchmaker's ``group``
    frame with ``join: true``)."""

    group_id: str
    token: str
    index: int
    members: tuple[PlanMember, ...]
    job: Job
    dataset: DatasetRef
    settings: GroupSettings
    joining: bool = False  # this node joins a session already running (the matchmaker's ``join``)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def host(self) -> PlanMember:
        return self.members[HOST_INDEX]

    @property
    def me(self) -> PlanMember:
        return self.members[self.index]

    @property
    def is_host(self) -> bool:
        return self.index == HOST_INDEX

    @property
    def reachable(self) -> tuple[bool, ...]:
        """Whether the matchmaker could connect back to each member (False: behind a NAT)."""
        return tuple(m.reachable for m in self.members)

    def route(self, index: int | None = None) -> Plan:
        """Where ``index`` (this node by default) fetches from and sends to, by the host's
        route; unreachable members are leaves fed by reachable ones."""
        return node_plan(self.size, self.index if index is None else index, self.settings.route, self.reachable)

    def summary(self) -> dict[str, Any]:
        """What status shows of the plan (never the token)."""
        return {"group_id": self.group_id, "index": self.index, "size": self.size,
                "job": self.job.to_dict(), "dataset": self.dataset.to_dict(), "settings": self.settings.to_dict()}


__all__ = ["HOST_INDEX", "DatasetRef", "MemberPorts", "PlanMember", "SessionPlan"]
