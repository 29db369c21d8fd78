"""The crowdd daemon: wires the donation state machine, the control socket, the idle policy
and the session cycles together.

One per machine; asyncio; never imports TensorFlow (the job child does). States: see
:mod:`crowdd.node.states`. Every transition is an event on the control socket and a log line
(:mod:`crowdd.node.status` keeps what status reports).

Roles: a worker registers while donation is on and the idle policy allows; a host registers
when asked to host a dataset. A *cycle* is one pass: reserve ports (:mod:`crowdd.node.ports`),
register at the matchmaker (:mod:`crowdd.node.registration`, retrying with jittered backoff; the
matchmaker may come and go), then lead (:mod:`crowdd.node.host`) or follow
(:mod:`crowdd.node.worker`) the group session, then tear everything down (the job's process
group included, :mod:`crowdd.node.launcher`). Collaborators (policy, notifier, matchmaker address,
endpoint, config loader) come in through the constructor so several daemons can run in one
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from crowdd import wire
from crowdd.node import disk
from crowdd.node.tunnels import remove_stale_socket_dirs
from crowdd.node.backoff import Backoff
from crowdd.node.status import StatusView
from crowdd.data.cache import DatasetCache
from crowdd.config import Config, ConfigError, Paths, parse_hostport
from crowdd.errors import InputError
from crowdd.protocol.control import format_pause
from crowdd.node.control import ControlServer
from crowdd.protocol.endpoint import Endpoint
from crowdd.node.context import SessionContext
from crowdd.errors import SessionFailed
from crowdd.node.donation import DonationSwitch
from crowdd.node.handle import SessionHandle
from crowdd.node.housing import JobHousing
from crowdd.node.idlewatch import IdleWatch
from crowdd.node.hosting import HostingDesk, describe
from crowdd.protocol.control import HostRequest, Status
from crowdd.idle.policy import IdlePolicy, Policy
from crowdd.trust.identity import Identity, IdentityError
from crowdd.job.spec import Settings
from crowdd.node.launcher import JobLauncher
from crowdd.node.registration import Registrar
from crowdd.node.states import State, StateMachine
from crowdd.platform.sandbox import SandboxSupport
from crowdd.platform.systemd import Notifier
from crowdd.platform.userns import Confinement
from crowdd.aio import cancel_and_wait

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between idle-policy checks while a worker cycle runs
STOP_GRACE = 120.0  # seconds a host job has to save its model after `crowdd stop`
S = State


class Daemon:
    """One node. ``await start()``, later ``await close()``; or ``await main()`` for both."""

    def __init__(
        self,
        cfg: Config,
        paths: Paths,
        *,
        endpoint: Endpoint,
        matchmaker: tuple[str, int],
        policy: Policy,
        notifier: Notifier | None = None,
        config_loader: Callable[[], Config] | None = None,
        rng: random.Random | None = None,
        job_python: str = sys.executable,
        job_env: Mapping[str, str] | None = None,
        finished_linger: float = 2.0,
        policy_interval: float = 30.0,
        watch_interval: float = WATCH_INTERVAL,
        name: str | None = None,
        confinement: Confinement | None = None,
        sandbox: SandboxSupport | None = None,
    ) -> None:
        self.cfg = cfg
        self.paths = paths
        self._endpoint = endpoint
        self._mm = matchmaker
        self._mm_fixed = False
        self._policy = policy
        self._notifier = notifier or Notifier()
        self._config_loader = config_loader
        self._rng = rng or random.Random()
        self._linger = finished_linger
        self.name = (name or cfg.daemon.name or socket.gethostname() or "crowdd")[:64]
        self.cache = DatasetCache(paths.dataset_cache)
        self._control = ControlServer(self, endpoint)
        self.states = StateMachine(self._on_transition)
        self.view = StatusView(self.name, self.states, self._control.publish, self._notifier)
        self._donation = DonationSwitch(paths.state_dir, policy, self.view)
        self._jobs = JobLauncher(
            paths.jobs_dir, job_python, job_env if job_env is not None else os.environ, self._local_settings,
            guard=(paths.state_dir, paths.config_file.parent, paths.cache_dir, paths.runtime_dir, paths.log_dir),
            dataset_cache=paths.dataset_cache,
        )
        self._wake = asyncio.Event()
        self.idle = IdleWatch(policy, self.view, self._jobs, state=lambda: self.state, handle=lambda: self._handle,
                              leave=self._abort, standby_interval=policy_interval, interval=watch_interval)
        self._main: asyncio.Task[None] | None = None
        self._cycle: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._abort_reason: str | None = None
        self._backoff = Backoff(cfg.daemon.retry_min, cfg.daemon.retry_max, self._rng)
        self.disk = disk.DiskKeeper(paths.dataset_cache, paths.jobs_dir, lambda: self.cfg.limits.disk_max_gb)
        self.hosting = HostingDesk(paths.state_dir, paths.cache_dir, self.cache, self.view,
                                   chunk_size=lambda: self.cfg.replication.chunk_size,
                                   disk_max_gb=lambda: self.cfg.limits.disk_max_gb, prune=self.disk.prune)
        self.registrar = Registrar(lambda: self.cfg, self.name, lambda: self.identity, lambda: self._mm,
                                   lambda: self._backoff)
        self._identity: Identity | None = None
        self._handle: SessionHandle | None = None  # the daemon's hold on the current cycle's session
        self._closing = False
        self.stop_grace = STOP_GRACE
        self._job_python = job_python
        self.housing = JobHousing(confinement, sandbox)

    # ------------------------------------------------------------------ life cycle

    @property
    def state(self) -> State:
        return self.states.state

    @property
    def identity(self) -> Identity:
        """This node's TLS identity (its peers pin it), loaded, or made the first time, when a
        cycle first needs it: a daemon at rest holds no key (nor the library that reads one)."""
        if self._identity is None:
            self._identity = Identity.load_or_create(self.paths.identity_dir, "node")
        return self._identity

    @property
    def donating(self) -> bool:
        return self._donation.on

    @property
    def control(self) -> ControlServer:
        return self._control

    async def start(self) -> None:
        self.paths.ensure()
        self.cache.ensure()
        remove_stale_socket_dirs(self.paths.runtime_dir)  # left by a daemon that was killed
        self.hosting.start()
        resume_from = self.hosting.resume_from
        await self.disk.prune(keep=(resume_from,) if resume_from is not None else ())
        await self.housing.find(self._job_python, self._jobs)
        self.housing.show(self.cfg, self.view)
        self._donation.load()
        await self._control.start(self.identity if self._endpoint.is_tcp else None)
        self._main = asyncio.create_task(self._loop(), name="crowdd-daemon")
        interval = self._notifier.watchdog_interval
        if interval:
            self._watchdog = asyncio.create_task(self._watchdog_loop(interval))
        self._notifier.ready(self.view.status_line())
        logger.info("crowdd daemon %s ready (%s, donation %s)", self.name, self._endpoint.describe(), "on" if self.donating else "off")

    async def close(self) -> None:
        self._closing = True  # a hosted session cut short by the stop is resumed at the next start
        self._notifier.stopping()
        logger.info("crowdd daemon %s stopping", self.name)
        await cancel_and_wait(self._main, self._watchdog, timeout=60.0)
        await self._control.close()
        self.hosting.drop_staging()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    @property
    def can_train(self) -> bool:
        """Whether this node may run a job: confined and sandboxed, or not where the config
        allows it."""
        return self._refusal() is None

    def _refusal(self) -> str | None:
        return self.housing.refusal(self.cfg)

    # ------------------------------------------------------------------ requests (control)

    def status(self) -> Status:
        return self.view.status()

    async def donate(self, on: bool) -> dict[str, Any]:
        if self._donation.switch(on):
            self.view.log(logging.INFO, f"donation switched {'on' if on else 'off'}")
            if not on and self.view.role == "worker":
                self._abort("donation switched off")
            self._wake.set()
        return {"type": "ok", "donating": self.donating}

    async def pause(self, hours: float) -> dict[str, Any]:
        """Hold donation back for ``hours`` (checked at the control socket): at once, by the same
        path as the policy turning busy mid-session (suspend the job, or leave, per
        ``[idle] on_busy``). A new pause replaces a running one. A session this node hosts goes
        on (``crowdd stop`` ends it)."""
        try:
            until = self._donation.pause(hours)
        except ValueError as exc:
            raise InputError(str(exc), field="hours") from None
        shown = format_pause(until) if until is not None else "paused"
        self.view.log(logging.INFO, f"{shown}: donation held back; `crowdd resume` ends the pause early")
        await self._policy_changed()
        return {"type": "ok", "paused_until": until}

    async def resume(self) -> dict[str, Any]:
        """End the user's pause now; the daemon asks the idle policy again at once."""
        was_paused = self._donation.resume()
        if was_paused:
            self.view.log(logging.INFO, "pause ended by the user: donation goes on as the idle policy allows")
        await self._policy_changed()
        return {"type": "ok", "paused_until": None, "was_paused": was_paused}

    async def _policy_changed(self) -> None:
        """Something the policy decides on changed: status shows the new verdict now, and the
        main loop (standby) and a worker cycle's watch act on it at once."""
        if self.donating:
            await self.idle.evaluate()
        self.idle.recheck()
        self._wake.set()

    async def host(self, request: HostRequest) -> dict[str, Any]:
        """Host ``request`` (checked at the control socket) once this node is free to."""
        refusal = self._refusal()
        if refusal is not None:
            raise wire.WireError(wire.ErrorCode.BUSY, refusal)
        prepared = await self.hosting.take(request, lambda: self.state)
        if self.view.role == "worker":
            self._abort("switching to host")
        info = describe(prepared)
        self.view.log(logging.INFO, f"hosting {info['name']} ({info['digest'][:12]}); looking for workers")
        self._wake.set()
        return {"type": "ok", "dataset": info}

    async def stop(self) -> dict[str, Any]:
        self.hosting.withdraw()
        cycle = self._cycle
        if cycle is None:
            return {"type": "ok"}
        if self.view.role == "host" and self.state == S.TRAINING and self._handle is not None and self._handle.stop():
            # The job ends the group's training itself, keeping the checkpoint and the model
            # trained so far; if it cannot within the grace period it is stopped the hard way.
            self.view.log(logging.INFO, "stopping: the whole group's training ends; keeping the latest "
                          "checkpoint and writing the model trained so far")

            def hard_stop() -> None:
                if self._cycle is cycle:
                    self._abort(f"stopped by the user (the job did not end within {self.stop_grace:g} s)")

            asyncio.get_running_loop().call_later(self.stop_grace, hard_stop)
            return {"type": "ok", "keeps_model": True}
        self._abort("stopped by the user")
        return {"type": "ok"}

    async def reload(self) -> dict[str, Any]:
        if self._config_loader is None:
            return {"type": "ok"}
        try:
            cfg = self._config_loader()
            if isinstance(self._policy, IdlePolicy):
                self._policy.reconfigure(cfg.idle)
        except ConfigError as exc:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, str(exc), field=exc.key) from None
        self.cfg = cfg
        self.housing.show(self.cfg, self.view)
        if not self._mm_fixed:
            with contextlib.suppress(ValueError):
                self._mm = parse_hostport(cfg.daemon.matchmaker)
        self._backoff = Backoff(cfg.daemon.retry_min, cfg.daemon.retry_max, self._rng)
        self.view.log(logging.INFO, "configuration reloaded")
        self._wake.set()
        return {"type": "ok"}

    def fix_matchmaker(self) -> None:
        """The matchmaker address came from the command line: reload keeps it."""
        self._mm_fixed = True

    # ------------------------------------------------------------------ main loop

    def _abort(self, reason: str) -> None:
        if self._cycle is not None and not self._cycle.done():
            self._abort_reason = reason
            self._cycle.cancel()

    async def _next_role(self) -> str:
        """Wait until there is something to do: host a dataset, or donate."""
        while True:
            self._wake.clear()
            if self.hosting.request is not None:
                return "host"
            timeout: float | None = None
            if self.donating:
                self.states.to(S.STANDBY)
                if not self.can_train:
                    pass  # status says why (tensorflow); a reload may allow it
                else:
                    allowed = (await self.idle.evaluate()).allowed
                    if not self.donating or self.hosting.request is not None:
                        continue  # switched off, or asked to host, while the policy was asked
                    if allowed:
                        return "worker"
                    timeout = self.idle.standby_interval
                    until = self._policy.paused_until
                    if until is not None:  # ask again as soon as the pause ends
                        timeout = min(timeout, max(0.0, until - time.time()) + 0.05)
            else:
                self.states.to(S.OFF)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _loop(self) -> None:
        failed = False
        try:
            while True:
                if failed:
                    delay = self._backoff.next()
                    logger.info("next attempt in %.1f s", delay)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                role = await self._next_role()
                self._abort_reason = None
                self.view.begin(role)  # before the task runs: an abort can find it at once
                self._cycle = asyncio.create_task(self._run_cycle(role), name=f"crowdd-{role}")
                await asyncio.wait({self._cycle})
                if self.view.session is not None:  # cancelled before it even started
                    await self._teardown()
                failed = False
                if self._cycle.cancelled():
                    if self._abort_reason:
                        self.view.log(logging.INFO, f"session ended: {self._abort_reason}")
                elif (exc := self._cycle.exception()) is not None:
                    failed = True
                    logger.error("session cycle failed", exc_info=exc)
                    self._fail_last(f"internal error: {exc}")
                elif self.view.last is not None and self.view.last.error is not None:
                    failed = True
                self._cycle = None
        finally:
            if self._cycle is not None:
                await cancel_and_wait(self._cycle, timeout=30.0)

    async def _run_cycle(self, role: str) -> None:
        view = self.view
        if view.session is None:
            view.begin(role)
        watch = asyncio.create_task(self.idle.run()) if role == "worker" else None
        try:
            from crowdd.node.cycle import run_cycle  # a session's modules: loaded when one starts

            cycle = SessionContext(
                self.cfg, self.states, view, self._jobs, self.cache, self._linger, self.identity,
                self.housing.confinement, self.housing.sandbox, self.paths.runtime_dir,
                report_expelled=self.registrar.report_expelled,
            )
            self._handle = cycle.handle
            await run_cycle(role, cycle, self.hosting, self.registrar)
        except (SessionFailed, IdentityError) as exc:
            view.fail(exc.message)
            view.log(logging.ERROR, exc.message)
        finally:
            await cancel_and_wait(watch)
            await self._teardown()

    async def _teardown(self) -> None:
        await self._jobs.stop()
        if self.view.role == "host":
            rec = self.view.session
            self.hosting.ended(closing=self._closing, finished=rec is not None and rec.result is not None)
        await self.disk.prune()  # the session's files are the newest: older ones go first
        self.view.end()
        self.states.to(S.STANDBY if self.donating else S.OFF)

    def _local_settings(self) -> Settings:
        """This node's own job settings (threads, nice, checkpoints); the group-wide ones come
        from the session plan (:meth:`JobLauncher.settings`)."""
        j = self.cfg.job
        threads = max(1, min(j.threads, getattr(self._policy, "tf_threads", j.threads)))
        return Settings(threads=threads, nice=j.nice, checkpoint_secs=j.checkpoint_secs)

    def _on_transition(self, old: State, new: State) -> None:
        self.view.on_transition(old, new)

    def _fail_last(self, message: str) -> None:
        """A cycle died of a bug: say so where the user looks (the last session's error)."""
        rec = self.view.last if self.view.session is None else self.view.session
        if rec is not None:
            rec.error = message


__all__ = ["Daemon"]
