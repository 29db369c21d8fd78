"""Matchmaker load benchmark: C concurrent waiting clients against one real matchmaker process.

    python benchmarks/matchmaker_load.py --clients 10000 --json out.json

Every connection is TLS 1.3 (the clients pin the matchmaker's printed fingerprint), every
hello carries a real certificate the matchmaker checks, and the matchmaker connects back to
each member's data port before queueing it (the workers' ports refuse: they count as NAT'd).

1. Starts ``crowdd matchmaker`` as its own process (its peak RSS is read from
   /proc/PID/status VmHWM, and sampled with psutil as a cross-check).
2. Worker client processes (``--procs``, default 4, so the client side is not the
   bottleneck) open C connections at ``--rate`` per second; each sends its hello and times
   hello → first ``wait`` frame. All of them keep heartbeating (every ``--heartbeat`` s)
   while they wait.
3. With all C waiting, ``--probes`` more clients join one at a time (paced) and are timed the
   same way: the latency a newcomer sees at a full server. They never match (a tag no host
   has) and leave at once.
4. A host process then brings C / ``--group-size`` hosts, each wanting ``--group-size``
   workers; the time from the first host's hello until the last member holds its ``group``
   frame is the time to form groups.

Targets (2-core machine): 10,000 clients, p99 <= 100 ms, server RSS <= 200 MB; the summary
line (printed LAST) gives each figure and its ratio to the target (<= 1 meets it). The
headline latency is the newcomers' (step 3): during the ramp (step 2) the load generator's
own processes share the same cores with the server, so ramp latency is reported next to it
but measures the generator as much as the matchmaker. Leftover workers (C not a multiple
of the group size, or clients that failed) are told to stop once the hosts are grouped.
The open-file limit is raised to the hard limit (inherited by every process here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from crowdd import wire
from crowdd.errors import CrowddError
from crowdd.trust.identity import Identity, fingerprint_of
from crowdd.platform.process import raise_nofile_limit
from crowdd.trust.tls import client_context, open_tls

_CLIENT_TLS = client_context(None)  # the matchmaker's certificate is checked by its fingerprint

TARGET_P99_MS = 100.0
TARGET_RSS_MB = 200.0
DIGEST = "ee" * 32
PROBE_TAG = "benchmark-probe-never-matches"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


_WHO: dict[str, str] = {}


def who(cert_file: Path) -> dict[str, str]:
    """Every client's ``cert`` and ``fingerprint`` (one real identity, checked on every hello)."""
    if not _WHO:
        pem = cert_file.read_bytes()
        _WHO.update(cert=pem.decode("ascii"), fingerprint=fingerprint_of(pem))
    return _WHO


def worker_hello(i: int, cert_file: Path, want_tag: str = "") -> dict[str, Any]:
    # data ports where nothing listens: the matchmaker's connect-back is refused (a NAT'd worker)
    return {
        "type": "hello", "proto": wire.PROTO, "role": "worker", "name": f"w{i}",
        "ports": {"data": 10000 + i % 50000, "session": 2, "tf": [3]}, "want_tag": want_tag, **who(cert_file),
    }


def host_hello(i: int, group_size: int, cert_file: Path, data_port: int) -> dict[str, Any]:
    # a host must be reachable: its data port is a real listener of the orchestrator
    return {
        "type": "hello", "proto": wire.PROTO, "role": "host", "name": f"h{i}",
        "ports": {"data": data_port, "session": 5, "tf": [6, 7]},
        "job": {"workers": group_size, "min_workers": group_size, "wait": 3600},
        "dataset": {"digest": DIGEST, "size": 1, "name": "bench"}, **who(cert_file),
    }


# --------------------------------------------------------------------------- client process


