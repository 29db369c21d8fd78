"""One plan per session: the host decides what the group computes. Its workers' own config
files say otherwise (another route, K, steps per function, merge, chunk size) and must change
nothing: the group replicates along the host's route, every job runs the host's settings, and
the session trains to the end. Real daemons, matchmaker and TF jobs on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from crowdd.config import JobConfig
from crowdd.client.control import ControlClient
from crowdd.cli.demo import Crowd
from crowdd.testing.bounds import at_least
from test_daemon_e2e import (  # the same real crowd, recorder and helpers
    Recorder,
    digits_npz,
    donate_all,
    host_job,
    job_processes,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# 3 epochs of digits at lr 0.1 (2 workers): 0.774 in a clean-clone run (2026-12-07); one run's
# accuracy on the 360 test images has a standard error of ~0.022, so 4 of them below it
THREE_EPOCHS_THRESHOLD = 0.68
HOST_SETTINGS = {"route": "chain", "steps_per_function": 20, "sync_every": 10, "merge": JobConfig().merge}
WORKER_FILE = (
    "[replication]\nroute = \"binomial\"\nchunk_size = 4096\nstall_timeout = 5.0\n"
    "[job]\nsteps_per_function = 7\nsync_every = 3\nmerge = \"sum\"\n"
)


def _rewrite(config: Path, extra: str) -> None:
    """Replace the [replication]/[job] tables of a demo node's config with ``extra``."""
    out, skip = [], False
    for line in config.read_text().splitlines():
        if line.startswith("["):
            skip = line.strip() in ("[replication]", "[job]")
        if not skip:
            out.append(line)
    config.write_text("\n".join(out) + "\n" + extra)


async def _spec_while_training(root: Path, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for spec in (root / "state" / "jobs").glob("*/spec.json"):
            try:
                return dict(json.loads(spec.read_text()))
            except ValueError:
                pass  # being written
        await asyncio.sleep(0.05)
    raise AssertionError(f"no job spec appeared below {root}")


async def test_workers_config_never_changes_what_the_group_computes(tmp_path: Path) -> None:
    host_file = '[replication]\nstall_timeout = 5.0\nroute = "chain"\nchunk_size = 65536\n'
    crowd = Crowd(tmp_path / "crowd", 2, extra_config=host_file)
    try:
        crowd.start()
        await crowd.wait_up()
        for w in crowd.workers:  # the volunteers' own files disagree with the host on everything
            _rewrite(w.root / "crowdd.toml", WORKER_FILE)
            async with ControlClient(w.socket) as c:
                assert (await c.reload())["type"] == "ok"
        rec = Recorder(crowd.nodes)
        await rec.start()
        try:
            await donate_all(crowd.workers)
            await host_job(crowd.host, digits_npz(tmp_path / "digits.npz"),
                           {"workers": 2, "min_workers": 2, "epochs": 3, "learning_rate": 0.1})
            specs = await asyncio.gather(*(_spec_while_training(w.root, 240) for w in crowd.workers))
            statuses = []
            for w in crowd.workers:
                async with ControlClient(w.socket) as c:
                    statuses.append(await c.status())
            result = await rec.host_result(crowd.host, 240)
            # 0.8106 and 0.7855 in two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
            at_least(result["test_accuracy"], THREE_EPOCHS_THRESHOLD)

            for st, spec in zip(statuses, specs):
                assert {k: st["settings"][k] for k in HOST_SETTINGS} == HOST_SETTINGS
                assert st["settings"]["chunk_size"] == 65536  # the host's dataset's chunks
                assert {k: spec["settings"][k] for k in ("steps_per_function", "sync_every", "merge")} == {
                    "steps_per_function": 20, "sync_every": 10, "merge": JobConfig().merge}
            # the host's chain route: node 2 fetched from node 1 (binomial would say node 0)
            last = next(st for st in statuses if st["group"]["index"] == 2)
            second = next(w for w, st in zip(crowd.workers, statuses) if st is last)
            sources = {e["source"] for e in rec.of(second.name, "replication") if e.get("source") is not None}
            assert sources == {1}, sources
            for w in crowd.workers:
                await rec.wait(w.name, lambda e: e["event"] == "result", 60)
        finally:
            await rec.close()
    finally:
        crowd.close()
    assert not job_processes(crowd.root)
