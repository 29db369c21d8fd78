"""The host job: worker 0 (a child process) and the coordinator, which holds the model; the
process's life is here, the training itself in :mod:`crowdd.job.training`.

There is no parameter server: TF traffic flows one way, from this coordinator to each worker
(``docs/security.md``). Every change a worker returns is validated before any of it touches
the model (:mod:`crowdd.job.validate`), and a member whose changes keep failing is expelled.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from crowdd.job import EXIT_FAILED, EXIT_OK, MEMBERS_FILE
from crowdd.job.events import EventWriter
from crowdd.job.membership import Members, MembersWatcher
from crowdd.job.server import cap_threads, reachable, spawn
from crowdd.job.spec import INDEX_FILE, JobSpec
from crowdd.data.manifest import Layout
from crowdd.platform.process import host_pid, lower_priority, watch_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0


class Children:
    """The job's TF server processes; kills them all on :meth:`kill`."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def add(self, name: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self.procs[name] = proc

    def kill(self) -> None:
        with self._lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    try:
                        proc.kill()
                    except OSError:
                        pass
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


def wait_ready(proc: subprocess.Popen, name: str, timeout: float = READY_TIMEOUT) -> None:
    """Block until the server child prints ``ready``; raise RuntimeError if it dies first."""
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not result or result[0].strip() != "ready":
        code = proc.poll()
        raise RuntimeError(
            f"{name} server did not start" + (f" (exit code {code}; is its port free?)" if code is not None else "")
        )


#: how much nicer the host's own trainer (worker 0) runs than the rest of its job
TRAINER_NICE_STEP = 10


def server_nice(job_name: str, nice: int) -> int:
    """The niceness of a host-side TF server: the host's own trainer (worker 0) runs
    ``TRAINER_NICE_STEP`` nicer than the job's ``nice`` (at most 19).

    The coordinator (this process: it hands out every round and validates every change) and
    the daemon's tunnels serve every worker: a round that waits behind the host's own training
    steps stalls a remote worker, and the host's trainer is one of N. Measured on 0.4-CPU
    emulated machines (``benchmarks/scaling.py``, when the host also ran a parameter server).
    At nice 19 every job process already runs SCHED_IDLE and there is nothing lower; the
    daemon (nice 0) still comes first.
    """
    return min(19, nice + TRAINER_NICE_STEP) if job_name == "worker" else nice


def start_servers(spec: JobSpec, names: list[tuple[str, str, int]], children: Children) -> None:
    """Start each named TF server; each knows only its own task (nothing else to reach)."""
    for label, job_name, task in names:
        own = {job_name: {task: spec.cluster.worker[task]}}
        children.add(label, spawn(own, job_name, task, threads=spec.settings.threads,
                                  nice=server_nice(job_name, spec.settings.nice)))
    for label, _, _ in names:
        wait_ready(children.procs[label], label)


class Fatal:
    """Reports the job's one fatal error (a watchdog thread and the main loop may both see it)."""

    def __init__(self, events: EventWriter) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._said = False

    def report(self, message: str) -> None:
        with self._lock:
            if not self._said:
                self._said = True
                self._events.error(message)


def abort(fatal: Fatal, children: Children, message: str) -> None:
    """End the job now from any thread: the error event, the children killed, exit code 1.

    The main thread may sit in TF's C++ (a blocking connect or fetch) that no Python
    exception can interrupt, so the watchdogs end the process themselves.
    """
    fatal.report(message)
    children.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


def missing_workers(addresses: list[str], probe: Callable[[str], bool], live: frozenset[int] | None = None) -> list[str]:
    """``index address`` of each (live) worker server that does not accept a connection."""
    return [f"{i} ({addr})" for i, addr in enumerate(addresses) if (live is None or i in live) and not probe(addr)]


def starting_members(num_slots: int) -> Members:
    """The members file as the job starts (every slot when there is none, or it is bad)."""
    return MembersWatcher(Path(MEMBERS_FILE), num_slots).poll() or Members.everyone(num_slots)


def watch_start(
    spec: JobSpec, children: Children, fatal: Fatal, connected: threading.Event, stop: threading.Event,
    probe: Callable[[str], bool], live: frozenset[int] | None = None,
) -> None:
    """TF waits for every (live) worker server without end; give up after ``settings.start_timeout``."""
    timeout = spec.settings.start_timeout

    def loop() -> None:
        if connected.wait(timeout) or stop.is_set():
            return
        missing = missing_workers(list(spec.cluster.worker), probe, live)
        which = ", ".join(missing) if missing else "one or more workers (all answer now; too slow)"
        abort(
            fatal, children,
            f"worker server(s) {which} did not come up within {timeout:g} s (settings.start_timeout); "
            "training cannot start",
        )

    threading.Thread(target=loop, name="start-watch", daemon=True).start()


def run_host(spec: JobSpec, layout: Layout, events: EventWriter) -> int:
    out = Path(spec.output_dir or "output").absolute()
    try:
        Path(INDEX_FILE).write_text("0\n")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        events.error(f"cannot write the working or output directory: {exc}")
        return EXIT_FAILED
    children = Children()
    stop = threading.Event()
    fatal = Fatal(events)

    # No SIGTERM handler: the main thread may sit in TF's C++ for long, which would delay a
    # Python handler. The default action ends the job at once and the server children follow
    # (PR_SET_PDEATHSIG, and their own watch on our pid).
    parent = os.getppid()
    def parent_died() -> None:
        children.kill()
        os._exit(EXIT_OK)

    watch_parent(parent, parent_died)
    try:
        try:
            start_servers(spec, [("worker0", "worker", 0)], children)
        except RuntimeError as exc:
            events.error(str(exc))
            return EXIT_FAILED
        events.emit(
            "started",
            role="host",
            index=0,
            ports=spec.own_ports(),
            pid=host_pid(),  # as the daemon, outside the job's PID namespace, knows them
            children={k: host_pid(p.pid) for k, p in children.procs.items()},
        )
        connected = threading.Event()
        watch_start(spec, children, fatal, connected, stop, reachable,
                    starting_members(spec.cluster.num_workers).live)
        lower_priority(spec.settings.nice)
        cap_threads(spec.settings.threads)

        def workers_gone(message: str) -> None:
            abort(fatal, children, message)

        from crowdd.job.training import Training  # TF: loaded once the servers are started

        return Training(spec, layout, events, out, connected=connected, all_gone=workers_gone).run()
    except Exception as exc:  # the job's last word: an error event, never a traceback only
        log.exception("host job failed")
        fatal.report(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        stop.set()
        children.kill()


__all__ = ["TRAINER_NICE_STEP", "Children", "run_host", "server_nice"]
