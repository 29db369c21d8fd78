"""CPU caps for emulated machines (benchmarks): one cgroup per machine, capped at a number of
CPUs, with cgroup2's ``cpu.max`` where its cpu controller is mounted at /sys/fs/cgroup, else
cgroup v1's ``cpu.cfs_quota_us``. Root only."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from crowdd.testing.netns import NetnsUnavailable


class CpuCaps:
    """One cgroup per emulated machine below a per-run parent, capped at ``cpus`` CPUs.

    cgroup2 (``cpu.max``) where it is mounted at /sys/fs/cgroup, else cgroup v1's cpu
    controller (``cpu.cfs_quota_us``). :meth:`close` kills what is left in them and removes
    them."""

    #: the enforcement period (µs) unless the caller picks one: the kernel's default. At
    #: 100 ms a 0.4-CPU group runs 40 ms and then stops for 60 ms, so a service in it (a
    #: worker's server, a tunnel) answers up to 60 ms late once its neighbours used the
    #: quota. A shorter period is not a truer slow machine either: at 10 ms the host alone
    #: trained ~40% slower under the same quota (``benchmarks/scaling.py --cap-period-ms``).
    PERIOD = 100_000

    def __init__(self, prefix: str, period_us: int = PERIOD) -> None:
        if not 1000 <= period_us <= 1_000_000:
            raise ValueError(f"a cgroup cpu period must be 1 ms .. 1 s, got {period_us} µs")
        self.period = period_us
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "cpu" in v2.read_text().split():
            self.v2, base = True, Path("/sys/fs/cgroup")
        elif Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
            self.v2, base = False, Path("/sys/fs/cgroup/cpu")
        else:
            raise NetnsUnavailable("no cgroup cpu controller (cgroup2 cpu.max or v1 cpu.cfs_quota_us)")
        self.parent = base / prefix
        self.groups: list[Path] = []

    def make(self, name: str, cpus: float) -> Path:
        if not self.parent.exists():
            self.parent.mkdir()
            if self.v2:
                (self.parent / "cgroup.subtree_control").write_text("+cpu")
        g = self.parent / name
        g.mkdir(exist_ok=True)
        quota = max(1000, round(cpus * self.period))
        if self.v2:
            (g / "cpu.max").write_text(f"{quota} {self.period}")
        else:
            (g / "cpu.cfs_period_us").write_text(str(self.period))
            (g / "cpu.cfs_quota_us").write_text(str(quota))
        self.groups.append(g)
        return g

    @staticmethod
    def argv(group: Path, argv: list[str]) -> list[str]:
        """``argv`` started inside ``group`` (the shell joins it, then execs)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *argv]

    @staticmethod
    def pids(group: Path) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in (group / "cgroup.procs").read_text().split()]
        return []

    def throttled_s(self, group: Path) -> float:
        with contextlib.suppress(OSError, ValueError):
            stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
            return int(stat.get("throttled_usec", 0)) / 1e6 if self.v2 else int(stat.get("throttled_time", 0)) / 1e9
        return 0.0

    def kill_all(self) -> None:
        for _ in range(50):
            left = [pid for g in self.groups for pid in self.pids(g)]
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def close(self) -> None:
        self.kill_all()
        for g in reversed(self.groups):
            for _ in range(20):
                try:
                    g.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        with contextlib.suppress(OSError):
            self.parent.rmdir()
        self.groups.clear()


__all__ = ["CpuCaps"]
