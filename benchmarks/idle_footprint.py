"""The daemon's idle footprint: what a volunteer pays for having crowdd installed.

Starts a real ``crowdd daemon`` with donation off (a fresh state directory: a new install
starts off) and no matchmaker, waits until its control socket answers, lets it settle,
then samples it for ``--seconds`` (default 60): resident memory (peak over the window) and
CPU seconds used in the window. Targets (issues 5 and 26): RSS <= 30 MB and <= 0.2 CPU-seconds per
minute; both are reported as ratios to the target in the same run (<= 1.0 meets it). The
figure is the last line; ``--json PATH`` writes every number.

    .venv/bin/python benchmarks/idle_footprint.py --seconds 60 --json idle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from crowdd.client.control import ControlClient
from crowdd.errors import Unavailable
from crowdd.node.ports import free_port
from crowdd.platform.process import kill_group as stop_group

TARGET_RSS_MB = 30.0
TARGET_CPU_PER_MIN = 0.2
SETTLE = 2.0


async def wait_up(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited early with code {proc.returncode}")
        try:
            async with ControlClient(sock) as c:
                return await c.status()
        except Unavailable:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not open its control socket") from None
            await asyncio.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="sampling window (default 60)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    if args.seconds <= 0 or args.interval <= 0:
        p.error("--seconds and --interval must be > 0")

    root = Path(tempfile.mkdtemp(prefix="crowdd-idle-"))
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{free_port()}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        t_start = time.monotonic()
        status = asyncio.run(wait_up(root / "run" / "control.sock", proc))
        startup = time.monotonic() - t_start
        if status.get("state") != "off" or status.get("donating"):
            raise SystemExit(f"expected an idle daemon (off, not donating), got {status.get('state')}")
        time.sleep(SETTLE)
        ps = psutil.Process(proc.pid)
        t0 = ps.cpu_times()
        cpu0 = t0.user + t0.system
        w0 = time.monotonic()
        rss: list[int] = []
        while time.monotonic() - w0 < args.seconds:
            rss.append(ps.memory_info().rss)
            time.sleep(min(args.interval, max(0.0, args.seconds - (time.monotonic() - w0))))
        rss.append(ps.memory_info().rss)
        t1 = ps.cpu_times()
        window = time.monotonic() - w0
        cpu = (t1.user + t1.system) - cpu0
        threads = ps.num_threads()
        if proc.poll() is not None:
            raise SystemExit("the daemon died during the window")
    finally:
        stop_group(proc, 15.0)
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    peak_mb = max(rss) / 2**20
    cpu_per_min = cpu / window * 60.0
    figures = {
        "seconds": round(window, 2),
        "startup_seconds": round(startup, 3),
        "rss_peak_mb": round(peak_mb, 2),
        "rss_last_mb": round(rss[-1] / 2**20, 2),
        "cpu_seconds": round(cpu, 4),
        "cpu_seconds_per_minute": round(cpu_per_min, 4),
        "threads": threads,
        "target_rss_mb": TARGET_RSS_MB,
        "target_cpu_seconds_per_minute": TARGET_CPU_PER_MIN,
        "rss_ratio": round(peak_mb / TARGET_RSS_MB, 3),
        "cpu_ratio": round(cpu_per_min / TARGET_CPU_PER_MIN, 3),
        "shutdown_exit_code": proc.returncode,
    }
    figures["meets_targets"] = figures["rss_ratio"] <= 1.0 and figures["cpu_ratio"] <= 1.0
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"daemon up in {startup:.2f} s; sampled {window:.0f} s idle (donation off), {threads} threads")
    print(f"RSS peak {peak_mb:.1f} MB (target {TARGET_RSS_MB:.0f} MB)")
    print(f"CPU {cpu:.3f} s in {window:.0f} s = {cpu_per_min:.4f} s/min (target {TARGET_CPU_PER_MIN} s/min)")
    print(
        f"idle footprint: RSS {peak_mb:.1f} MB = {figures['rss_ratio']:.2f}x target, "
        f"CPU {cpu_per_min:.4f} s/min = {figures['cpu_ratio']:.3f}x target"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
