"""What one session cycle (a host leading, or a worker following) works with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.node.status import StatusView
from crowdd.cache import DatasetCache
from crowdd.config import Config
from crowdd.node.launcher import JobLauncher, LaunchError
from crowdd.manifest import Manifest
from crowdd.node.ports import Reservation
from crowdd.supervisor import JobSupervisor


class SessionFailed(Exception):
    """A session cycle that failed; the message is for the user (status ``error``)."""


@dataclass
class SessionContext:
    """The collaborators of one cycle: settings (as of its start), the status view, the
    job launcher, the dataset cache, and how long to linger in FINISHED."""

    cfg: Config
    view: StatusView
    jobs: JobLauncher
    cache: DatasetCache
    linger: float

    async def start_job(
        self, role: str, index: int, cluster: dict[str, list[str]], workdir: Path, data: Path, manifest: Manifest,
        on_event: Callable[[dict[str, Any]], None], res: Reservation,
    ) -> JobSupervisor:
        try:
            return await self.jobs.start(role, index, cluster, workdir, data, manifest, self.view.job or {}, on_event, res)
        except LaunchError as exc:
            raise SessionFailed(str(exc)) from None


__all__ = ["SessionContext", "SessionFailed"]
