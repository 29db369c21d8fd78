"""Supervise one job child (``python -m crowdd.job host|worker --spec FILE``).

The job runs in a session (and process group) of its own at the lowest CPU priority; its TF
servers are its children in that group (process control: :mod:`crowdd.platform.process`). :meth:`JobSupervisor.stop` signals the whole group
(SIGTERM, then SIGKILL), so nothing the job started outlives it. Where the job has a cgroup of
its own (:mod:`crowdd.platform.cgroups`) its memory and task caps are the kernel's, and every
process in it is killed at the end; elsewhere the memory cap is a poll. On Linux the job also gets
``PR_SET_PDEATHSIG`` so that it dies with the daemon even when the daemon is killed with
SIGKILL (the job's own children watch their parent in turn; see docs/job-spec.md).

Each stdout line of the job is a JSON event; :class:`JobSupervisor` hands parsed events to a
callback. stderr goes to a log file. Suspend/resume (SIGSTOP/SIGCONT of the group) serve the
idle policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from crowdd.node.disk import tree_size
from crowdd.platform.cgroups import JobCgroup
from crowdd.platform.process import SAFE_PATH, SIGKILL, group_options, left_group, resume_group, signal_group, suspend_group

logger = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]
MAX_LINE = 1 << 20
MEMORY_POLL = 1.0
DISK_POLL = 2.0


def group_memory_mb(pgid: int) -> float:
    """The memory of every process in process group ``pgid`` (and of its leader's descendants
    that left it), in MB: the sum of their PSS
    (shared pages split among those that map them, so TF's libraries count once), or RSS where
    PSS cannot be read."""
    total = 0
    escaped = set(left_group(pgid))  # they left the group (setsid): still the job's
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) != pgid and p.pid not in escaped:
                continue
            try:
                total += p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return total / 2**20


class JobError(Exception):
    """The job could not be started."""


def job_command(role: str, spec_path: Path, python: str = sys.executable) -> list[str]:
    return [python, SAFE_PATH, "-m", "crowdd.job", role, "--spec", str(spec_path)]


class JobSupervisor:
    """One job child: start, events, suspend/resume, and a stop that leaves nothing behind."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        on_event: EventCallback,
        cwd: Path | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        nice: int = 19,
        max_memory_mb: int = 0,
        cgroup: JobCgroup | None = None,
        max_disk_bytes: int = 0,
    ) -> None:
        self._command = list(command)
        self._on_event = on_event
        self._cwd = cwd
        self._log_path = log_path
        self._env = dict(env) if env is not None else None
        self._nice = nice
        self._max_memory_mb = max_memory_mb
        self._cgroup = cgroup
        self._max_disk_bytes = max_disk_bytes if cwd is not None else 0
        self._memory_watch: asyncio.Task[None] | None = None
        self._disk_watch: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._suspended = False
        self.returncode: int | None = None
        self.last_error: str | None = None
        self.memory_exceeded = False
        self.disk_exceeded = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def suspended(self) -> bool:
        return self._suspended

    async def start(self) -> None:
        if self._proc is not None:
            raise JobError("this supervisor already started its job")
        stderr: Any = asyncio.subprocess.DEVNULL
        log_fd: int | None = None
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            stderr = log_fd
        nice = self._nice
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=str(self._cwd) if self._cwd is not None else None,
                env=self._env,
                **group_options(nice=nice, death_signal=SIGKILL,
                                cgroup_procs=self._cgroup.procs_files if self._cgroup is not None else (),
                                max_file_bytes=self._max_disk_bytes),
                limit=MAX_LINE,
            )
        except (OSError, subprocess.SubprocessError) as exc:  # the latter: it could not join its cgroup
            self._remove_cgroup()
            raise JobError(f"cannot start the job ({self._command[0]}): {exc}") from None
        finally:
            if log_fd is not None:
                os.close(log_fd)
        logger.info("job started: pid %d: %s", self._proc.pid, " ".join(self._command[1:]))
        self._reader = asyncio.create_task(self._read_events())
        if self._cgroup is not None:
            self._memory_watch = asyncio.create_task(self._watch_oom(self._cgroup), name="job-memory")
        elif self._max_memory_mb:
            self._memory_watch = asyncio.create_task(self._watch_memory(), name="job-memory")
        if self._max_disk_bytes and self._cwd is not None:
            self._disk_watch = asyncio.create_task(self._watch_disk(self._cwd, self._max_disk_bytes), name="job-disk")

    async def _watch_disk(self, directory: Path, cap: int) -> None:
        """Every :data:`DISK_POLL` s: a job whose directory holds more than ``cap`` bytes is
        killed, with an ``error`` event saying so (no one file grows past ``cap`` at all:
        ``RLIMIT_FSIZE``)."""
        proc = self._proc
        assert proc is not None
        while proc.returncode is None:
            await asyncio.sleep(DISK_POLL)
            used = await asyncio.to_thread(tree_size, directory)
            if used > cap:
                self._exceeded(f"the job wrote {used / 1e6:,.0f} MB into its directory, over the "
                               f"{cap / 1e6:,.0f} MB this node's disk cap leaves it ([limits] disk_max_gb); "
                               "it was stopped", disk=True)
                return

    async def _watch_oom(self, cgroup: JobCgroup) -> None:
        """Every :data:`MEMORY_POLL` s: once the kernel has killed one of the job's processes at
        its cgroup's memory cap, the rest of the job is killed too, with an ``error`` event."""
        proc = self._proc
        assert proc is not None
        while proc.returncode is None:
            await asyncio.sleep(MEMORY_POLL)
            if cgroup.oom_kills():
                self._exceeded(self._cap_message())
                return

    def _cap_message(self) -> str:
        return (f"the job needed memory over this node's cap of {self._max_memory_mb} MB ([job] max_memory_mb); "
                "it was stopped")

    def _exceeded(self, message: str, *, disk: bool = False) -> None:
        if self.memory_exceeded or self.disk_exceeded:
            return  # the first cap it hit is the error
        logger.warning("%s", message)
        self._kill_group(SIGKILL)
        self.last_error = message
        if disk:
            self.disk_exceeded = True
        else:
            self.memory_exceeded = True
        with contextlib.suppress(Exception):
            self._on_event({"event": "error", "message": message})

    async def _watch_memory(self) -> None:
        """Every :data:`MEMORY_POLL` s: the job's whole process group over its cap is killed,
        with an ``error`` event saying so (the daemon stays up)."""
        proc = self._proc
        assert proc is not None
        cap = self._max_memory_mb
        while proc.returncode is None:
            await asyncio.sleep(MEMORY_POLL)
            used = await asyncio.get_running_loop().run_in_executor(None, group_memory_mb, proc.pid)
            if used > cap:
                self._exceeded(f"the job used {used:.0f} MB of memory, over this node's cap of {cap} MB "
                               "([job] max_memory_mb); it was stopped")
                return

    async def _read_events(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                logger.warning("job printed an over-long line; skipped")
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except ValueError:
                logger.info("job: %s", text)
                continue
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                logger.info("job: %s", text)
                continue
            if self.memory_exceeded or self.disk_exceeded:
                continue  # killed at a cap: that is the error, not what its dying processes said
            if event["event"] == "error":
                self.last_error = str(event.get("message", "job error"))
            try:
                self._on_event(event)
            except Exception:  # a faulty callback must not stop the event stream
                logger.exception("job event handler failed")

    async def _leader_exited(self) -> None:
        """Return once the job process itself has exited.

        ``Process.wait()`` alone is not enough: it also waits for the stdout pipe to close,
        and the job's children (TF servers) inherit it. Linux: a pidfd, event-driven;
        elsewhere a slow poll.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        loop = asyncio.get_running_loop()
        fd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(proc.pid)
            except OSError:
                return  # already gone (and reaped)
        if fd is None:
            while proc.returncode is None:  # noqa: ASYNC110 - no pidfd: nothing to await but the pipe too
                await asyncio.sleep(0.5)
            return
        fut: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def wait(self) -> int:
        """Wait for the job to exit (events all delivered) and return its exit code. Whatever
        the job left behind in its process group is killed then."""
        if self._proc is None:
            raise JobError("the job was never started")
        await self._leader_exited()
        self._kill_group(SIGKILL)  # the leader is gone; take any straggler with it
        await self._stop_watch()
        cgroup = self._cgroup
        if cgroup is not None and cgroup.oom_kills():
            self._exceeded(self._cap_message())  # it died of the cap: the cause, whatever it said last
        code = await self._proc.wait()
        await self._drop_cgroup()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        self.returncode = code
        return code

    async def _stop_watch(self) -> None:
        for task in (self._memory_watch, self._disk_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _kill_group(self, sig: int) -> bool:
        sent = self._proc is not None and signal_group(self._proc.pid, sig)
        if sig == SIGKILL and self._cgroup is not None:
            self._cgroup.kill()  # whatever left the group, however it detached
        return sent

    def _remove_cgroup(self) -> None:
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            cgroup.kill()
            cgroup.remove()

    async def _drop_cgroup(self) -> None:
        """Kill what is left in the job's cgroup and remove it (off the event loop)."""
        await asyncio.to_thread(self._remove_cgroup)

    def suspend(self) -> None:
        """SIGSTOP the job's whole group (the idle policy says: not now)."""
        if self._proc is not None and self.running and not self._suspended and suspend_group(self._proc.pid):
            self._suspended = True
            logger.info("job %s suspended", self.pid)

    def resume(self) -> None:
        if self._suspended:
            if self._proc is not None:
                resume_group(self._proc.pid)
            self._suspended = False
            logger.info("job %s resumed", self.pid)

    async def stop(self, grace: float = 5.0) -> int | None:
        """End the job and every process in its group; return its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            resume_group(proc.pid)  # a stopped group must wake up to die
            self._suspended = False
            try:
                await asyncio.wait_for(self._leader_exited(), grace)
            except asyncio.TimeoutError:
                logger.warning("job %d ignored SIGTERM for %.0f s; killing it", proc.pid, grace)
        self._kill_group(SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            if proc.returncode is None:
                proc.kill()
        code = await proc.wait()
        await self._stop_watch()
        await self._drop_cgroup()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self.returncode = code
        return code


__all__ = ["JobError", "JobSupervisor", "job_command"]
