"""A CPU hog outside crowdd's process tree, like a volunteer's own busy program (the idle
policy's tests and ``benchmarks/idle_reaction.py``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import psutil

BURN = "while True:\n    pass\n"
# Starts one busy process per CPU in sessions of their own and exits at once: they are re-parented
# away from the caller, so they are "other" processes for the CPU probe, like a user's program.
LAUNCH = (
    "import subprocess, sys, os\n"
    "procs = [subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
    "         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "         for _ in range(int(sys.argv[2]))]\n"
    "print(' '.join(str(p.pid) for p in procs))\n"
)


@contextlib.contextmanager
def cpu_hog() -> Iterator[Callable[[], None]]:
    """Start a hog on every CPU now; yields a function that stops it (also done on the way out)."""
    out = subprocess.run([sys.executable, "-c", LAUNCH, BURN, str(psutil.cpu_count() or 1)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    pids = [int(p) for p in out.split()]

    def stop() -> None:
        for pid in pids:  # only the processes started here, by their pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    try:
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                assert psutil.Process(pid).ppid() != os.getpid(), "the hog must not be in crowdd's tree"
        yield stop
    finally:
        stop()


__all__ = ["BURN", "cpu_hog"]