class _Client:
    """One waiting connection (asyncio streams; heartbeats come from one shared loop)."""

    def __init__(self, hello: dict[str, Any], fingerprint: str) -> None:
        self.hello = hello
        self.fingerprint = fingerprint
        self.writer: asyncio.StreamWriter | None = None
        self.latency: float | None = None
        self.grouped_at: float | None = None
        self.error: str | None = None
        self.first_wait = asyncio.Event()
        self.started = 0.0

    async def run(self, host: str, port: int, leave_after_wait: bool = False) -> None:
        try:
            reader, writer = await open_tls(host, port, _CLIENT_TLS, expect=self.fingerprint, timeout=30)
            self.writer = writer
            t0 = self.started = time.monotonic()
            await wire.write_frame(writer, self.hello)
            frame = await wire.read_frame(reader, timeout=60)
            if frame["type"] != "wait":
                raise RuntimeError(f"expected wait, got {frame}")
            self.latency = time.monotonic() - t0
            self.first_wait.set()
            if leave_after_wait:
                return
            while True:
                frame = await wire.read_frame(reader, timeout=None)
                if frame["type"] == "group":
                    self.grouped_at = time.monotonic()
                    return
                if frame["type"] != "wait":
                    raise RuntimeError(f"unexpected {frame}")
        except (OSError, asyncio.TimeoutError, CrowddError, wire.ConnectionClosed, wire.FrameTimeout, RuntimeError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.first_wait.set()
            if self.writer is not None:
                self.writer.close()


async def _heartbeats(clients: list[_Client], interval: float) -> None:
    beat = wire.encode({"type": "heartbeat"})
    while True:
        # spread the beats over the interval in small batches
        batches = max(1, int(interval / 0.05))
        for b in range(batches):
            for c in clients[b::batches]:
                w = c.writer
                if w is not None and c.grouped_at is None and c.error is None and not w.is_closing():
                    w.write(beat)
            await asyncio.sleep(interval / batches)


async def client_main(args: argparse.Namespace) -> None:
    host, port_s = args.address.rsplit(":", 1)
    port = int(port_s)
    if args.role == "worker":
        hellos = [worker_hello(args.offset + i, args.cert_file) for i in range(args.count)]
    else:
        hellos = [host_hello(args.offset + i, args.group_size, args.cert_file, args.host_data_port)
                  for i in range(args.count)]
    clients = [_Client(h, args.fingerprint) for h in hellos]
    beats = asyncio.create_task(_heartbeats(clients, args.heartbeat))
    start = time.monotonic()
    tasks = []
    for i, c in enumerate(clients):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(c.run(host, port)))
    await asyncio.gather(*(c.first_wait.wait() for c in clients))
    ok = sum(1 for c in clients if c.latency is not None)
    print(json.dumps({"event": "waiting", "at": time.monotonic(), "ok": ok}), flush=True)
    # run until every client is grouped, or the orchestrator says stop (a line or EOF on stdin)
    everyone = asyncio.ensure_future(asyncio.gather(*tasks))
    stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    await asyncio.wait({everyone, stop}, return_when=asyncio.FIRST_COMPLETED)
    everyone.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await everyone
    beats.cancel()
    print(json.dumps({
        "event": "done",
        "latencies": [c.latency for c in clients if c.latency is not None],
        "started": [c.started for c in clients if c.latency is not None],
        "grouped_at": [c.grouped_at for c in clients if c.grouped_at is not None],
        "errors": [c.error for c in clients if c.error][:20],
        "error_count": sum(1 for c in clients if c.error),
    }), flush=True)
    os._exit(0)  # the stdin reader thread may still block


# --------------------------------------------------------------------------- orchestrator


