"""Process control, in one place: process groups, priority, dying with the parent, signals.

Every child crowdd starts that must not outlive it (the job, the job's TF servers, the
demo's daemons, the test harnesses' nodes) goes through here:

* :func:`group_options` — ``Popen`` keyword arguments for a child that leads a new process
  group (a session of its own on POSIX, ``CREATE_NEW_PROCESS_GROUP`` on Windows), optionally
  at lower priority and dying with its parent (set up in the child, before exec).
* :func:`lower_priority` — niceness, and ``SCHED_IDLE`` at 19 (Linux); on Windows a child
  started with ``nice`` gets ``IDLE_PRIORITY_CLASS`` instead.
* :func:`undumpable` (``PR_SET_DUMPABLE`` 0, Linux): a job process's ``/proc`` files closed
  to its siblings.
* :func:`die_with_parent` (``PR_SET_PDEATHSIG``, Linux) and :func:`watch_parent` (a polling
  thread, everywhere) / :func:`exit_with_parent` (both, for a process that must just go).
* :func:`signal_group`, :func:`kill_group` (TERM, then KILL after a grace period),
  :func:`suspend_group` / :func:`resume_group` (SIGSTOP/SIGCONT of the whole group; on
  Windows the whole tree through psutil).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

SIGKILL: int = getattr(signal, "SIGKILL", signal.SIGTERM)
SIGSTOP: int = getattr(signal, "SIGSTOP", -19)
SIGCONT: int = getattr(signal, "SIGCONT", -18)
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
LINUX = sys.platform.startswith("linux")
WINDOWS = sys.platform == "win32"


# --------------------------------------------------------------------------- in the process itself


def die_with_parent(sig: int = SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Safe in a ``preexec_fn`` (one prctl call). Returns whether it took effect. The parent may
    already be gone when this runs: callers that care check :func:`os.getppid` afterwards
    (:func:`exit_with_parent` does).
    """
    if not LINUX:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def undumpable() -> bool:
    """``PR_SET_DUMPABLE`` 0 (Linux): no process without ``CAP_SYS_PTRACE`` opens this one's
    ``/proc/<pid>`` files that need ptrace access (``fd/*``, ``environ``, ``mem``, ``smaps``),
    the daemon's user's other processes included, and no core dump is written. Every job
    process sets it first thing: a graph on one of its TF servers cannot write the job's event
    pipe through ``/proc/<job>/fd/1`` or read another job process's environment. An
    ``execve`` resets it, so each process sets it itself. Returns whether it took effect.
    """
    if not LINUX:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, on_death: Callable[[], object], interval: float = 0.5) -> threading.Thread:
    """Call ``on_death()`` from a daemon thread once this process's parent is no longer ``parent``."""

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        on_death()

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread


def exit_with_parent(parent: int, code: int = 0) -> None:
    """Exit at once (``os._exit``) when ``parent`` goes away: PR_SET_PDEATHSIG where Linux,
    plus a polling thread everywhere. Exits now if ``parent`` is already gone."""
    die_with_parent(SIGKILL)

    def leave() -> None:
        os._exit(code)

    if os.getppid() != parent:
        leave()
    watch_parent(parent, leave)


#: how every job process starts Python: its work directory, which the group's graphs can write,
#: is never on ``sys.path`` (``-P``, Python 3.11+; 3.10 has only ``-I``, which also ignores
#: ``PYTHONPATH`` and the user's site-packages)
SAFE_PATH = "-P" if sys.version_info >= (3, 11) else "-I"


def host_pid(pid: int | None = None) -> int:
    """This process's pid (or that of its child ``pid``, as this process sees it) in the PID
    namespace of the mounted ``/proc``: what the daemon outside a job's PID namespace knows it
    by. A confined job is its own PID namespace (:data:`crowdd.platform.userns.UNSHARE`), where
    ``os.getpid()`` names nothing outside. Falls back to the pid given where ``/proc`` says nothing.
    Where the job has its own ``/proc`` (a private view, :func:`crowdd.platform.userns.private_view`)
    that is its PID namespace's: the pids are the job's own then."""
    try:
        me = int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid() if pid is None else pid
    if pid is None:
        return me
    try:
        kids = [int(k) for t in os.listdir(f"/proc/{me}/task")
                for k in open(f"/proc/{me}/task/{t}/children").read().split()]  # noqa: SIM115
    except (OSError, ValueError):
        return pid
    for kid in kids:
        try:
            with open(f"/proc/{kid}/status") as fh:
                nspid = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
        except OSError:
            continue
        if nspid and int(nspid[-1]) == pid:
            return kid
    return pid


def lower_priority(nice: int) -> None:
    """Set this process's niceness to ``nice`` and, at 19, its CPU policy to SCHED_IDLE (Linux).

    Never fails: where the platform or the privileges do not allow it, the priority stays
    (logged at debug level).
    """
    for problem in _set_priority(nice):
        logger.debug("%s", problem)


def _set_priority(nice: int) -> list[str]:
    """:func:`lower_priority` without logging (safe between fork and exec); returns what failed."""
    problems = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (AttributeError, OSError) as exc:  # Windows: no setpriority; unprivileged: cannot go below
        problems.append(f"cannot renice to {nice}: {exc}")
    if nice >= 19 and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            problems.append(f"cannot use SCHED_IDLE: {exc}")
    return problems


