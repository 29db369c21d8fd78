"""The idle policy, asked on this node's behalf: :class:`IdleWatch`.

At standby the daemon's main loop asks it before it registers a worker. While a worker cycle
runs, :meth:`IdleWatch.run` asks it every ``interval`` (1 s), and at once when something it
decides on changed (:meth:`IdleWatch.recheck`: a pause, a resume). When it says no mid-session
the host hears ``away`` first, then the job is suspended, or the worker leaves the session
(``[idle] on_busy``); idle again, the job resumes and the host hears ``back``. Out of a session
(queued at the matchmaker) a no takes the worker out of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from crowdd.idle.policy import AlwaysIdle, Policy, Verdict
from crowdd.node.handle import SessionHandle
from crowdd.node.launcher import JobLauncher
from crowdd.node.states import State
from crowdd.node.status import StatusView

log = logging.getLogger(__name__)


class IdleWatch:
    """``state()`` is the daemon's state; ``handle()`` the running cycle's (None: none);
    ``leave(reason)`` ends the running cycle."""

    def __init__(self, policy: Policy, view: StatusView, jobs: JobLauncher, *, state: Callable[[], State],
                 handle: Callable[[], SessionHandle | None], leave: Callable[[str], None],
                 standby_interval: float, interval: float) -> None:
        self.policy = policy
        self.view = view
        self.jobs = jobs
        self.state, self.handle, self.leave = state, handle, leave
        self.standby_interval = standby_interval  # standby: how often the policy is asked
        self.interval = min(interval, standby_interval)  # while a worker cycle runs
        self._recheck = asyncio.Event()
        self._evaluating = asyncio.Lock()  # one evaluation at a time (the policy keeps CPU history)

    async def evaluate(self) -> Verdict:
        """Ask the policy now; status shows its verdict."""
        async with self._evaluating:
            if isinstance(self.policy, AlwaysIdle):
                v = self.policy.evaluate()
            else:
                v = await asyncio.get_running_loop().run_in_executor(None, self.policy.evaluate)
        old, self.view.verdict = self.view.verdict, v
        if (v.allowed, v.rule) != (old.allowed, old.rule):  # not each new CPU figure: asked every second
            log.info("idle policy: %s", v.reason)
        return v

    def recheck(self) -> None:
        """Something the policy decides on changed: a running watch asks it at once."""
        self._recheck.set()

    async def run(self) -> None:
        """While a worker cycle runs: ask every ``interval`` and at once on :meth:`recheck`;
        returns once the cycle is being left."""
        while True:
            self._recheck.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), self.interval)
            if not await self.act_on(await self.evaluate()):
                return

    async def act_on(self, verdict: Verdict) -> bool:
        """Apply a verdict to the running worker cycle; False once the cycle is being left."""
        sup = self.jobs.current
        handle = self.handle()
        if verdict.allowed:
            if sup is not None and sup.suspended:
                sup.resume()
                self.view.log(logging.INFO, f"idle again ({verdict.reason}); job resumed")
            if handle is not None:
                handle.back()  # after the resume: the host may count on this worker again
            return True
        if self.state() in (State.REPLICATING, State.TRAINING) and self.policy.on_busy == "suspend":
            if handle is not None and handle.away_reason is None:
                handle.away(verdict.reason)  # before the suspend: the host stops waiting for it
            if sup is not None and not sup.suspended:
                sup.suspend()
                self.view.log(logging.INFO, f"machine busy ({verdict.reason}); job suspended")
            return True
        if handle is not None:
            handle.away(verdict.reason, staying=False)  # a polite goodbye, flushed on close
        self.leave(f"the idle policy says no: {verdict.reason}")
        return False


__all__ = ["IdleWatch"]
