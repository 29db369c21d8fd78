"""What one session cycle (a host leading, or a worker following) works with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.cache import DatasetCache
from crowdd.config import Config
from crowdd.errors import SessionFailed
from crowdd.identity import Identity
from crowdd.manifest import Manifest
from crowdd.node.launcher import JobLauncher, LaunchError
from crowdd.node.ports import Reservation
from crowdd.node.states import State, StateMachine
from crowdd.node.status import StatusView
from crowdd.node.supervisor import JobSupervisor
from crowdd.plan import SessionPlan


@dataclass
class SessionContext:
    """The collaborators of one cycle: this node's settings (as of its start; local things
    only — what the group computes comes from the plan), the state authority, the status view,
    the job launcher, the dataset cache, how long to linger in FINISHED, and this node's TLS
    identity (its peers pin it)."""

    cfg: Config
    states: StateMachine
    view: StatusView
    jobs: JobLauncher
    cache: DatasetCache
    linger: float
    identity: Identity

    def to(self, state: State) -> None:
        """Move the state authority (an invalid move raises: it is a daemon bug)."""
        self.states.to(state)

    async def start_job(
        self, plan: SessionPlan, task_index: int, cluster: dict[str, list[str]], data: Path, manifest: Manifest,
        on_event: Callable[[dict[str, Any]], None], res: Reservation,
    ) -> JobSupervisor:
        try:
            return await self.jobs.start(plan, task_index, cluster, data, manifest, on_event, res)
        except LaunchError as exc:
            raise SessionFailed(exc.message) from None


__all__ = ["SessionContext", "SessionFailed"]
