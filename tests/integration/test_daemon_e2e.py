"""End to end on loopback: a matchmaker, a host and 2 worker daemons (real processes) go
through every state and train a model on scikit-learn's digits."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from crowdd.client.control import ControlClient
from crowdd.data.datasets import load_digits
from crowdd.cli.demo import Crowd, Node
from crowdd.testing.bounds import at_least

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# digits, full runs of these tests: 0.91-0.98 (clean-clone runs, read in issue 30); the project's bar
ACCURACY_THRESHOLD = 0.8
TEST_CONFIG = "[replication]\nstall_timeout = 5.0\n"


def digits_npz(path: Path) -> Path:
    a = load_digits()
    np.savez(path, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test, y_test=a.y_test)
    return path


class Recorder:
    """Every event each node's control socket streams, from the start."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.events: dict[str, list[dict[str, Any]]] = {n.name: [] for n in nodes}
        self.tasks: list[asyncio.Task[None]] = []

    async def _listen(self, node: Node) -> None:
        async for ev in ControlClient(node.socket).subscribe():
            self.events[node.name].append(ev)

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._listen(n)) for n in self.nodes]
        await asyncio.sleep(0.3)  # subscriptions open (the first event is the full status)
        for name, evs in self.events.items():
            assert evs and evs[0]["event"] == "status", name

    def states(self, name: str) -> list[str]:
        return [e["state"] for e in self.events[name] if e["event"] == "state"]

    def of(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events[name] if e["event"] == kind]

    async def wait(self, name: str, pred: Any, timeout: float, *, after: int = 0) -> dict[str, Any]:
        """The first event of ``name`` (from index ``after`` on) that satisfies ``pred``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = after
        while True:
            evs = self.events[name]
            for ev in evs[seen:]:
                if pred(ev):
                    return ev
            seen = len(evs)
            if loop.time() > deadline:
                raise AssertionError(f"{name}: no such event within {timeout} s; states {self.states(name)}")
            await asyncio.sleep(0.05)

    async def host_result(self, host: Node, timeout: float) -> dict[str, Any]:
        """The host's result event; fails fast (with the host's error) if it ends without one."""
        ev = await self.wait(host.name, lambda e: e["event"] == "result"
                             or (e["event"] == "state" and e["state"] in ("off", "standby")), timeout)
        if ev["event"] != "result":
            async with ControlClient(host.socket) as c:
                st = await c.status()
            raise AssertionError(f"the host ended without a result: {st['error']}")
        return ev

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def job_processes(root: Path) -> list[psutil.Process]:
    """crowdd.job processes (and their TF servers) belonging to this crowd."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(root) in cmd and "crowdd.job" in cmd:
            out.append(p)
    return out


async def donate_all(nodes: list[Node]) -> None:
    for n in nodes:
        async with ControlClient(n.socket) as c:
            assert (await c.donate(True))["donating"] is True


async def host_job(node: Node, data: Path, job: dict[str, Any]) -> None:
    async with ControlClient(node.socket) as c:
        assert (await c.host(str(data), job))["type"] == "ok"


@pytest.fixture
async def crowd(tmp_path: Path) -> AsyncIterator[Crowd]:
    c = Crowd(tmp_path / "crowd", 2, extra_config=TEST_CONFIG)
    try:
        c.start()
        await c.wait_up()
        yield c
    finally:
        c.close()
        assert not job_processes(c.root), "a job outlived the test"


