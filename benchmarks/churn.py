"""Volunteers come and go: goodput and the longest stall of one session under churn.

    sudo .venv/bin/python benchmarks/churn.py [--cap 0.35] [--epochs 8] [--json churn.json]

Measured (2-core VM, --epochs 8): steady 17,812 samples/s (4,453 per trainer), accuracy 0.8818;
churn 14,942 samples/s with 3.23 trainers available on average over 80 s, accuracy 0.8845;
longest stall 8.2 s; goodput 1.039. Goodput above 1 says the steady rate per trainer is
not a constant here: the host's capped machine (parameter server, coordinator, its own
worker, the tunnels) is the bottleneck with 4 trainers, so with fewer trainers each goes
faster.

Two sessions on Fashion-MNIST (the MLP [100], the shipped settings), each a real crowd on this
machine (:class:`crowdd.cli.demo.Crowd`: a matchmaker, a host daemon and worker daemons as
processes, every job confined and sandboxed as it ships). Each daemon, and everything it
starts, runs in its own cgroup capped at ``--cap`` CPUs (an emulated machine of that speed;
TF's threads are capped to match), so one trainer's rate does not depend on how many others
share this machine's two cores.

*Steady* (the reference): the host and 3 workers, nobody leaves. Its rate from 25 % to 75 %
of training over its 4 trainers is the steady-state rate per trainer; its test accuracy is
the reference accuracy.

*Churn*: the host and workers 1-3 start; worker 4 is switched off. Then, from the start of
training, every ~10 s (``--every``):

==========  ======================================================================
 event       what happens
==========  ======================================================================
 freeze 1    worker 1's daemon and every process below it get SIGSTOP (a laptop lid)
 kill 2      worker 2's daemon dies (SIGKILL; its job follows)
 join 4      worker 4 switches donation on: the matchmaker sends it to the session
 pause 3     worker 3's user pauses donation (``crowdd pause``): it leaves politely
 thaw 1      worker 1 gets SIGCONT after 4 periods: it rejoins its slot
 resume 3    worker 3 resumes (``crowdd resume``) and comes back
 restart 2   worker 2's daemon starts again and switches donation on: it joins anew
==========  ======================================================================

Goodput = samples trained per second over the churn window ÷ (steady rate per trainer ×
the mean number of trainers that could train, by the schedule: the host, plus each worker
while it is neither frozen, dead, paused nor yet to join). Also the longest stall of the
group's progress (no new step reported by the host) over the whole training, and the test
accuracy against the steady run's. Last line: goodput. Targets: goodput >= 0.8, longest
stall <= 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from crowdd.client.control import ControlClient
from crowdd.cli.demo import Crowd, Node
from crowdd.testing.churn import Availability, Watch, donate, freeze, goodput, longest_stall, samples_between
from crowdd.testing.cpucaps import CpuCaps

FASHION = Path("/usr/share/datasets/fashion-mnist")


async def cap_threads(node: Node, cap: float) -> None:
    """TF's threads to match the machine's CPU cap: set in its config, then ``crowdd reload``."""
    conf = node.root / "crowdd.toml"
    threads = max(1, round(cap + 0.49))
    conf.write_text(conf.read_text().replace("[job]\n", f"[job]\nthreads = {threads}\n", 1))
    async with ControlClient(node.socket) as c:
        await c.reload()


def job(workers: int, epochs: int, min_workers: int) -> dict[str, Any]:
    return {"workers": workers, "min_workers": min_workers, "wait": 3, "epochs": epochs}


async def host(node: Node, data: Path, spec: dict[str, Any]) -> None:
    async with ControlClient(node.socket) as c:
        await c.host(str(data), spec)


async def result_of(watch: Watch, timeout: float) -> dict[str, Any]:
    _, ev = await watch.wait(lambda e: e.get("event") == "result"
                             or (e.get("event") == "state" and e.get("state") == "standby"), timeout)
    if ev.get("event") != "result":
        raise RuntimeError(f"the host ended without a result (see {watch.node.log})")
    return ev


def training_start(watch: Watch) -> float:
    return min(t for t, _ in watch.of("progress"))


async def steady(root: Path, caps: CpuCaps, cap: float, epochs: int, batch: int, timeout: float) -> dict[str, Any]:
    crowd = Crowd(root, 3, verbose=False,
                  wrap=lambda node, argv: caps.argv(caps.make(f"steady-{node.name}", cap), argv))
    crowd.start()
    try:
        await crowd.wait_up()
        for n in crowd.nodes:
            await cap_threads(n, cap)
        w = Watch(crowd.host)
        w.start()
        for n in crowd.workers:
            await donate(n)
        await host(crowd.host, FASHION, job(3, epochs, 3))
        res = await result_of(w, timeout)
        pts = w.steps()
        t0, t1 = pts[0][0], pts[-1][0]
        a, b = t0 + 0.25 * (t1 - t0), t0 + 0.75 * (t1 - t0)
        samples, secs = samples_between(pts, a, b, batch)
        await w.close()
        rate = samples / secs if secs else 0.0
        return {"rate": rate, "per_trainer": rate / 4, "accuracy": res.get("test_accuracy"),
                "longest_stall_s": longest_stall(pts, t0, t1), "seconds": t1 - t0}
    finally:
        crowd.close()


async def churn(root: Path, caps: CpuCaps, cap: float, epochs: int, batch: int, every: float,
                timeout: float) -> dict[str, Any]:
    def wrap(node: Node, argv: list[str]) -> list[str]:
        return caps.argv(caps.make(f"churn-{node.name}-{len(caps.groups)}", cap), argv)

    crowd = Crowd(root, 4, verbose=False, wrap=wrap)
    crowd.start()
    log: list[dict[str, Any]] = []
    try:
        await crowd.wait_up()
        for n in crowd.nodes:
            await cap_threads(n, cap)
        w = Watch(crowd.host)
        w.start()
        w1, w2, w3, w4 = crowd.workers
        for n in (w1, w2, w3):
            await donate(n)
        await host(crowd.host, FASHION, job(4, epochs, 2))
        t0, _ = await w.wait(lambda e: e.get("event") == "progress", timeout)
        avail = Availability(t0, {w1.name, w2.name, w3.name})

        def note(what: str) -> None:
            log.append({"t": round(time.monotonic() - t0, 1), "event": what})
            print(f"  {log[-1]['t']:6.1f} s  {what}", flush=True)

        async def at(k: float) -> bool:
            """Sleep until period k of the schedule; False when training is already over."""
            await asyncio.sleep(max(0.0, t0 + k * every - time.monotonic()))
            return not w.of("result")

        frozen = None
        if await at(1):
            frozen = freeze(w1)
            avail.set(w1.name, False)
            note("freeze worker-1")
        if await at(2):
            crowd.kill_node(w2, signal.SIGKILL)
            avail.set(w2.name, False)
            note("kill worker-2")
        if await at(3):
            await donate(w4)
            avail.set(w4.name, True)
            note("worker-4 switches donation on")
        if await at(4):
            async with ControlClient(w3.socket) as c:
                await c.pause(1.0)
            avail.set(w3.name, False)
            note("worker-3 pauses")
        if await at(5) and frozen is not None:
            frozen.resume()
            frozen = None
            avail.set(w1.name, True)
            note("thaw worker-1")
        if await at(6):
            async with ControlClient(w3.socket) as c:
                await c.resume()
            avail.set(w3.name, True)
            note("worker-3 resumes")
        if await at(7):
            crowd.start_node(w2)
            await crowd.wait_up()
            await cap_threads(w2, cap)
            await donate(w2)
            avail.set(w2.name, True)
            note("worker-2 restarts and donates")
        if frozen is not None:
            frozen.resume()
        res = await result_of(w, timeout)
        pts = w.steps()
        end = pts[-1][0]
        window_end = min(end, t0 + 8 * every)
        samples, secs = samples_between(pts, t0, window_end, batch)
        joined = [e for _, e in w.events if e.get("event") == "log" and "joined training" in str(e.get("message"))]
        await w.close()
        return {"rate": samples / secs if secs else 0.0, "mean_trainers": avail.mean(t0, window_end),
                "window_s": window_end - t0, "accuracy": res.get("test_accuracy"),
                "longest_stall_s": longest_stall(pts, t0, end), "seconds": end - t0, "schedule": log,
                "slot_joins": len(joined)}
    finally:
        crowd.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", type=float, default=0.35, help="CPUs per emulated machine (default 0.35)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--every", type=float, default=10.0, help="seconds between churn events (default 10)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not FASHION.is_dir():
        print(f"needs Fashion-MNIST at {FASHION} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2
    from crowdd.hyperparams import Job

    batch = Job().batch_size
    caps = CpuCaps("crowdd-churn")
    out: dict[str, Any] = {"cap": args.cap, "epochs": args.epochs, "every": args.every}
    try:
        with tempfile.TemporaryDirectory(prefix="crowdd-churn-") as tmp:
            print(f"steady: host + 3 workers, {args.cap} CPU each", flush=True)
            out["steady"] = ref = asyncio.run(steady(Path(tmp) / "steady", caps, args.cap, args.epochs, batch,
                                                     args.timeout))
            print(f"  {ref['rate']:.0f} samples/s ({ref['per_trainer']:.0f} per trainer), accuracy "
                  f"{ref['accuracy']}, longest stall {ref['longest_stall_s']:.1f} s", flush=True)
            print("churn: host + workers 1-3, worker 4 off", flush=True)
            out["churn"] = run = asyncio.run(churn(Path(tmp) / "churn", caps, args.cap, args.epochs, batch,
                                                   args.every, args.timeout))
    finally:
        caps.close()
    out["goodput"] = goodput(run["rate"], ref["per_trainer"], run["mean_trainers"])
    out["accuracy_delta"] = (run["accuracy"] or 0.0) - (ref["accuracy"] or 0.0)
    print(f"churn: {run['rate']:.0f} samples/s with {run['mean_trainers']:.2f} trainers available on average "
          f"over {run['window_s']:.0f} s; accuracy {run['accuracy']} ({out['accuracy_delta']:+.3f} vs steady)")
    print(f"longest stall: {run['longest_stall_s']:.1f} s (target <= 15)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(f"goodput: {out['goodput']:.3f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
