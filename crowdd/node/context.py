"""What one session cycle (a host leading, or a worker following) works with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crowdd.data.cache import DatasetCache
from crowdd.config import Config
from crowdd.errors import SessionFailed
from crowdd.trust.identity import Identity
from crowdd.data.manifest import Manifest
from crowdd.node.disk import gb_to_bytes
from crowdd.node.handle import SessionHandle
from crowdd.node.launcher import JobLauncher, JobLimits, LaunchError
from crowdd.node.ports import Reservation
from crowdd.node.states import State, StateMachine
from crowdd.node.status import StatusView
from crowdd.node.supervisor import JobSupervisor
from crowdd.node.tunnels import RelaySetup
from crowdd.platform.sandbox import SandboxSupport
from crowdd.platform.userns import Confinement
from crowdd.plan import SessionPlan


@dataclass
class SessionContext:
    """The collaborators of one cycle: this node's settings (as of its start; local things
    only — what the group computes comes from the plan), the state authority, the status view,
    the job launcher, the dataset cache, how long to linger in FINISHED, and this node's TLS
    identity (its peers pin it), and whether its jobs can be confined to a private network and
    sandboxed."""

    cfg: Config
    states: StateMachine
    view: StatusView
    jobs: JobLauncher
    cache: DatasetCache
    linger: float
    identity: Identity
    confinement: Confinement
    sandbox: SandboxSupport
    runtime_dir: Path | None = None  # where the job's relay sockets go (crowdd.node.tunnels.socket_dir)
    handle: SessionHandle = field(default_factory=SessionHandle)  # the daemon's hold on this cycle's session
    # a host tells the matchmaker whom it expelled (plan, member fingerprint, why); None: nobody to tell
    report_expelled: Callable[[SessionPlan, str, str], Awaitable[None]] | None = None

    def to(self, state: State) -> None:
        """Move the state authority (an invalid move raises: it is a daemon bug)."""
        self.states.to(state)

    async def start_job(
        self, plan: SessionPlan, task_index: int, cluster: dict[str, list[str]], data: Path, manifest: Manifest,
        on_event: Callable[[dict[str, Any]], None], res: Reservation, directory: Path,
        serve: list[tuple[str, int]], reach: list[tuple[str, int]],
    ) -> JobSupervisor:
        """Start this node's job; its TF tasks ``serve`` and ``reach`` go through the relay in
        ``directory`` (:mod:`crowdd.node.tunnels`)."""
        relay = RelaySetup(directory, tuple(serve), tuple(reach), isolated=self.confinement.available,
                           private_view=self.confinement.private_view)
        refusal = training_refusal(self.cfg, self.confinement, self.sandbox)
        if refusal is not None:
            raise SessionFailed(refusal)
        gb = self.cfg.limits.disk_max_gb
        limits = JobLimits(sandbox=self.sandbox.available, max_memory_mb=self.cfg.job.max_memory_mb,
                           disk_cap_bytes=gb_to_bytes(gb) if gb > 0 else 0)
        try:
            return await self.jobs.start(plan, task_index, cluster, data, manifest, on_event, res, relay, limits)
        except LaunchError as exc:
            raise SessionFailed(exc.message) from None


def exposed_refusal(confinement: Confinement) -> str:
    """Why this node does not train, and how to change that (for status, the TUI and logs)."""
    return (f"TensorFlow cannot be confined on this machine ({confinement.reason}); not training. "
            "Allow unprivileged user namespaces, or on a trusted LAN only set "
            "[security] allow_exposed_tensorflow = true")


def unsandboxed_refusal(sandbox: SandboxSupport) -> str:
    return (f"TensorFlow cannot be sandboxed on this machine ({sandbox.reason}); not training. "
            "Use a kernel with Landlock (Linux 5.13+), or on a trusted group only set "
            "[security] allow_unsandboxed = true")


def training_refusal(cfg: Config, confinement: Confinement, sandbox: SandboxSupport) -> str | None:
    """Why this node may not run a job as configured, or None when it may."""
    if not confinement.available and not cfg.security.allow_exposed_tensorflow:
        return exposed_refusal(confinement)
    if not sandbox.available and not cfg.security.allow_unsandboxed:
        return unsandboxed_refusal(sandbox)
    return None


__all__ = ["SessionContext", "SessionFailed", "exposed_refusal", "training_refusal", "unsandboxed_refusal"]
