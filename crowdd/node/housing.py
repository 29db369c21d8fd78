"""Where this node's jobs would run, and whether they may: the job's housing.

A TF server runs any graph it is sent, so a job runs only confined (a private network
namespace, :mod:`crowdd.platform.userns`) and sandboxed (Landlock, :mod:`crowdd.platform.sandbox`),
unless the volunteer's config allows otherwise; and it gets a cgroup of its own with hard caps
where the daemon may make one (:mod:`crowdd.platform.cgroups`), else its memory is polled.
:class:`JobHousing` finds all three at the daemon's start, says in the status what it found
(``tensorflow``), and answers whether the node may train as configured now.
"""

from __future__ import annotations

import asyncio
import logging

from crowdd.config import Config
from crowdd.node.context import training_refusal
from crowdd.node.launcher import JobLauncher
from crowdd.node.status import StatusView
from crowdd.platform import sandbox as landlock
from crowdd.platform import userns
from crowdd.platform.cgroups import CgroupUnavailable, JobCgroups
from crowdd.platform.sandbox import SandboxSupport
from crowdd.platform.userns import Confinement

log = logging.getLogger(__name__)


class JobHousing:
    """The confinement, sandbox and caps this node's jobs get. ``confinement`` and ``sandbox``
    given here are taken as found (tests); otherwise :meth:`find` probes them."""

    def __init__(self, confinement: Confinement | None = None, sandbox: SandboxSupport | None = None) -> None:
        self._confinement = confinement
        self._sandbox = sandbox
        self.caps = "not checked yet"  # how jobs' memory and task caps are held

    @property
    def confinement(self) -> Confinement:
        return self._confinement if self._confinement is not None else Confinement(False, "not checked yet")

    @property
    def sandbox(self) -> SandboxSupport:
        return self._sandbox if self._sandbox is not None else SandboxSupport(False, 0, "not checked yet")

    async def find(self, job_python: str, jobs: JobLauncher) -> None:
        """Probe what this machine allows (the job's interpreter tries a namespace), and give
        ``jobs`` their cgroups where they can have them."""
        if self._confinement is None:
            self._confinement = await asyncio.get_running_loop().run_in_executor(None, userns.probe, job_python)
        if self._sandbox is None:
            self._sandbox = landlock.probe()
        try:
            cgroups = JobCgroups.find()
        except CgroupUnavailable as exc:
            self.caps = f"poll ({exc})"
            log.info("jobs' memory cap is a poll: %s", exc)
            return
        for d in cgroups.sweep():
            log.info("removed a job cgroup a stopped daemon left: %s", d)
        jobs.cgroups = cgroups
        self.caps = f"cgroup v{cgroups.version}"
        log.info("jobs get a cgroup of their own (v%d) below %s", cgroups.version, cgroups.bases[0])

    def refusal(self, cfg: Config) -> str | None:
        """Why this node may not run a job as ``cfg`` says, or None when it may."""
        return training_refusal(cfg, self.confinement, self.sandbox)

    def show(self, cfg: Config, view: StatusView) -> None:
        """Status's ``tensorflow``, and a warning where the user looks when jobs run exposed."""
        c, sb = self.confinement, self.sandbox
        refusal = self.refusal(cfg)
        reasons = [r for r in (c.reason, sb.reason) if r]
        view.tensorflow = {"confined": c.available, "sandboxed": sb.available, "landlock_abi": sb.abi,
                           "caps": self.caps, "private_view": c.private_view,
                           "allowed": refusal is None, "reason": refusal or "; ".join(reasons)}
        if refusal is not None:
            view.log(logging.WARNING, refusal)
            return
        if c.available and not c.private_view:
            log.info("jobs see this machine's /proc, host name and users (%s)", c.view_reason)
        if not c.available:
            view.log(logging.WARNING, f"TensorFlow runs EXPOSED to the network ({c.reason}); "
                     "[security] allow_exposed_tensorflow = true: trusted LANs only")
        if not sb.available:
            view.log(logging.WARNING, f"TensorFlow runs UNSANDBOXED ({sb.reason}): group members' graphs can "
                     "touch this user's files; [security] allow_unsandboxed = true: trusted groups only")


__all__ = ["JobHousing"]
