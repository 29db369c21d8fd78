"""The crowdd daemon: donation state machine, control socket, group sessions, the job.

One per machine; asyncio; never imports TensorFlow (the job child does). States (see
:data:`TRANSITIONS`): off → standby → registering → waiting → replicating → training →
finished → standby, and back to off/standby from anywhere (stop, errors, donation off).
Every transition is an event on the control socket and a log line.

Roles: a worker registers while donation is on and the idle policy allows; a host registers
when asked to host a dataset. A *cycle* is one pass: reserve ports, register at the
matchmaker (retrying with jittered backoff; the matchmaker may come and go), then lead or
follow the group session, then tear everything down (the job's process group included).
Collaborators (policy, notifier, matchmaker address, endpoint, config loader) come in through
the constructor so several daemons can run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd import __version__, wire
from crowdd.auth import AuthError
from crowdd.cache import DatasetCache
from crowdd.config import Config, ConfigError, Paths, load_config, parse_hostport
from crowdd.control import ControlServer, Endpoint
from crowdd.hyperparams import HyperparamError, Job, validate_job
from crowdd.idle import (
    AlwaysIdle,
    IdlePolicy,
    Policy,
    Verdict,
    system_probes,
    thread_env,
)
from crowdd.job.spec import (
    Cluster,
    JobSpec,
    Settings,
    SpecError,
    parse_spec,
    write_spec,
)
from crowdd.manifest import Manifest, ManifestError
from crowdd.matchmaker_client import register
from crowdd.replication import (
    ChunkStore,
    DataServer,
    Peer,
    Progress,
    ReplicationError,
    Replicator,
    fetch_manifest,
)
from crowdd.route import node_plan
from crowdd.session import (
    HostLost,
    HostSession,
    Member,
    SessionRefused,
    WorkerSession,
    cancel_and_wait,
    dead_after,
)
from crowdd.supervisor import JobError, JobSupervisor, job_command
from crowdd.systemd import Notifier

logger = logging.getLogger(__name__)

STATE_FILE = "daemon.json"
JOB_START_TIMEOUT = 180.0  # workers' TF servers must be up within this (TF import is slow)
PROGRESS_INTERVAL = 0.25  # at most this often: replication reports, members broadcasts


# --------------------------------------------------------------------------- states


class State(str, enum.Enum):
    OFF = "off"
    STANDBY = "standby"
    REGISTERING = "registering"
    WAITING = "waiting"
    REPLICATING = "replicating"
    TRAINING = "training"
    FINISHED = "finished"


S = State
#: Forward edges. Besides these, every state may fall back to OFF or STANDBY (stop, an
#: error, donation switched off, the idle policy saying no).
TRANSITIONS: dict[State, frozenset[State]] = {
    S.OFF: frozenset({S.STANDBY, S.REGISTERING}),
    S.STANDBY: frozenset({S.REGISTERING}),
    S.REGISTERING: frozenset({S.WAITING}),
    S.WAITING: frozenset({S.REGISTERING, S.REPLICATING}),
    S.REPLICATING: frozenset({S.TRAINING}),
    S.TRAINING: frozenset({S.FINISHED}),
    S.FINISHED: frozenset(),
}
FALLBACK = frozenset({S.OFF, S.STANDBY})


class InvalidTransition(RuntimeError):
    """A transition the state machine does not allow (a daemon bug, never user input)."""


def allowed(a: State, b: State) -> bool:
    return b in TRANSITIONS[a] or b in FALLBACK


class StateMachine:
    def __init__(self, on_change: Callable[[State, State], None], initial: State = S.OFF) -> None:
        self.state = initial
        self._on_change = on_change

    def to(self, new: State) -> bool:
        """Move to ``new``; False if already there. Raises :class:`InvalidTransition`."""
        old = self.state
        if new == old:
            return False
        if not allowed(old, new):
            raise InvalidTransition(f"{old.value} -> {new.value}")
        self.state = new
        self._on_change(old, new)
        return True


# --------------------------------------------------------------------------- helpers


class CycleError(Exception):
    """A session cycle that failed; the message is for the user (status ``error``)."""


class Backoff:
    """Exponential backoff with full jitter: uniform(min, min(max, min·2^n))."""

    def __init__(self, lo: float, hi: float, rng: random.Random) -> None:
        self.lo, self.hi, self.rng = lo, max(lo, hi), rng
        self.n = 0

    def next(self) -> float:
        cap = min(self.hi, self.lo * (2**self.n))
        self.n = min(self.n + 1, 30)
        return self.rng.uniform(self.lo, cap)

    def reset(self) -> None:
        self.n = 0


@dataclass
class HostRequest:
    dataset: Path
    job: Job
    test_fraction: float | None = None


@dataclass
class Prepared:
    data_path: Path
    manifest: Manifest
    name: str


class Reservation:
    """Sockets bound at registration: data and session listeners, TF ports held until the job."""

    def __init__(self, host: str, data_port: int, session_port: int, tf_count: int) -> None:
        self.data_sock = _listener(host, data_port)
        self.session_sock = _listener(host, session_port)
        self.tf_socks = [_bound(host) for _ in range(tf_count)]
        self.data_port = self.data_sock.getsockname()[1]
        self.session_port = self.session_sock.getsockname()[1]
        self.tf_ports = [s.getsockname()[1] for s in self.tf_socks]

    def release_tf(self) -> None:
        for s in self.tf_socks:
            s.close()

    def close(self) -> None:
        for s in (self.data_sock, self.session_sock, *self.tf_socks):
            s.close()


def _listener(host: str, port: int) -> socket.socket:
    s = socket.create_server((host, port), reuse_port=False, backlog=64)
    s.setblocking(False)
    return s


def _bound(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    return s


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)


# --------------------------------------------------------------------------- the daemon


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
        name: str | None = None,
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
        self._job_python = job_python
        self._job_env = dict(job_env) if job_env is not None else dict(os.environ)
        self._linger = finished_linger
        self._policy_interval = policy_interval
        self.name = (name or cfg.daemon.name or socket.gethostname() or "crowdd")[:64]
        self.cache = DatasetCache(paths.dataset_cache)
        self._sm = StateMachine(self._on_transition)
        self._control = ControlServer(self, endpoint)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._cycle: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._abort_reason: str | None = None
        self._backoff = Backoff(cfg.daemon.retry_min, cfg.daemon.retry_max, self._rng)
        # what status reports
        self.donating = False
        self._verdict = Verdict(False, None, "donation is off")
        self._role: str | None = None
        self._host_request: HostRequest | None = None
        self._queue: dict[str, Any] | None = None
        self._group: dict[str, Any] | None = None
        self._members: list[dict[str, Any]] = []
        self._job: dict[str, Any] | None = None
        self._dataset: dict[str, Any] | None = None
        self._training: dict[str, Any] | None = None
        self._sps: dict[int, float] = {}
        self._result: dict[str, Any] | None = None
        self._error: str | None = None
        self._supervisor: JobSupervisor | None = None
        self._last_members_push = 0.0
        self._members_pending: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ life cycle

    @property
    def state(self) -> State:
        return self._sm.state

    @property
    def control(self) -> ControlServer:
        return self._control

    async def start(self) -> None:
        self.paths.ensure()
        self.cache.ensure()
        self.donating = self._load_persisted().get("donating", False) is True
        await self._control.start()
        self._main = asyncio.create_task(self._loop(), name="crowdd-daemon")
        interval = self._notifier.watchdog_interval
        if interval:
            self._watchdog = asyncio.create_task(self._watchdog_loop(interval))
        self._notifier.ready(self._status_line())
        logger.info("crowdd daemon %s ready (%s, donation %s)", self.name, self._endpoint.describe(), "on" if self.donating else "off")

    async def close(self) -> None:
        self._notifier.stopping()
        logger.info("crowdd daemon %s stopping", self.name)
        await cancel_and_wait(self._main, self._watchdog, timeout=60.0)
        await self._control.close()

    async def main(self) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`request_shutdown`), then shut down cleanly."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._stop.set)
                installed.append(sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            loop.add_signal_handler(signal.SIGUSR1, self.dump_tasks)
            installed.append(signal.SIGUSR1)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.close()
            for sig in installed:
                loop.remove_signal_handler(sig)
        return 0

    def dump_tasks(self) -> None:
        """SIGUSR1: log every pending asyncio task with its stack (to debug a stuck daemon)."""
        import io

        for task in asyncio.all_tasks():
            buf = io.StringIO()
            task.print_stack(limit=8, file=buf)
            logger.warning("task %s:\n%s", task.get_name(), buf.getvalue())

    def request_shutdown(self) -> None:
        self._stop.set()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ persistence

    def _load_persisted(self) -> dict[str, Any]:
        path = self.paths.state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s (donation starts off)", path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _persist(self) -> None:
        path = self.paths.state_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"donating": self.donating}))
            os.replace(tmp, path)
        except OSError as exc:
            logger.error("cannot save the donation switch to %s: %s", path, exc)

    # ------------------------------------------------------------------ events

    def _publish(self, kind: str, **fields: Any) -> None:
        self._control.publish(kind, **fields)

    def _log(self, level: int, message: str) -> None:
        logger.log(level, "%s", message)
        self._publish("log", level=logging.getLevelName(level).lower(), message=message)

    def _on_transition(self, old: State, new: State) -> None:
        logger.info("%s: state %s -> %s", self.name, old.value, new.value)
        self._publish("state", state=new.value, previous=old.value)
        self._notifier.status(self._status_line())

    def _status_line(self) -> str:
        role = f" ({self._role})" if self._role else ""
        return f"{self.state.value}{role}, donation {'on' if self.donating else 'off'}"

    def _to(self, new: State) -> None:
        try:
            self._sm.to(new)
        except InvalidTransition as exc:
            logger.error("internal: refused state transition %s", exc)

    # ------------------------------------------------------------------ status (control)

    def status(self) -> dict[str, Any]:
        group = None
        if self._group is not None:
            group = {"id": self._group.get("group_id"), "index": self._group.get("index"), "members": self._members}
        v = self._verdict
        return {
            "version": __version__,
            "name": self.name,
            "state": self.state.value,
            "donating": self.donating,
            "role": self._role,
            "idle": {"allowed": v.allowed, "rule": v.rule, "reason": v.reason},
            "queue": self._queue,
            "group": group,
            "job": self._job,
            "dataset": self._dataset,
            "training": self._training,
            "result": self._result,
            "error": self._error,
        }

    # ------------------------------------------------------------------ requests (control)

    async def donate(self, on: bool) -> dict[str, Any]:
        if on != self.donating:
            self.donating = on
            self._persist()
            self._log(logging.INFO, f"donation switched {'on' if on else 'off'}")
            if not on and self._role == "worker":
                self._abort("donation switched off")
            if not on:
                self._verdict = Verdict(False, None, "donation is off")
            self._wake.set()
        return {"type": "ok", "donating": self.donating}

    async def host(self, dataset: str, job: dict[str, Any], test_fraction: float | None = None) -> dict[str, Any]:
        try:
            parsed = validate_job(job)
        except HyperparamError as exc:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, exc.message, field=exc.field) from None
        path = Path(dataset)
        if not path.is_absolute():
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"dataset path must be absolute, got {dataset!r}", field="dataset")
        if not path.exists():
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, f"{dataset}: no such file or directory", field="dataset")
        if test_fraction is not None and not 0 < test_fraction < 1:
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, "test_fraction must be between 0 and 1", field="test_fraction")
        if self._host_request is not None or self._role == "host":
            raise wire.WireError(wire.ErrorCode.BUSY, "already hosting; `crowdd stop` ends that session first")
        if self._role == "worker" and self.state not in (S.STANDBY, S.REGISTERING, S.WAITING):
            raise wire.WireError(wire.ErrorCode.BUSY, f"this node is {self.state.value} as a worker; `crowdd stop` first")
        self._host_request = HostRequest(path, parsed, test_fraction)
        if self._role == "worker":
            self._abort("switching to host")
        self._log(logging.INFO, f"asked to host {path}")
        self._wake.set()
        return {"type": "ok"}

    async def stop(self) -> dict[str, Any]:
        self._host_request = None
        if self._cycle is not None:
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
        if not self._mm_fixed:
            with contextlib.suppress(ValueError):
                self._mm = parse_hostport(cfg.daemon.matchmaker)
        self._backoff = Backoff(cfg.daemon.retry_min, cfg.daemon.retry_max, self._rng)
        self._log(logging.INFO, "configuration reloaded")
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

    async def _evaluate(self) -> Verdict:
        if isinstance(self._policy, AlwaysIdle):
            v = self._policy.evaluate()
        else:
            v = await asyncio.get_running_loop().run_in_executor(None, self._policy.evaluate)
        if v != self._verdict:
            self._verdict = v
            logger.info("idle policy: %s", v.reason)
        return v

    async def _next_role(self) -> str:
        """Wait until there is something to do: host a dataset, or donate."""
        while True:
            self._wake.clear()
            if self._host_request is not None:
                return "host"
            timeout: float | None = None
            if self.donating:
                self._to(S.STANDBY)
                if (await self._evaluate()).allowed:
                    return "worker"
                timeout = self._policy_interval
            else:
                self._to(S.OFF)
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
                self._role = role  # before the task runs: an abort can find it at once
                self._cycle = asyncio.create_task(self._run_cycle(role), name=f"crowdd-{role}")
                await asyncio.wait({self._cycle})
                if self._role is not None:  # cancelled before it even started
                    await self._teardown(None)
                failed = False
                if self._cycle.cancelled():
                    if self._abort_reason:
                        self._log(logging.INFO, f"session ended: {self._abort_reason}")
                elif (exc := self._cycle.exception()) is not None:
                    failed = True
                    logger.error("session cycle failed", exc_info=exc)
                    self._error = f"internal error: {exc}"
                elif self._error is not None:
                    failed = True
                self._cycle = None
        finally:
            if self._cycle is not None:
                await cancel_and_wait(self._cycle, timeout=30.0)

    async def _run_cycle(self, role: str) -> None:
        self._role = role
        self._error = None
        res: Reservation | None = None
        watch = asyncio.create_task(self._policy_watch()) if role == "worker" else None
        try:
            if role == "host":
                self._to(S.REGISTERING)
                prepared = await self._prepare_dataset()
            else:
                prepared = None
            try:
                res = Reservation(
                    self.cfg.daemon.listen_host, self.cfg.daemon.data_port, self.cfg.daemon.session_port,
                    2 if role == "host" else 1,
                )
            except OSError as exc:
                raise CycleError(f"cannot bind the session ports: {exc}") from None
            group = await self._register(role, res, prepared)
            self._backoff.reset()
            self._group = group
            self._members = [dict(m, state="joining", replication={"done": 0, "total": 0}) for m in group["members"]]
            self._job = dict(group.get("job") or {})
            self._dataset = dict(group.get("dataset") or {})
            self._log(logging.INFO, f"joined group {group['group_id']} as node {group['index']} of {len(group['members'])}")
            if role == "host" and prepared is not None:
                await self._lead(group, res, prepared)
            else:
                await self._follow(group, res)
        except CycleError as exc:
            self._error = str(exc)
            self._log(logging.ERROR, str(exc))
        finally:
            await cancel_and_wait(watch)
            await self._teardown(res)

    async def _policy_watch(self) -> None:
        """While a worker cycle runs: re-check the idle policy every ``policy_interval``. When
        it says no: leave the queue; mid-session suspend the job (or leave, per ``on_busy``)."""
        while True:
            await asyncio.sleep(self._policy_interval)
            verdict = await self._evaluate()
            sup = self._supervisor
            if verdict.allowed:
                if sup is not None and sup.suspended:
                    sup.resume()
                    self._log(logging.INFO, f"idle again ({verdict.reason}); job resumed")
                continue
            if self.state in (S.REPLICATING, S.TRAINING) and self._policy.on_busy == "suspend":
                if sup is not None and not sup.suspended:
                    sup.suspend()
                    self._log(logging.INFO, f"machine busy ({verdict.reason}); job suspended")
                continue
            self._abort(f"the idle policy says no: {verdict.reason}")
            return

    async def _teardown(self, res: Reservation | None) -> None:
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            await asyncio.shield(sup.stop())
        if res is not None:
            res.close()
        if self._members_pending is not None:
            self._members_pending.cancel()
            self._members_pending = None
        if self._role == "host":
            self._host_request = None
        self._role = None
        self._queue = None
        self._group = None
        self._members = []
        self._training = None
        self._sps = {}
        self._to(S.STANDBY if self.donating else S.OFF)

    # ------------------------------------------------------------------ registration

    async def _prepare_dataset(self) -> Prepared:
        req = self._host_request
        if req is None:
            raise CycleError("nothing to host")
        self._job = req.job.to_dict()

        def convert() -> Prepared:
            from crowdd import datasets  # numpy: only when hosting

            try:
                p = datasets.convert(req.dataset, self.cache.root, chunk_size=self.cfg.replication.chunk_size,
                                     test_fraction=req.test_fraction)
            except datasets.DatasetError as exc:
                raise CycleError(f"cannot host {req.dataset}: {exc}") from None
            path = self.cache.has(p.manifest) or p.data_path
            return Prepared(path, p.manifest, p.manifest.name or req.dataset.name)

        self._log(logging.INFO, f"preparing {req.dataset}")
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(None, convert)
        except OSError as exc:
            raise CycleError(f"cannot host {req.dataset}: {exc}") from None
        self._dataset = {"name": prepared.name, "size": prepared.manifest.size, "digest": prepared.manifest.digest()}
        return prepared

    def _hello(self, role: str, res: Reservation, prepared: Prepared | None) -> dict[str, Any]:
        d = self.cfg.daemon
        hello: dict[str, Any] = {
            "role": role,
            "name": self.name,
            "ports": {"data": res.data_port, "session": res.session_port, "tf": res.tf_ports},
            "tag": d.tag,
            "want_tag": d.want_tag,
        }
        if d.advertise_host:
            hello["advertise"] = d.advertise_host
        if role == "host" and prepared is not None and self._host_request is not None:
            hello["job"] = self._host_request.job.to_dict()
            hello["dataset"] = {"digest": prepared.manifest.digest(), "size": prepared.manifest.size, "name": prepared.name[:255] or "dataset"}
        return hello

    def _on_wait(self, frame: dict[str, Any]) -> None:
        self._queue = {"position": frame.get("position"), "hosts": frame.get("hosts"), "workers": frame.get("workers")}
        if self.state != S.WAITING:
            self._to(S.WAITING)
        self._publish("status", **self.status())

    async def _register(self, role: str, res: Reservation, prepared: Prepared | None) -> dict[str, Any]:
        hello = self._hello(role, res, prepared)
        while True:
            self._to(S.REGISTERING)
            self._queue = None
            host, port = self._mm
            try:
                return await register(self._mm, hello, heartbeat=self.cfg.daemon.heartbeat, on_wait=self._on_wait)
            except wire.RemoteError as exc:
                if exc.code in (wire.ErrorCode.BAD_FIELD.value, wire.ErrorCode.VERSION.value) and role == "host":
                    raise CycleError(f"the matchmaker refused this job: {exc.message}") from None
                why = f"the matchmaker said {exc.code}: {exc.message}"
            except (wire.ConnectionClosed, wire.FrameTimeout, wire.WireError, OSError) as exc:
                why = str(exc) or type(exc).__name__
            delay = self._backoff.next()
            self._log(logging.WARNING, f"matchmaker {host}:{port}: {why}; retrying in {delay:.1f} s")
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ progress plumbing

    def _set_member(self, index: int, **fields: Any) -> None:
        for m in self._members:
            if m.get("index") == index:
                m.update(fields)

    def _push_members(self, session: HostSession | None = None, *, now: bool = False) -> None:
        """Publish (and, as host, fan out) the member list, at most every PROGRESS_INTERVAL."""
        loop = asyncio.get_running_loop()
        wait = self._last_members_push + PROGRESS_INTERVAL - loop.time()
        if not now and wait > 0:
            if self._members_pending is None:
                self._members_pending = loop.call_later(wait, self._push_members_now, session)
            return
        self._push_members_now(session)

    def _push_members_now(self, session: HostSession | None) -> None:
        self._members_pending = None
        self._last_members_push = asyncio.get_running_loop().time()
        if session is not None:
            self._members = session.member_dicts()
            session.broadcast({"type": "members", "members": self._members})
        self._publish("members", members=self._members)

    def _on_training_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event") or ev.get("type")
        tr = self._training or {
            "epoch": 0, "epochs": (self._job or {}).get("epochs"), "step": 0, "loss": None,
            "accuracy": None, "test_accuracy": None, "samples_per_sec": None,
        }
        if kind == "progress":
            for k in ("epoch", "epochs", "step", "loss", "accuracy"):
                if k in ev:
                    tr[k] = ev[k]
            if isinstance(ev.get("samples_per_sec"), (int, float)):
                self._sps[int(ev.get("worker") or 0)] = float(ev["samples_per_sec"])
                tr["samples_per_sec"] = round(sum(self._sps.values()), 1)
            self._training = tr
            self._publish("progress", **{k: tr.get(k) for k in ("epoch", "epochs", "step", "loss", "accuracy", "samples_per_sec")},
                          total_steps=ev.get("total_steps"), worker=ev.get("worker"))
        elif kind == "eval":
            tr["test_accuracy"] = ev.get("test_accuracy")
            self._training = tr
            self._publish("eval", epoch=ev.get("epoch"), step=ev.get("step"), test_accuracy=ev.get("test_accuracy"),
                          test_loss=ev.get("test_loss"))

    # ------------------------------------------------------------------ the job

    def _job_dir(self, group: dict[str, Any], index: int) -> Path:
        d = self.paths.jobs_dir / f"{group['group_id']}-{index}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _settings(self) -> Settings:
        j = self.cfg.job
        threads = max(1, min(j.threads, getattr(self._policy, "tf_threads", j.threads)))
        return Settings(j.steps_per_function, min(j.sync_every, j.steps_per_function), threads, j.nice, j.checkpoint_secs)

    async def _start_job(
        self, role: str, index: int, cluster: dict[str, list[str]], workdir: Path, data: Path, manifest: Manifest,
        on_event: Callable[[dict[str, Any]], None], res: Reservation,
    ) -> JobSupervisor:
        _link(data, workdir / "dataset.bin")
        (workdir / "dataset.manifest.json").write_bytes(manifest.to_json())
        spec_obj = JobSpec(
            role=role, index=index,
            cluster=Cluster(tuple(cluster["ps"]), tuple(cluster["worker"])),
            job=validate_job(self._job or {}),
            data="dataset.bin", manifest="dataset.manifest.json",
            output_dir="output" if role == "host" else None,
            workdir=str(workdir),
            settings=self._settings(),
        )
        try:
            spec = parse_spec(spec_obj.to_dict(), role=role)
        except SpecError as exc:
            raise CycleError(f"bad job spec ({exc.field}): {exc.message}") from None
        spec_path = workdir / "spec.json"
        write_spec(spec, spec_path)
        res.release_tf()
        env = {**self._job_env, **thread_env(spec.settings.threads)}
        sup = JobSupervisor(
            job_command(role, spec_path, self._job_python), on_event=on_event, cwd=workdir,
            log_path=workdir / "job.log", env=env, nice=spec.settings.nice,
        )
        try:
            await sup.start()
        except JobError as exc:
            raise CycleError(str(exc)) from None
        self._supervisor = sup
        return sup

    # ------------------------------------------------------------------ host: lead the session

    async def _lead(self, group: dict[str, Any], res: Reservation, prepared: Prepared) -> None:
        d = self.cfg.daemon
        token = str(group["token"])
        members = group["members"]
        n = len(members)
        manifest = prepared.manifest
        self._to(S.REPLICATING)
        store = ChunkStore.complete(prepared.data_path, manifest)
        plan = node_plan(n, 0, self.cfg.replication.route)
        server = DataServer(token, manifest, store, sock=res.data_sock, targets=plan.targets, group_size=n,
                            stall_timeout=self.cfg.replication.stall_timeout)
        session = HostSession(
            group, res.session_sock, heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout),
            on_change=lambda m: self._on_member_change(session, m),
        )
        session.members[0].state = "replicating"
        try:
            await server.start()
            await session.start()
            self._push_members(session, now=True)
            live = await session.wait_ready()
            self._to(S.TRAINING)
            session.members[0].state = "training"
            host_addr = str(members[0]["address"])
            cluster = {
                "ps": [f"{host_addr}:{res.tf_ports[0]}"],
                "worker": [f"{host_addr}:{res.tf_ports[1]}"] + [f"{m.address}:{m.ports['tf'][0]}" for m in live],
            }
            for j, m in enumerate(live, 1):
                session.send(m.index, {"type": "train", "cluster": cluster, "index": j})
            self._push_members(session, now=True)
            if live:
                self._log(logging.INFO, f"waiting for {len(live)} worker(s) to start their TF servers")
                started = await session.wait_started(live, JOB_START_TIMEOUT)
                if len(started) < len(live):
                    self._log(logging.WARNING, f"{len(live) - len(started)} worker(s) did not start; training without them")
            workdir = self._job_dir(group, 0)
            done: dict[str, Any] = {}

            def on_event(ev: dict[str, Any]) -> None:
                kind = ev.get("event")
                if kind in ("progress", "eval"):
                    self._on_training_event(ev)
                    session.broadcast({**{k: v for k, v in ev.items() if k != "event"}, "type": kind})
                elif kind == "done":
                    done.update(ev)
                elif kind == "error":
                    self._log(logging.ERROR, f"host job: {ev.get('message')}")

            sup = await self._start_job("host", 0, cluster, workdir, prepared.data_path, manifest, on_event, res)
            code = await sup.wait()
            if not done:
                err = sup.last_error or f"the host job exited with code {code}"
                await session.end({"test_accuracy": None, "model_path": None, "error": err})
                raise CycleError(f"training failed: {err}")
            model = done.get("model_path")
            if isinstance(model, str) and model and not os.path.isabs(model):
                model = str(workdir / model)
            self._result = {"test_accuracy": done.get("test_accuracy"), "model_path": model}
            if self._training is not None:
                self._training["test_accuracy"] = done.get("test_accuracy")
            self._to(S.FINISHED)
            session.members[0].state = "finished"
            self._publish("result", **self._result)
            self._log(logging.INFO, f"training finished: test accuracy {done.get('test_accuracy')}, model {model}")
            await session.end({**self._result, "error": None})
            await asyncio.sleep(self._linger)
        finally:
            await session.close()
            await server.close()
            store.close()

    def _on_member_change(self, session: HostSession, m: Member | None) -> None:
        if m is not None:
            self._publish("replication", index=m.index, done=m.done, total=m.total, source=m.source)
        self._push_members(session)

    # ------------------------------------------------------------------ worker: follow the host

    async def _follow(self, group: dict[str, Any], res: Reservation) -> None:
        d = self.cfg.daemon
        token = str(group["token"])
        index = int(group["index"])
        members = group["members"]
        host = members[0]
        n = len(members)
        self._to(S.REPLICATING)
        train: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def on_message(frame: dict[str, Any]) -> None:
            kind = frame["type"]
            if kind == "members" and isinstance(frame.get("members"), list):
                self._members = frame["members"]
                self._publish("members", members=self._members)
            elif kind == "train" and not train.done():
                train.set_result(frame)
            elif kind in ("progress", "eval"):
                self._on_training_event(frame)

        ws = WorkerSession(
            str(host["address"]), int(host["ports"]["session"]), token, index,
            heartbeat=d.heartbeat, dead_after=dead_after(d.heartbeat, d.peer_timeout), on_message=on_message,
        )
        store: ChunkStore | None = None
        server: DataServer | None = None
        tasks: list[asyncio.Task[Any]] = []
        workdir: Path | None = None
        try:
            try:
                await ws.connect(retry_for=d.peer_timeout)
            except SessionRefused as exc:
                raise CycleError(f"the host's session is unreachable: {exc}") from None
            session_task = asyncio.create_task(ws.run())
            tasks.append(session_task)
            ws.send({"type": "state", "state": "replicating"})
            peers = [Peer(int(m["index"]), str(m["address"]), int(m["ports"]["data"])) for m in members]
            manifest = await self._fetch_manifest(peers[0], token, index, str(group["dataset"]["digest"]), session_task)
            store = ChunkStore.open(self.cache, manifest)
            plan = node_plan(n, index, self.cfg.replication.route)
            server = DataServer(token, manifest, store, sock=res.data_sock, targets=plan.targets, group_size=n,
                                stall_timeout=self.cfg.replication.stall_timeout)
            await server.start()
            last = [0.0]
            reported: list[tuple[int, int]] = [(-1, -1)]

            def on_progress(p: Progress) -> None:
                now = time.monotonic()
                if (p.done_bytes, p.total_bytes) == reported[0]:
                    return
                if p.done_bytes < p.total_bytes and now - last[0] < PROGRESS_INTERVAL:
                    return
                last[0] = now
                reported[0] = (p.done_bytes, p.total_bytes)
                self._set_member(index, replication={"done": p.done_bytes, "total": p.total_bytes})
                self._publish("replication", index=index, done=p.done_bytes, total=p.total_bytes, source=p.source)
                ws.send({"type": "replication", "done": p.done_bytes, "total": p.total_bytes, "source": p.source})

            replicator = Replicator(index, peers, token, manifest, self.cache, route=self.cfg.replication.route,
                                    stall_timeout=self.cfg.replication.stall_timeout, on_progress=on_progress, store=store)
            rep_task = asyncio.create_task(replicator.run())
            tasks.append(rep_task)
            await self._race(rep_task, session_task)
            try:
                data_path = rep_task.result()
            except ReplicationError as exc:
                raise CycleError(f"replication failed: {exc}") from None
            ws.send({"type": "ready"})
            self._log(logging.INFO, f"dataset verified ({manifest.size:,} bytes); waiting for the host to start training")
            await self._race(train, session_task)
            frame = train.result()
            self._to(S.TRAINING)
            ws.send({"type": "state", "state": "training"})
            workdir = self._job_dir(group, index)

            def on_event(ev: dict[str, Any]) -> None:
                if ev.get("event") == "started":
                    ws.send({"type": "job", "event": "started"})
                elif ev.get("event") == "error":
                    self._log(logging.ERROR, f"worker job: {ev.get('message')}")

            sup = await self._start_job("worker", int(frame["index"]), frame["cluster"], workdir, data_path, manifest, on_event, res)
            job_task = asyncio.create_task(sup.wait())
            tasks.append(job_task)
            await asyncio.wait({job_task, session_task}, return_when=asyncio.FIRST_COMPLETED)
            if not session_task.done():
                code = job_task.result()
                ws.send({"type": "job", "event": "exited", "code": code, "message": sup.last_error})
                raise CycleError(f"this node's TF server exited (code {code}): {sup.last_error or 'see job.log'}")
            end = self._session_result(session_task)
            if end.get("error"):
                raise CycleError(f"the host ended the session: {end['error']}")
            self._result = {"test_accuracy": end.get("test_accuracy"), "model_path": end.get("model_path")}
            self._to(S.FINISHED)
            self._publish("result", **self._result)
            self._log(logging.INFO, f"session finished: test accuracy {end.get('test_accuracy')}")
            await self._teardown_job()
            await asyncio.sleep(self._linger)
        finally:
            await self._teardown_job()
            await cancel_and_wait(*tasks)
            await ws.close()
            if server is not None:
                await server.close()
            if store is not None:
                store.close()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    async def _teardown_job(self) -> None:
        sup, self._supervisor = self._supervisor, None
        if sup is not None:
            await asyncio.shield(sup.stop())

    def _session_result(self, session_task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
        try:
            return session_task.result()
        except HostLost as exc:
            raise CycleError(f"the host went away ({exc})") from None

    async def _race(self, work: asyncio.Future[Any], session_task: asyncio.Task[dict[str, Any]]) -> None:
        """Wait for ``work``; if the session ends first (host gone, or ended), stop."""
        await asyncio.wait({work, session_task}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            end = self._session_result(session_task)
            raise CycleError(f"the host ended the session early: {end.get('error') or 'no reason given'}")

    async def _fetch_manifest(
        self, host: Peer, token: str, index: int, digest: str, session_task: asyncio.Task[dict[str, Any]]
    ) -> Manifest:
        delay = 0.2
        deadline = time.monotonic() + self.cfg.daemon.peer_timeout
        while True:
            fetch = asyncio.create_task(fetch_manifest(host, token, index, digest))
            await self._race(fetch, session_task)
            try:
                return fetch.result()
            except (AuthError, ManifestError, wire.WireError, wire.RemoteError, wire.ConnectionClosed,
                    wire.FrameTimeout, OSError) as exc:  # retry a while, then give up
                if time.monotonic() > deadline:
                    raise CycleError(f"cannot get the dataset manifest from the host: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)


# --------------------------------------------------------------------------- entry point


def _idle_configured(config_file: Path) -> bool:
    """True when the config file has an [idle] table (then the real policy applies)."""
    try:
        import tomllib

        with config_file.open("rb") as fh:
            return "idle" in tomllib.load(fh)
    except (OSError, ValueError, ImportError):
        return False


def make_policy(cfg: Config, config_file: Path) -> Policy:
    if _idle_configured(config_file):
        return IdlePolicy(cfg.idle, system_probes(), source=str(config_file))
    return AlwaysIdle(on_busy=cfg.idle.on_busy, tf_threads=cfg.idle.tf_threads)


def run(
    cfg: Config,
    paths: Paths,
    *,
    system: bool = False,
    matchmaker: str | None = None,
    socket_path: Path | None = None,
    config_file: Path | None = None,
) -> int:
    """``crowdd daemon``: run one daemon until SIGTERM/SIGINT."""
    cfg_file = config_file or paths.config_file
    notifier = Notifier.from_env()
    try:
        mm = parse_hostport(matchmaker or cfg.daemon.matchmaker)
    except ValueError as exc:
        print(f"crowdd daemon: bad --matchmaker: {exc}", file=sys.stderr)
        return 2
    daemon = Daemon(
        cfg, paths,
        endpoint=Endpoint.for_paths(paths, system=system, socket_path=socket_path),
        matchmaker=mm,
        policy=make_policy(cfg, cfg_file),
        notifier=notifier,
        config_loader=lambda: load_config(cfg_file),
    )
    if matchmaker:
        daemon.fix_matchmaker()
    try:
        return asyncio.run(daemon.main())
    except FileExistsError as exc:
        print(f"crowdd daemon: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"crowdd daemon: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        notifier.close()


__all__ = ["TRANSITIONS", "Daemon", "InvalidTransition", "State", "StateMachine", "allowed", "make_policy", "run"]