class RssWatch:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.1)

    def hwm(self) -> int | None:
        """Kernel-tracked peak RSS (VmHWM), in bytes."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None


async def _read_event(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    if proc.stdout is None:
        raise RuntimeError("no pipe from the client process")
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"client process {proc.pid} exited early (rc {await proc.wait()})")
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and "event" in ev:
                    return ev


async def _spawn_clients(address: str, role: str, count: int, offset: int, rate: float, args: argparse.Namespace) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", "--role", role, "--address", address,
        "--count", str(count), "--offset", str(offset), "--rate", str(rate),
        "--heartbeat", str(args.heartbeat), "--group-size", str(args.group_size),
        "--cert-file", str(args.cert_file), "--fingerprint", args.fingerprint,
        "--host-data-port", str(args.host_data_port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True, limit=64 << 20,
    )


async def _probe(host: str, port: int, n: int, pace: float, args: argparse.Namespace) -> tuple[list[float], int]:
    lat: list[float] = []
    errors = 0
    for i in range(n):
        c = _Client(worker_hello(900_000 + i, args.cert_file, want_tag=PROBE_TAG), args.fingerprint)
        await c.run(host, port, leave_after_wait=True)
        if c.latency is not None:
            lat.append(c.latency)
        else:
            errors += 1
        await asyncio.sleep(pace * random.uniform(0.5, 1.5))
    return lat, errors


# The server runs as `crowdd matchmaker`, with a gc callback that logs every collection
# pause over 5 ms, so a latency tail can be told apart from the collector's full passes.
_GC_WRAPPER = """
import gc, sys, time
_t = [0.0]
def _cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    elif time.perf_counter() - _t[0] > 0.005:
        print(f"GCPAUSE gen={info['generation']} ms={(time.perf_counter() - _t[0]) * 1e3:.1f}", file=sys.stderr, flush=True)
