"""The worker job: one TF worker server child; exits when the parent or the host goes away."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from crowdd.job import EXIT_FAILED, EXIT_OK
from crowdd.job.events import EventWriter
from crowdd.job.host import Children, start_servers
from crowdd.job.server import reachable
from crowdd.job.spec import INDEX_FILE, JobSpec

log = logging.getLogger(__name__)

HOST_GONE_SECS = 60.0
POLL_SECS = 1.0


def run_worker(spec: JobSpec, events: EventWriter, *, host_gone_secs: float = HOST_GONE_SECS) -> int:
    try:
        Path(INDEX_FILE).write_text(f"{spec.index}\n")
    except OSError as exc:
        events.error(f"cannot write {INDEX_FILE} in the working directory: {exc}")
        return EXIT_FAILED
    children = Children()

    def on_signal(signum: int, _frame: Any) -> None:
        children.kill()
        os._exit(EXIT_OK if signum == signal.SIGTERM else 128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    parent = os.getppid()
    try:
        try:
            start_servers(spec, [("worker", "worker", spec.index)], children)
        except RuntimeError as exc:
            events.error(str(exc))
            return EXIT_FAILED
        server = children.procs["worker"]
        events.emit(
            "started", role="worker", index=spec.index, ports=spec.own_ports(), pid=os.getpid(),
            children={"worker": server.pid},
        )
        seen_host = False
        last_seen = time.monotonic()
        while True:
            code = server.poll()
            if code is not None:
                events.error(f"the worker server died (exit code {code})")
                return EXIT_FAILED
            if os.getppid() != parent:
                log.info("parent %d is gone; stopping", parent)
                return EXIT_OK
            now = time.monotonic()
            if reachable(spec.cluster.ps[0]):
                seen_host, last_seen = True, now
            elif seen_host and now - last_seen > host_gone_secs:
                log.info("the parameter server has been unreachable for %.0f s; stopping", host_gone_secs)
                return EXIT_OK
            time.sleep(POLL_SECS)
    finally:
        children.kill()


__all__ = ["reachable", "run_worker"]
