"""The worker job: one TF worker server child; exits when its parent (the daemon) goes.

The worker reaches nothing: the host's coordinator connects to its server and hands it each
round's weights. Whether the host is still there is the daemon's to tell (the session's
heartbeats); it ends this job when the session ends.
"""

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
from crowdd.job.spec import INDEX_FILE, JobSpec
from crowdd.platform.process import host_pid

log = logging.getLogger(__name__)

POLL_SECS = 1.0


def run_worker(spec: JobSpec, events: EventWriter) -> int:
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
            "started", role="worker", index=spec.index, ports=spec.own_ports(), pid=host_pid(),
            children={"worker": host_pid(server.pid)},
        )
        while True:
            code = server.poll()
            if code is not None:
                events.error(f"the worker server died (exit code {code})")
                return EXIT_FAILED
            if os.getppid() != parent:
                log.info("parent %d is gone; stopping", parent)
                return EXIT_OK
            time.sleep(POLL_SECS)
    finally:
        children.kill()


__all__ = ["run_worker"]