async def test_every_state_and_a_trained_model(crowd: Crowd, tmp_path: Path) -> None:
    data = digits_npz(tmp_path / "digits.npz")
    rec = Recorder(crowd.nodes)
    await rec.start()
    try:
        await donate_all(crowd.workers)
        await host_job(crowd.host, data,
                       {"workers": 2, "min_workers": 2, "epochs": 10, "learning_rate": 0.1, "sharding": "full"})
        result = await rec.host_result(crowd.host, 240)
        for w in crowd.workers:
            await rec.wait(w.name, lambda e: e["event"] == "result", 30)
            await rec.wait(w.name, lambda e: e["event"] == "state" and e["previous"] == "finished", 30)
        await rec.wait("host", lambda e: e["event"] == "state" and e["previous"] == "finished", 30)

        # 0.9081 in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(result["test_accuracy"], ACCURACY_THRESHOLD)
        model = Path(result["model_path"])
        assert model.is_file() and model.is_relative_to(crowd.host.root / "state")

        cycle = ["registering", "waiting", "replicating", "training", "finished"]
        assert rec.states("host") == cycle + ["off"]
        for w in crowd.workers:
            seq = rec.states(w.name)
            assert seq[: len(cycle) + 2] == ["standby", *cycle, "standby"], seq
            # every transition event names the state it left
            evs = rec.of(w.name, "state")
            assert all(a["state"] == b["previous"] for a, b in itertools.pairwise(evs))
            # replication progress ends with the whole file; the host's training is fanned out
            rep = rec.of(w.name, "replication")  # a worker reports its own transfer
            assert rep and rep[-1]["done"] == rep[-1]["total"] > 0
            assert rec.of(w.name, "eval"), "the host's eval events reach the workers"
            members = rec.of(w.name, "members")[-1]["members"]
            assert [m["index"] for m in members] == [0, 1, 2]
            assert rec.of(w.name, "result")[-1]["test_accuracy"] == result["test_accuracy"]
        host_rep = rec.of("host", "replication")
        assert {e["index"] for e in host_rep} >= {1, 2}

        # `crowdd status --json` against the real daemon
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crowdd", "status", "--json", "--root", str(crowd.host.root),
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        st = json.loads(stdout)
        assert st["state"] == "off" and st["result"]["test_accuracy"] == result["test_accuracy"]
        assert st["dataset"]["name"] == "digits" and st["error"] is None

        # `crowdd model export`: the model and its card, with the members the host daemon added
        dest = tmp_path / "export"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crowdd", "model", "export", str(dest), "--root", str(crowd.host.root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr
        assert (dest / "model.keras").is_file() and "keras.models.load_model" in stdout.decode()
        card = json.loads((dest / "model.card.json").read_text())
        assert [m["index"] for m in card["members"]] == [0, 1, 2] and all(m["trained"] for m in card["members"])
        assert card["test_accuracy"] == result["test_accuracy"] and len(card["evaluations"]) == 10

        # the model was hashed when its job ended: a file changed since is refused, not exported
        model = Path(st["result"]["model_path"])
        assert st["result"]["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
        model.write_bytes(model.read_bytes() + b"planted")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crowdd", "model", "export", str(tmp_path / "export2"), "--root", str(crowd.host.root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1 and "is not the model training ended with" in stderr.decode(), stderr
        assert not (tmp_path / "export2" / "model.keras").exists()
    finally:
        await rec.close()
    # the workers' job directories are cleaned up; no job process is left
    for w in crowd.workers:
        assert not list((w.root / "state" / "jobs").glob("*/spec.json"))
    for _ in range(50):
        if not job_processes(crowd.root):
            break
        await asyncio.sleep(0.2)
    assert not job_processes(crowd.root)


async def test_stop_on_a_host_mid_training_keeps_the_model_so_far(crowd: Crowd, tmp_path: Path) -> None:
    data = digits_npz(tmp_path / "digits.npz")
    rec = Recorder(crowd.nodes)
    await rec.start()
    try:
        await donate_all(crowd.workers)
        await host_job(crowd.host, data,
                       {"workers": 2, "min_workers": 2, "epochs": 5000, "learning_rate": 0.1, "sharding": "full"})
        first = await rec.wait("host", lambda e: e["event"] == "eval", 240)  # an epoch done; thousands to go
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crowdd", "stop", "--root", str(crowd.host.root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr
        assert "the whole group's training ends now" in stdout.decode() and "model trained so far" in stdout.decode()
        result = await rec.host_result(crowd.host, 120)
        # the model kept is the one trained so far: no worse than at its first evaluation (the
        # noise between two evaluations of one run on digits' 360 test images: a few points)
        # 0.7939 against a first evaluation of 0.5237 in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(result["test_accuracy"], first["test_accuracy"] - 0.05, "stopped run vs its first evaluation")
        assert Path(result["model_path"]).is_file()
        card = json.loads(Path(result["model_path"]).with_name("model.card.json").read_text())
        assert card["stopped_early"] is True and card["steps"] < card["total_steps"]
        assert Path(card["checkpoint"]).is_file()
        logs = [e["message"] for e in rec.of("host", "log")]
        assert any(m.startswith("stopped by the user at step ") and "kept the checkpoint" in m for m in logs), logs
        for w in crowd.workers:  # every member ends cleanly, with the host's result
            ev = await rec.wait(w.name, lambda e: e["event"] == "result", 30)
            assert ev["test_accuracy"] == result["test_accuracy"]
    finally:
        await rec.close()
    for _ in range(50):
        if not job_processes(crowd.root):
            break
        await asyncio.sleep(0.2)
    assert not job_processes(crowd.root)
