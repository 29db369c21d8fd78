"""Time to accuracy on emulated machines: does every volunteer make training faster?

    sudo .venv/bin/python benchmarks/scaling.py --model mlp --rates 50mbit,10mbit --workers 3 --repeats 3 --json scaling.json

Every node is an emulated machine: its own network namespace (:class:`crowdd.testing.netns.NetnsLab`),
a CPU cap (a cgroup: v1 ``cpu.cfs_quota_us`` or cgroup2 ``cpu.max``, ``--cap`` CPUs, the same for
every machine, the host's included) and a link shaped with ``tc tbf`` to RATE both ways. The
whole crowd runs through the real daemons: a matchmaker (its own namespace, uncapped), the host
daemon and N worker daemons, each daemon (and its job, its TF servers, its tunnels) inside its
machine's cgroup; TF's thread caps are ``[job] threads = 1`` to match a sub-core cap. The
daemons keep their state directories from run to run, so the dataset is replicated once (the
cache); every run is a fresh session. The host's settings (``[job]``, ``[replication]``) are
what ships (``crowdd.config.JobConfig()``, ``crowdd.hyperparams.Job()``) unless a flag says
otherwise, so what is measured is what users get.

Workload: Fashion-MNIST, the MLP [100] (target test accuracy 0.88) or the CNN (0.90). The host
evaluates on the whole test set every ``--eval-every`` seconds of training (the Job's
``eval_every_secs``); T is the host's ``train_seconds`` (from the start of its training loop,
less the time its evaluations took (the instrument, not the training: each evaluation of
the 10,000 test images takes ~0.6 s at a 0.4-CPU cap, a third of the host alone's wall time
at one per second), at the first evaluation at or above the target. The wall figure with the
evaluations is in the JSON (``wall_to_target_s``). Workers keep computing the functions
already scheduled while the host evaluates; the host's own worker shares its cap with the
evaluation. The run stops at the target. The JSON also has T counted from the end of the
first scheduled function (``after_first_function_s``: TF's one-time graph tracing and the first
evaluation's tracing excluded, ~5 s at a 0.4-CPU cap) and the speed-up on that clock.

Prints per rate and N: T, the speed-up T(host alone)/T(host+N) and the efficiency
speed-up/(N+1), split into the throughput ratio (steps per second against the host alone's)
and the steps ratio (total steps to the target against the host alone's; speed-up =
throughput ratio / steps ratio); the last line is the 4-trainer speed-up (host + 3 workers) at
the first rate. ``--repeats N`` runs every cell N times, interleaved, and reports medians (one
run crosses 0.88 anywhere in a ±40 % band). The CPU cap is enforced over ``--cap-period-ms``
(the kernel's 100 ms by default). After each run the host's session is stopped, so the next
run's fresh daemons do not resume it.
The host alone never touches the network, so it is measured once per model and is the
reference for every rate (same cap, same settings, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdd.config import JobConfig, Paths, ReplicationConfig
from crowdd.client.control import ControlClient
from crowdd.cli.demo import permissive_idle_table
from crowdd.errors import RemoteError, Unavailable
from crowdd.hyperparams import Job
from crowdd.trust.identity import Identity
from crowdd.node.resume import RECORD
from crowdd.platform.process import group_options, kill_group
from crowdd.testing.cpucaps import CpuCaps
from crowdd.testing.netns import NetnsLab, NetnsUnavailable, Shape

FASHION = Path("/usr/share/datasets/fashion-mnist")
TARGETS = {"mlp": 0.88, "cnn": 0.90}
MM_PORT = 7700
MM = 0  # the matchmaker's namespace; node k (host = 0) lives in namespace k + 1


# --------------------------------------------------------------------------- CPU caps


# --------------------------------------------------------------------------- the crowd


def node_config(name: str, fingerprint: str, args: argparse.Namespace) -> str:
    job = (f"steps_per_function = {args.steps_per_function}\nsync_every = {args.sync_every}\n"
           f'merge = "{args.merge}"\n' if args.merge else
           f"steps_per_function = {args.steps_per_function}\nsync_every = {args.sync_every}\n")
    return (
        "[daemon]\n"
        f'name = "{name}"\n'
        f'matchmaker_fingerprint = "{fingerprint}"\n'
        "retry_min = 0.3\nretry_max = 2.0\n"
        "[job]\nnice = 0\nthreads = 1\ncheckpoint_secs = 3600.0\n" + job
        + permissive_idle_table()
    )


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.max_workers = max(args.workers)
        self.lab = NetnsLab(self.max_workers + 2, base=(10, 93))
        self.caps = CpuCaps(f"crowdd-scaling-{os.getpid()}", round(args.cap_period_ms * 1000))
        self.groups: list[Path] = []
        self.mm: subprocess.Popen[Any] | None = None
        self.fingerprint = ""

    def setup(self) -> None:
        self.lab.setup()
        self.groups = [self.caps.make(f"node{k}", self.args.cap) for k in range(self.max_workers + 1)]
        mm_root = self.root / "matchmaker"
        self.fingerprint = Identity.load_or_create(Paths.under(mm_root).identity_dir, "matchmaker").fingerprint
        with open(self.root / "matchmaker.log", "ab") as log:
            self.mm = self.lab.popen(MM, [sys.executable, "-m", "crowdd", "matchmaker", "--listen", f"0.0.0.0:{MM_PORT}",
                                          "--root", str(mm_root)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def close(self) -> None:
        try:
            self.caps.close()
        finally:
            self.lab.close()

    def node_root(self, k: int) -> Path:
        return self.root / ("host" if k == 0 else f"worker-{k}")

    def start_daemon(self, k: int) -> subprocess.Popen[Any]:
        root = self.node_root(k)
        root.mkdir(parents=True, exist_ok=True)
        (root / "crowdd.toml").write_text(node_config("host" if k == 0 else f"worker-{k}", self.fingerprint, self.args))
        argv = [sys.executable, "-m", "crowdd", "daemon", "--root", str(root),
                "--matchmaker", f"{self.lab.hosts[MM].ip}:{MM_PORT}"]
        # the cgroup first: `ip netns exec` remounts /sys, which hides the cgroup tree
        with open(root / "daemon.log", "ab") as log:
            proc: subprocess.Popen[Any] = subprocess.Popen(
                CpuCaps.argv(self.groups[k], self.lab.argv(k + 1, argv)), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, **group_options())
        return proc

    async def run(self, rate: str, workers: int, model: str, dataset: Path) -> dict[str, Any]:
        args = self.args
        for k in range(workers + 1):
            self.lab.shape_host(k + 1, Shape(rate, args.burst, args.latency))
        daemons = [self.start_daemon(k) for k in range(workers + 1)]
        socks = [self.node_root(k) / "run" / "control.sock" for k in range(workers + 1)]
        target = TARGETS[model]
        evals: list[dict[str, Any]] = []
        rates: dict[int, list[float]] = {}  # trainer index -> its progress events' samples/s
        reached: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        throttled0 = [self.caps.throttled_s(g) for g in self.groups[: workers + 1]]
        listener: asyncio.Task[None] | None = None
        t_request = time.monotonic()
        try:
            await asyncio.gather(*(wait_socket(s, p) for s, p in zip(socks, daemons)))

            async def listen() -> None:
                errors: list[str] = []
                async for ev in ControlClient(socks[0]).subscribe():
                    kind = ev.get("event")
                    if kind == "eval" and isinstance(ev.get("test_accuracy"), (int, float)):
                        evals.append({k: ev.get(k) for k in ("step", "test_accuracy", "train_seconds", "eval_seconds")})
                        if ev["test_accuracy"] >= target and not reached.done():
                            reached.set_result(ev)
                    elif kind == "progress" and isinstance(ev.get("samples_per_sec"), (int, float)):
                        rates.setdefault(int(ev.get("worker", -1)), []).append(float(ev["samples_per_sec"]))
                    elif kind == "log" and ev.get("level") == "error":
                        errors.append(str(ev.get("message")))
                    elif kind == "result" and not reached.done():
                        reached.set_exception(RuntimeError(f"finished below the target: {ev.get('test_accuracy')}"))
                    elif (kind == "state" and ev.get("state") in ("off", "standby") and ev.get("previous") != "finished"
                          and not reached.done()):
                        reached.set_exception(RuntimeError(f"the host gave up: {errors[-1] if errors else 'see its log'}"))

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.3)
            for s in socks[1:]:
                async with ControlClient(s) as c:
                    await c.donate(True)
            job = {**self.job(model), "workers": workers, "min_workers": workers}
            t_request = time.monotonic()
            async with ControlClient(socks[0]) as c:
                await c.host(str(dataset), job)
            ev = await asyncio.wait_for(reached, args.timeout)
            wall = float(ev["train_seconds"])
            t = round(wall - float(ev.get("eval_seconds") or 0.0), 3)
            first = evals[0]  # after the first function: graphs traced and shipped, one evaluation traced
            warm = round(t - (float(first["train_seconds"]) - float(first["eval_seconds"] or 0.0)), 3)
            result: dict[str, Any] = {"rate": rate, "workers": workers, "trainers": workers + 1, "model": model,
                                      "target": target, "time_to_target_s": t, "wall_to_target_s": wall,
                                      "after_first_function_s": warm,
                                      "step": ev.get("step"),
                                      "test_accuracy": ev["test_accuracy"], "eval_seconds": ev.get("eval_seconds"),
                                      "request_to_target_s": round(time.monotonic() - t_request, 1), "evals": evals}
        except (RuntimeError, asyncio.TimeoutError) as exc:
            result = {"rate": rate, "workers": workers, "trainers": workers + 1, "model": model, "target": target,
                      "time_to_target_s": None, "error": str(exc) or type(exc).__name__, "evals": evals}
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            result_throttle = [round(self.caps.throttled_s(g) - t0, 1) for g, t0 in zip(self.groups, throttled0)]
            await self.end_session(socks[0])
            for p in daemons:
                kill_group(p, 10.0, signal.SIGTERM)
            self.caps.kill_all()  # jobs and TF servers that outlived their daemon
        result["throttled_s"] = result_throttle
        # each trainer's mean training rate (its progress events), and their sum: how much of
        # N+1 machines' compute the group actually used
        result["samples_per_sec_by_trainer"] = {str(k): round(sum(v) / len(v)) for k, v in sorted(rates.items()) if v}
        result["samples_per_sec"] = sum(result["samples_per_sec_by_trainer"].values())
        return result

    async def end_session(self, sock: Path) -> None:
        """Stop the host's session, so its restart next run does not resume it (a host daemon
        killed mid-session keeps ``hosting.json`` and hosts the same job again when it starts)."""
        try:
            async with ControlClient(sock) as c:
                await asyncio.wait_for(c.stop(), 30.0)
        except (Unavailable, RemoteError, asyncio.TimeoutError, OSError):
            pass
        (Paths.under(self.node_root(0)).state_dir / RECORD).unlink(missing_ok=True)

    def job(self, model: str) -> dict[str, Any]:
        a = self.args
        j: dict[str, Any] = {"model": model, "hidden": [100], "epochs": a.epochs, "eval_every_secs": a.eval_every}
        for key in ("learning_rate", "batch_size", "sharding", "optimizer"):
            v = getattr(a, key)
            if v is not None:
                j[key] = v
        return j


async def wait_socket(path: Path, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"a daemon exited early (code {proc.returncode})")
        try:
            async with ControlClient(path) as c:
                await c.status()
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no control socket at {path} within {timeout:.0f} s") from None
            await asyncio.sleep(0.3)


# --------------------------------------------------------------------------- summary


def median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def summarize(results: list[dict[str, Any]], rates: list[str]) -> list[dict[str, Any]]:
    """One cell per (rate, trainers) with the median over its repeats: T, T from the first
    function's end, steps to the target and steps per second; speed-up and efficiency against
    the host alone's medians (the host alone is one cell, the reference for every rate). A
    cell with a failed run has no T (a failure is not averaged away)."""
    keys: list[tuple[str, int]] = []
    for r in results:
        key = ("-", 0) if r["workers"] == 0 else (r["rate"], r["workers"])
        if key not in keys:
            keys.append(key)
    cells: list[dict[str, Any]] = []
    for rate, n in keys:
        runs = [r for r in results if (r["workers"] == 0 if n == 0 else (r["rate"], r["workers"]) == (rate, n))]
        ok = [r for r in runs if r.get("time_to_target_s")]
        whole = len(ok) == len(runs)
        cell: dict[str, Any] = {
            "rate": rates[0] if n == 0 else rate, "workers": n, "trainers": n + 1, "runs": len(runs),
            "failed": len(runs) - len(ok),
            "time_to_target_s": median([r["time_to_target_s"] for r in ok]) if whole else None,
            "time_to_target_each_s": [r.get("time_to_target_s") for r in runs],
            "after_first_function_s": median([r["after_first_function_s"] for r in ok]) if whole else None,
            "steps": median([float(r["step"]) for r in ok]) if whole else None,
            "steps_per_sec": median([r["step"] / r["time_to_target_s"] for r in ok]) if whole else None,
        }
        cells.append(cell)
    ref = cells[0] if cells and cells[0]["workers"] == 0 else None
    for c in cells:
        if not c["workers"] or ref is None or not ref["time_to_target_s"] or not c["time_to_target_s"]:
            continue
        c["speedup"] = round(ref["time_to_target_s"] / c["time_to_target_s"], 3)
        c["efficiency"] = round(c["speedup"] / c["trainers"], 3)
        c["speedup_after_first_function"] = round(ref["after_first_function_s"] / c["after_first_function_s"], 3)
        # speed-up = throughput ratio / steps ratio: what the systems side and the merge rule each give
        c["throughput_ratio"] = round(c["steps_per_sec"] / ref["steps_per_sec"], 3)
        c["steps_ratio"] = round(c["steps"] / ref["steps"], 3)
    return cells


# --------------------------------------------------------------------------- main


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    job, cfg = Job(), JobConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(TARGETS), default="mlp")
    p.add_argument("--rates", type=parse_list, default=["50mbit", "10mbit"], help="tc rates, comma-separated")
    p.add_argument("--workers", type=lambda s: sorted({int(x) for x in parse_list(s)} | {0}), default=[0, 1, 3],
                   help="worker counts besides the host (0, the host alone, is always run)")
    p.add_argument("--cap", type=float, default=0.4, help="CPUs per emulated machine (cgroup quota)")
    p.add_argument("--cap-period-ms", type=float, default=100.0,
                   help="the cgroup's enforcement period (the kernel's default, 100 ms; measured: at 10 ms "
                        "the host alone trained ~40%% slower under the same 0.4-CPU quota)")
    p.add_argument("--eval-every", type=float, default=1.0, help="seconds of training between evaluations")
    p.add_argument("--epochs", type=int, default=100, help="a bound; the run stops at the target")
    p.add_argument("--learning-rate", type=float, default=None, help=f"default: Job()'s ({job.learning_rate})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default: Job()'s ({job.batch_size})")
    p.add_argument("--sharding", default=None, help=f"default: Job()'s ({job.sharding})")
    p.add_argument("--optimizer", default=None, help=f"default: Job()'s ({job.optimizer})")
    p.add_argument("--merge", default=None, help=f"the host's [job] merge (default: JobConfig()'s, {cfg.merge})")
    p.add_argument("--sync-every", type=int, default=cfg.sync_every, help="the host's [job] sync_every (K)")
    p.add_argument("--steps-per-function", type=int, default=cfg.steps_per_function)
    p.add_argument("--burst", default="256kb")
    p.add_argument("--latency", default="50ms")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per cell (interleaved); each figure is the median (one run crosses 0.88 "
                        "anywhere in a ±40%% band)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on a run after this many seconds")
    p.add_argument("--dataset", type=Path, default=FASHION)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, state) for a post-mortem")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.sync_every > args.steps_per_function:
        p.error("--sync-every must be <= --steps-per-function")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    model = args.model
    root = Path(tempfile.mkdtemp(prefix="crowdd-scaling-", dir=args.workdir))
    bench = Bench(args, root)
    results: list[dict[str, Any]] = []

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            bench.setup()
        except NetnsUnavailable as exc:
            print(f"cannot run: {exc}", file=sys.stderr)
            return 2

        async def go() -> None:
            plan = [(args.rates[0], 0)] + [(r, n) for r in args.rates for n in args.workers if n > 0]
            for repeat, (rate, n) in ((i, cell) for i in range(args.repeats) for cell in plan):
                res = await bench.run(rate, n, model, args.dataset)
                res["repeat"] = repeat
                results.append(res)
                t = res["time_to_target_s"]
                print(f"{model} {rate:>7s} host+{n}: " + (f"time to {res['target']} {t:.1f} s (step {res['step']}, "
                      f"acc {res['test_accuracy']:.4f})" if t is not None else f"FAILED: {res.get('error')}"),
                      file=sys.stderr, flush=True)

        asyncio.run(go())
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        bench.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    cells = summarize(results, args.rates)
    ref_cell = next((c for c in cells if c["workers"] == 0), None)
    ref = ref_cell["time_to_target_s"] if ref_cell else None
    out = {"model": model, "target": TARGETS[model], "cap_cpus": args.cap, "cap_period_ms": args.cap_period_ms,
           "cpus": os.cpu_count(), "eval_every_secs": args.eval_every, "repeats": args.repeats, "reference_s": ref,
           "rates": args.rates, "job": bench.job(model),
           "settings": {"merge": args.merge or JobConfig().merge, "sync_every": args.sync_every,
                        "steps_per_function": args.steps_per_function, "route": ReplicationConfig().route},
           "cells": cells, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"{model}: host alone (cap {args.cap} CPU) reaches {TARGETS[model]} in "
          + (f"{ref:.1f} s (median of {ref_cell['runs']})" if ref and ref_cell else "FAILED"))
    for c in cells:
        if c["workers"]:
            t = c["time_to_target_s"]
            print(f"{model} {c['rate']:>7s} {c['trainers']} trainers: T {t if t is None else round(t, 1)} s "
                  f"(median of {c['runs']}), speed-up {c.get('speedup')}, efficiency {c.get('efficiency')}; "
                  f"steps/s {c.get('throughput_ratio')}x the host alone's, steps to the target "
                  f"{c.get('steps_ratio')}x (from the first function's end: speed-up "
                  f"{c.get('speedup_after_first_function')})")
    four = next((c for c in cells if c["trainers"] == 4 and c["rate"] == args.rates[0]), None)
    if four is not None:
        print(f"{model} 4-trainer speed-up at {four['rate']}: {four.get('speedup')}x "
              f"(efficiency {four.get('efficiency')}; target >= 3.0x at 50mbit, >= 2.5x at 10mbit)")
    return 0 if ref and all(c["time_to_target_s"] for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
