"""Elastic sessions end to end, with real daemon processes on loopback: volunteers freeze,
crash, leave politely, come back and join while the group trains.

One session (digits; the host and workers 1-3 start, worker 4 is off): worker 1 is frozen
whole (SIGSTOP of its daemon and every process below it) for 45 s, worker 2 is killed
(SIGKILL), worker 4 switches donation on mid-run, worker 1 thaws: the group's progress never
stalls more than 15 s through all that, the newcomer trains in that same session and the
frozen worker rejoins its slot. Then worker 3 pauses (``crowdd pause``): the host hears it
within 2 s; it resumes and is back. The run is stopped there (the model kept): its accuracy is no
worse than the same job's without churn stopped at the same step (beyond chance: a one-sided
test at 1%), and no process is left. (A worker resumed from a suspend can hold the group for
up to ~20 s while its slot is attached again: its TF server finishes the function it was
suspended in first. Known; see docs/architecture.md.)
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon_e2e import TEST_CONFIG, digits_npz, job_processes

from crowdd.client.control import ControlClient
from crowdd.cli.demo import Crowd
from crowdd.testing.churn import Watch, donate, freeze, longest_stall
from crowdd.testing.bounds import at_least

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EPOCHS = 150  # a bound: both runs are stopped long before it
JOB = {"workers": 4, "min_workers": 2, "wait": 3, "epochs": EPOCHS, "batch_size": 50}
STALL_LIMIT = 15.0


@pytest.fixture
async def crowd(tmp_path: Path) -> AsyncIterator[Crowd]:
    c = Crowd(tmp_path / "crowd", 4, extra_config=TEST_CONFIG, steps_per_function=5, sync_every=5)
    c.start()
    try:
        await c.wait_up()
        yield c
    finally:
        c.close()
        assert not job_processes(c.root), "a job outlived the test"


async def host(crowd: Crowd, data: Path, job: dict[str, Any]) -> None:
    async with ControlClient(crowd.host.socket) as c:
        assert (await c.host(str(data), job))["type"] == "ok"


async def result(w: Watch, timeout: float) -> dict[str, Any]:
    _, ev = await w.wait(lambda e: e.get("event") == "result"
                         or (e.get("event") == "state" and e.get("state") == "standby"), timeout)
    assert ev.get("event") == "result", "the host ended without a result"
    return ev


def logs(w: Watch) -> list[str]:
    return [str(e.get("message")) for _, e in w.events if e.get("event") == "log"]


async def test_a_session_survives_churn_and_takes_a_newcomer(crowd: Crowd, tmp_path: Path) -> None:
    data = digits_npz(tmp_path / "digits.npz")
    w1, w2, w3, w4 = crowd.workers
    hw = Watch(crowd.host)
    watches = {n.name: Watch(n) for n in crowd.workers}
    hw.start()
    for w in watches.values():
        w.start()
    try:
        for n in (w1, w2, w3):
            await donate(n)
        await host(crowd, data, JOB)
        t0, _ = await hw.wait(lambda e: e.get("event") == "progress", 240)
        async with ControlClient(crowd.host.socket) as c:
            gid = (await c.status())["group"]["id"]

        await asyncio.sleep(3)
        frozen = freeze(w1)  # a laptop lid: the daemon and its job, whole
        t_freeze = time.monotonic()
        await asyncio.sleep(5)
        crowd.kill_node(w2, signal.SIGKILL)  # a crash: no goodbye
        await asyncio.sleep(3)
        await donate(w4)  # a newcomer, mid-session
        await watches[w4.name].wait(lambda e: e.get("event") == "state" and e.get("state") == "training", 120)
        async with ControlClient(w4.socket) as c:
            st = await c.status()
        assert st["group"]["id"] == gid, "the newcomer joined the running session, not a new one"
        await asyncio.sleep(max(0.0, t_freeze + 45 - time.monotonic()))
        frozen.resume()  # thawed: it rejoins its slot with its TF server as it was
        await watches[w1.name].wait(lambda e: e.get("event") == "log" and "rejoined the session" in str(e.get("message")), 60)
        await asyncio.sleep(10)  # and trains on
        t_window = time.monotonic()
        stall = longest_stall(hw.steps(), t0, t_window)
        print(f"\nlongest stall {stall:.1f} s (freeze, kill, newcomer, thaw)")
        assert stall <= STALL_LIMIT, f"the group's progress stalled {stall:.1f} s"
        # a polite goodbye: the host hears it before the job is suspended, and takes it out at once
        async with ControlClient(w3.socket) as c:
            await c.pause(1.0)
        t_pause = time.monotonic()
        t_out, _ = await hw.wait(lambda e: e.get("event") == "log" and "is away" in str(e.get("message")), 10)
        print(f"away heard {t_out - t_pause:.2f} s after the pause")
        assert t_out - t_pause < 2.0
        await asyncio.sleep(5)
        async with ControlClient(w3.socket) as c:
            await c.resume()
        await hw.wait(lambda e: e.get("event") == "log" and "is back" in str(e.get("message")), 10)
        # through all of that: stopped here, the model kept (no need to train on to the epochs'
        # end; the calm twin stops at the same step)
        async with ControlClient(crowd.host.socket) as c:
            await c.stop()
        res = await result(hw, 120)
        stop_step = hw.steps()[-1][1]
        messages = logs(hw)
        assert any("joins the running session" in m or "worker 4" in m for m in messages), messages[-20:]
        w4res = await watches[w4.name].wait(lambda e: e.get("event") == "result", 30)
        assert w4res[1]["test_accuracy"] == res["test_accuracy"]
        churned = res["test_accuracy"]
    finally:
        for w in (hw, *watches.values()):
            await w.close()
    assert not job_processes(crowd.root) or await _no_jobs(crowd.root)
    # the same job without churn, for the accuracy
    crowd.close()
    calm = Crowd(tmp_path / "calm", 3, extra_config=TEST_CONFIG, steps_per_function=5, sync_every=5)
    calm.start()
    try:
        await calm.wait_up()
        cw = Watch(calm.host)
        cw.start()
        for n in calm.workers:
            await donate(n)
        async with ControlClient(calm.host.socket) as c:
            await c.host(str(data), {**JOB, "workers": 3, "min_workers": 3})
        await cw.wait(lambda e: e.get("event") == "progress" and int(e.get("step") or 0) >= stop_step, 400)
        async with ControlClient(calm.host.socket) as c:
            await c.stop()
        base = await result(cw, 120)
        calm_step = cw.steps()[-1][1]
        await cw.close()
    finally:
        calm.close()
    print(f"accuracy with churn {churned:.4f} (stopped at step {stop_step}), "
          f"without {base['test_accuracy']:.4f} (step {calm_step})")
    # 0.9666 with churn, 0.9666 calm, at the same step, in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    calm_accuracy = base["test_accuracy"]
    at_least(churned, calm_accuracy - not_worse_margin(churned, calm_accuracy, count_test_records(data)),
             "accuracy with churn vs calm")


def count_test_records(data: Path) -> int:
    import numpy as np

    with np.load(data) as z:
        return int(len(z["y_test"]))


def not_worse_margin(a: float, b: float, n: int, z: float = 2.33) -> float:
    """How far below accuracy ``b`` an accuracy ``a`` may fall, each measured on ``n``
    test records, before it is worse beyond chance: ``z`` standard errors of the difference of
    two proportions (2.33: a one-sided test at 1%). Two runs of one job on digits' 360 test
    images differ by ~1.6 points for one standard error: a fixed 1-point bound failed one run in
    four (issue 30)."""
    return z * ((a * (1 - a) + b * (1 - b)) / n) ** 0.5


async def _no_jobs(root: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job_processes(root):
        await asyncio.sleep(0.2)
    return not job_processes(root)


async def test_a_worker_that_vanishes_as_training_starts_does_not_hold_the_group(crowd: Crowd, tmp_path: Path) -> None:
    """A worker frozen as the host starts training never brings its TF server up: the host
    gives it up within its heartbeat timeout and trains with the others (it used to wait out
    the 300 s start timeout and fail the session for everyone)."""
    data = digits_npz(tmp_path / "digits.npz")
    w1, w2 = crowd.workers[:2]
    hw = Watch(crowd.host)
    hw.start()
    frozen = None
    try:
        for n in (w1, w2):
            await donate(n)
        await host(crowd, data, {**JOB, "workers": 2, "min_workers": 1, "epochs": 20})
        t_train, _ = await hw.wait(lambda e: e.get("event") == "state" and e.get("state") == "training", 240)
        frozen = freeze(w2)
        t_progress, _ = await hw.wait(lambda e: e.get("event") == "progress", 120)
        print(f"\ntraining began {t_progress - t_train:.1f} s after the host moved to training")
        assert t_progress - t_train < 60
        res = await result(hw, 300)
        # 0.9666 (a worker vanished) in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(res["test_accuracy"], 0.8)
    finally:
        if frozen is not None:
            frozen.resume()
        await hw.close()


async def test_a_host_restarted_mid_session_resumes_from_its_checkpoint(crowd: Crowd, tmp_path: Path) -> None:
    """The host daemon is killed mid-training and started again: it hosts the same job again
    by itself, its workers (still donating) come back to it, and the new job starts from the
    last checkpoint rather than from scratch."""
    from crowdd.config import Paths

    data = digits_npz(tmp_path / "digits.npz")
    (crowd.host.root / "crowdd.toml").write_text((crowd.host.root / "crowdd.toml").read_text()
                                                 + "\n[job]\ncheckpoint_secs = 2.0\n"
                                                 if "[job]" not in (crowd.host.root / "crowdd.toml").read_text()
                                                 else (crowd.host.root / "crowdd.toml").read_text().replace(
                                                     "[job]\n", "[job]\ncheckpoint_secs = 2.0\n", 1))
    crowd.kill_node(crowd.host, signal.SIGTERM)
    crowd.start_node(crowd.host)  # the new config: checkpoints every 2 s
    await crowd.wait_up()
    w1, w2 = crowd.workers[:2]
    for n in (w1, w2):
        await donate(n)
    await host(crowd, data, {**JOB, "workers": 2, "min_workers": 2, "epochs": 40})
    jobs = Paths.under(crowd.host.root).jobs_dir
    deadline = time.monotonic() + 240
    while not list(jobs.glob("*/output/checkpoints/ckpt-*.npz")):
        assert time.monotonic() < deadline, "no checkpoint"
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    crowd.kill_node(crowd.host, signal.SIGKILL)  # no goodbye, no chance to clean up
    assert (Paths.under(crowd.host.root).state_dir / "hosting.json").exists()
    crowd.start_node(crowd.host)
    await crowd.wait_up()
    hw = Watch(crowd.host)
    hw.start()
    try:
        async with ControlClient(crowd.host.socket) as c:
            assert (await c.status())["role"] == "host"  # hosting again, by itself
        _, ev = await hw.wait(lambda e: e.get("event") == "log" and "resumed from its checkpoint" in str(e.get("message")), 240)
        step = int(str(ev["message"]).rsplit(" ", 1)[-1])
        assert step > 0
        res = await result(hw, 400)
        # 0.9694 (resumed) in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(res["test_accuracy"], 0.8)
        await hw.wait(lambda e: e.get("event") == "state" and e.get("state") in ("off", "standby"), 60)
        async with ControlClient(crowd.host.socket) as c:
            st = await c.status()
        assert not (Paths.under(crowd.host.root).state_dir / "hosting.json").exists()  # done: nothing to resume
        print(f"\nresumed at step {step}; accuracy {res['test_accuracy']:.4f}; error {st['error']}")
    finally:
        await hw.close()