# --------------------------------------------------------------------------- starting a child


def group_options(*, nice: int | None = None, death_signal: int | None = None,
                  cgroup_procs: tuple[str, ...] = (), max_file_bytes: int = 0) -> dict[str, Any]:
    """``Popen`` / ``create_subprocess_exec`` keyword arguments: the child leads a new process
    group; with ``nice`` it runs at that priority (Windows: ``IDLE_PRIORITY_CLASS``); with
    ``death_signal`` it gets that signal when this process dies (Linux); with ``cgroup_procs``
    it joins those cgroups (their ``cgroup.procs`` files) before it runs anything; with
    ``max_file_bytes`` no file it writes grows past that size (``RLIMIT_FSIZE``: the write fails
    with EFBIG, SIGXFSZ ignored)."""
    if WINDOWS:  # pragma: no cover - exercised on Windows only
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        if nice is not None:
            flags |= getattr(subprocess, "IDLE_PRIORITY_CLASS", 0)
        return {"creationflags": flags}
    options: dict[str, Any] = {"start_new_session": True}
    if nice is not None or death_signal is not None or cgroup_procs or max_file_bytes:
        options["preexec_fn"] = _Preexec(nice, death_signal, cgroup_procs, max_file_bytes)
    return options


class _Preexec:
    """Runs in the child between fork and exec: as little as possible."""

    def __init__(self, nice: int | None, death_signal: int | None, cgroup_procs: tuple[str, ...] = (),
                 max_file_bytes: int = 0) -> None:
        self.nice = nice
        self.death_signal = death_signal
        self.cgroup_procs = cgroup_procs
        self.max_file_bytes = max_file_bytes
        if max_file_bytes:
            import resource  # here, not in the child: no import between fork and exec

            self._fsize = (resource.setrlimit, resource.RLIMIT_FSIZE)

    def __call__(self) -> None:
        for path in self.cgroup_procs:  # first: everything it starts is inside (a failure stops the start)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        if self.max_file_bytes:
            setrlimit, which = self._fsize
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails, the writer lives
            setrlimit(which, (self.max_file_bytes, self.max_file_bytes))
        if self.death_signal is not None:
            die_with_parent(self.death_signal)
        if self.nice is not None:
            _set_priority(self.nice)


# --------------------------------------------------------------------------- signalling a group


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group that ``pid`` leads (Windows: to its whole tree).
    Returns False if there was nothing to signal (or no right to)."""
    if not hasattr(os, "killpg"):  # pragma: no cover - Windows: the whole tree, via psutil
        return _signal_tree_windows(pid, sig)
    escaped = left_group(pid)  # before the leader goes: its orphans cannot be found after
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    for other in escaped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(other, sig)
    return True


def left_group(pid: int) -> list[int]:
    """The descendants of ``pid`` that left its process group (``setsid``, ``setpgid``): a job's
    process may, and must not escape a suspend, a stop or the memory cap by it."""
    import psutil

    out = []
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    for p in kids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(p.pid) != pid:
                out.append(p.pid)
    return out


def suspend_group(pid: int) -> bool:
    """Stop every process in ``pid``'s group (SIGSTOP); :func:`resume_group` continues them."""
    return signal_group(pid, SIGSTOP)


def resume_group(pid: int) -> bool:
    return signal_group(pid, SIGCONT)


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
    """End ``proc`` and its process group: ``sig`` (SIGTERM) to the group, woken if stopped;
    SIGKILL to the group once ``proc`` has exited or ``grace`` seconds passed (``grace=0``:
    SIGKILL at once). Reaps ``proc`` and returns its exit code (None if it would not die
    within 10 s of SIGKILL)."""
    if proc.poll() is None and grace > 0 and sig != SIGKILL:
        signal_group(proc.pid, sig)
        signal_group(proc.pid, SIGCONT)  # a stopped group must wake up to die
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    signal_group(proc.pid, SIGKILL)  # the leader's stragglers too
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.warning("process %d did not exit after SIGKILL", proc.pid)
        return None


def _signal_tree_windows(pid: int, sig: int) -> bool:  # pragma: no cover - Windows only
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return False
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if sig == SIGSTOP:
                p.suspend()
            elif sig == SIGCONT:
                p.resume()
            elif sig == signal.SIGTERM:
                p.terminate()
            else:
                p.kill()
    return True


def raise_nofile_limit() -> int | None:
    """Raise the open-file soft limit to the hard limit (a server holding many connections must not
    run out at the common 1024); return the new soft limit (None: not on this platform)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit to %d: %s", hard, exc)
    return int(soft)


__all__ = [
    "raise_nofile_limit",
    "SIGCONT",
    "SIGKILL",
    "SIGSTOP",
    "SAFE_PATH",
    "die_with_parent",
    "exit_with_parent",
    "group_options",
    "host_pid",
    "kill_group",
    "left_group",
    "lower_priority",
    "resume_group",
    "signal_group",
    "undumpable",
    "suspend_group",
    "watch_parent",
]
