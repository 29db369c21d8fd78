"""Suspend and resume a process tree by walking it (tests; the daemon stops a job's process
group with :func:`crowdd.platform.process.suspend_group`)."""

from __future__ import annotations

import logging

import psutil

logger = logging.getLogger(__name__)


class JobSuspender:
    """Suspend and resume a process tree (SIGSTOP/SIGCONT on POSIX, NtSuspendProcess on Windows).

    ``suspend`` stops the root first (so it cannot start new children), then every descendant,
    and scans once more for children started meanwhile; ``resume`` continues what it stopped,
    children before the root.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stopped: list[psutil.Process] = []

    @property
    def suspended(self) -> bool:
        return bool(self._stopped)

    def suspend(self) -> list[int]:
        """Stop the tree; returns the pids stopped. ProcessLookupError if the root is gone."""
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            raise ProcessLookupError(f"cannot suspend: no process {self.pid}") from None
        seen = {p.pid for p in self._stopped}
        todo = [root]
        for _ in range(2):  # second pass catches children forked while we were stopping
            try:
                todo += root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            for p in todo:
                if p.pid in seen:
                    continue
                try:
                    p.suspend()
                except psutil.NoSuchProcess:
                    continue
                except psutil.AccessDenied:
                    raise PermissionError(f"cannot suspend process {p.pid}: access denied") from None
                seen.add(p.pid)
                self._stopped.append(p)
            todo = []
        logger.info("suspended job tree %d (%d processes)", self.pid, len(self._stopped))
        return [p.pid for p in self._stopped]

    def resume(self) -> list[int]:
        """Continue every process this suspender stopped; returns their pids."""
        resumed = []
        for p in reversed(self._stopped):
            try:
                if p.is_running():
                    p.resume()
                    resumed.append(p.pid)
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                logger.warning("cannot resume process %d: access denied", p.pid)
        self._stopped = []
        logger.info("resumed job tree %d (%d processes)", self.pid, len(resumed))
        return resumed


__all__ = ["JobSuspender"]