gc.callbacks.append(_cb)
from crowdd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _log_summary(text: str) -> dict[str, Any]:
    drops: dict[str, int] = {}
    for m in re.finditer(r"dropping client \S+ \(\S+\): (.*)", text):
        drops[m.group(1)] = drops.get(m.group(1), 0) + 1
    full = [float(m.group(1)) for m in re.finditer(r"GCPAUSE gen=2 ms=([\d.]+)", text)]
    return {
        "groups_logged": text.count(" formed: "), "drops": drops, "tracebacks": text.count("Traceback"),
        "gc_full_pauses_ms": full,
    }


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def orchestrate(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    C, k = args.clients, args.group_size
    hosts = C // k  # at most
    cfg = workdir / "matchmaker.toml"
    cfg.write_text(
        "[matchmaker]\n"
        f"max_clients = {C + hosts + args.probes + 100}\n"
        f"max_per_ip = {C + hosts + args.probes + 100}\n"
        # every simulated volunteer connects from 127.0.0.1: one source
        f"max_handshaking_per_ip = {C + hosts + args.probes + 100}\n"
        "heartbeat_timeout = 30.0\nstatus_interval = 5.0\n"
    )
    log = workdir / "matchmaker.log"
    with log.open("wb") as log_fh:
        if args.profile:
            launch = ["-m", "cProfile", "-o", args.profile, "-m", "crowdd"]
        else:
            launch = ["-c", _GC_WRAPPER]
        server = await asyncio.create_subprocess_exec(
            sys.executable, *launch, "matchmaker", "--listen", "127.0.0.1:0",
            "--config", str(cfg), "--root", str(workdir), "-v",
            stdout=subprocess.DEVNULL, stderr=log_fh, start_new_session=True,
        )
    procs: list[asyncio.subprocess.Process] = []
    try:
        address = None
        async with asyncio.timeout(60):
            while address is None:
                text = log.read_text(errors="replace")
                m = re.search(r"crowdd matchmaker listening on (\S+):(\d+)", text)
                f = re.search(r"crowdd matchmaker fingerprint (\S+)", text)
                if m and f:
                    address = (m.group(1), int(m.group(2)))
                    args.fingerprint = f.group(1)
                elif server.returncode is not None:
                    raise RuntimeError(f"the matchmaker exited: {log.read_text()}")
                else:
                    await asyncio.sleep(0.05)
        addr = f"{address[0]}:{address[1]}"
        watch = RssWatch(server.pid)
        rss_task = asyncio.create_task(watch.run())
        base_rss = psutil.Process(server.pid).memory_info().rss

        # 1. C waiting workers
        per = [C // args.procs + (1 if i < C % args.procs else 0) for i in range(args.procs)]
        t_start = time.monotonic()
        offset = 0
        for n in per:
            procs.append(await _spawn_clients(addr, "worker", n, offset, args.rate / args.procs, args))
            offset += n
        ready = [await _read_event(p, args.timeout) for p in procs]
        t_all_waiting = max(ev["at"] for ev in ready)
        rss_waiting = psutil.Process(server.pid).memory_info().rss
        cpu_waiting = sum(psutil.Process(server.pid).cpu_times()[:2])

        # 2. probes at a full server
        probe_lat, probe_err = await _probe(address[0], address[1], args.probes, args.probe_pace, args)

        # 3. hosts arrive: groups form (as many full groups as workers got queued)
        waiting_workers = sum(ev["ok"] for ev in ready)
        hosts = waiting_workers // k
        t_hosts = time.monotonic()
        hproc = await _spawn_clients(addr, "host", hosts, 0, args.host_rate, args)
        await _read_event(hproc, args.timeout)  # every host has its first frame
        host_done = await _read_event(hproc, args.timeout)  # every host is grouped (or failed)
        worker_done = []
        for p in procs:
            # leftover workers (waiting_workers % k, or a host that failed) wait for ever: stop them
            with contextlib.suppress(Exception):
                if p.stdin is not None:
                    p.stdin.write(b"stop\n")
                    await p.stdin.drain()
            worker_done.append(await _read_event(p, args.timeout))
        procs.append(hproc)
        done = [*worker_done, host_done]
        rss_task.cancel()
        hwm = watch.hwm()
        cpu_end = sum(psutil.Process(server.pid).cpu_times()[:2])
        lat = [x for d in worker_done for x in d["latencies"]]
        timeline = sorted((t - t_start, x) for d in worker_done for t, x in zip(d["started"], d["latencies"]))
        grouped = [x for d in done for x in d["grouped_at"]]
        errors = sum(d["error_count"] for d in done)
        server.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rc = await server.wait()
        peak = max(hwm or 0, watch.peak)
        return {
            "clients": C,
            "client_procs": args.procs,
            "rate_per_s": args.rate,
            "heartbeat_s": args.heartbeat,
            "ramp_s": t_all_waiting - t_start,
            "latency_ms": {
                "p50": pct(lat, 50) * 1e3, "p90": pct(lat, 90) * 1e3, "p99": pct(lat, 99) * 1e3,
                "max": max(lat) * 1e3 if lat else float("nan"), "mean": statistics.fmean(lat) * 1e3 if lat else float("nan"),
                "n": len(lat),
            },
            "probe_latency_ms": {
                "p50": pct(probe_lat, 50) * 1e3, "p99": pct(probe_lat, 99) * 1e3,
                "max": max(probe_lat) * 1e3 if probe_lat else float("nan"), "n": len(probe_lat), "errors": probe_err,
            },
            "hosts": hosts,
            "group_size": k,
            "groups_formed_s": (max(grouped) - t_hosts) if grouped else float("nan"),
            "members_grouped": len(grouped),
            "members_expected": hosts * (k + 1),
            "workers_queued": waiting_workers,
            "host_latency_ms_p99": pct(host_done["latencies"], 99) * 1e3,
            "errors": errors,
            "error_samples": [e for d in done for e in d["errors"]][:5],
            "server_rss_mb": {"start": base_rss / 2**20, "all_waiting": rss_waiting / 2**20, "peak": peak / 2**20,
                              "peak_source": "VmHWM" if hwm and hwm >= watch.peak else "psutil"},
            "ramp_timeline": [[round(t, 4), round(x * 1e3, 2)] for t, x in timeline],  # [s since start, ms]
            "server_cpu_s": {"until_all_waiting": cpu_waiting, "total": cpu_end},
            "server_rc": rc,
            "server_log": _log_summary(log.read_text(errors="replace")),
            "target": {"p99_ms": TARGET_P99_MS, "rss_mb": TARGET_RSS_MB},
        }
    finally:
        for p in procs:
            _kill_group(p)
        _kill_group(server)
        for p in [*procs, server]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10_000, help="concurrent waiting workers (default 10000)")
    p.add_argument("--procs", type=int, default=4, help="worker client processes (default 4)")
    p.add_argument("--rate", type=float, default=1000.0, help="new connections per second, all processes (default 1000)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval of every client (default 5 s)")
    p.add_argument("--probes", type=int, default=200, help="timed newcomers at the full server (default 200)")
    p.add_argument("--probe-pace", type=float, default=0.02, help="seconds between probes (default 0.02)")
    p.add_argument("--group-size", type=int, default=4, help="workers per host (default 4): clients/size hosts")
    p.add_argument("--host-rate", type=float, default=2000.0, help="hosts per second (default 2000)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds per phase")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--profile", help="run the server under cProfile, writing the stats to this file")
    # client-process mode (internal)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--role", default="worker", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cert-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", default="", help=argparse.SUPPRESS)
    p.add_argument("--host-data-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    limit = raise_nofile_limit()
    if args.client:
        asyncio.run(client_main(args))
        return 0
    if args.clients < 1 or args.group_size < 1 or args.clients % args.group_size:
        print("--clients must be a positive multiple of --group-size", file=sys.stderr)
        return 2
    need = args.clients + args.clients // max(1, args.group_size) + 200
    if limit is not None and limit < need:
        print(f"open-file limit {limit} is below the ~{need} the server needs; lower --clients", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="crowdd-mmload-") as tmp, \
            socket.create_server(("127.0.0.1", 0), backlog=65535) as host_data:
        # the clients' identity (one real certificate, checked on every hello), and the hosts'
        # data port (the matchmaker connects back to it: a host must be reachable)
        args.cert_file = Identity.load_or_create(Path(tmp) / "clients", "client").cert_path
        args.host_data_port = host_data.getsockname()[1]
        res = asyncio.run(orchestrate(args, Path(tmp)))
    res["ratio_p99"] = res["probe_latency_ms"]["p99"] / TARGET_P99_MS
    res["ratio_p99_ramp"] = res["latency_ms"]["p99"] / TARGET_P99_MS
    res["ratio_rss"] = res["server_rss_mb"]["peak"] / TARGET_RSS_MB
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    lat, pr, rss = res["latency_ms"], res["probe_latency_ms"], res["server_rss_mb"]
    print(f"ramp: {res['clients']} clients in {res['ramp_s']:.1f} s from {args.procs} client processes; "
          f"hello->wait p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    print(f"newcomers at a full server ({pr['n']}): p50 {pr['p50']:.1f} ms, p99 {pr['p99']:.1f} ms")
    print(f"groups: {res['hosts']} hosts x {res['group_size']} workers formed in {res['groups_formed_s']:.2f} s "
          f"({res['members_grouped']}/{res['members_expected']} members grouped), errors {res['errors']}")
    gcp = res["server_log"]["gc_full_pauses_ms"]
    print(f"server full GC passes: {len(gcp)}, longest {max(gcp, default=0):.0f} ms")
    print(f"server RSS: start {rss['start']:.1f} MB, all waiting {rss['all_waiting']:.1f} MB, peak {rss['peak']:.1f} MB; "
          f"server CPU: {res['server_cpu_s']['until_all_waiting']:.2f} s until all waiting, {res['server_cpu_s']['total']:.2f} s in all")
    print(
        f"matchmaker_load: clients={res['clients']} hello->wait at full server p50={pr['p50']:.1f}ms "
        f"p99={pr['p99']:.1f}ms (target {TARGET_P99_MS:.0f}ms, ratio {res['ratio_p99']:.2f}), "
        f"during ramp p50={lat['p50']:.1f}ms p99={lat['p99']:.1f}ms (ratio {res['ratio_p99_ramp']:.2f}), "
        f"groups={res['hosts']} in {res['groups_formed_s']:.2f}s "
        f"rss={rss['peak']:.1f}MB (target {TARGET_RSS_MB:.0f}MB, ratio {res['ratio_rss']:.2f})"
    )
    return 0 if res["errors"] == 0 and res["members_grouped"] == res["members_expected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
