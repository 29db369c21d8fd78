"""The end-to-end session across network namespaces: the matchmaker, the host and two
workers each on a host of their own with their own IP (root only)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from crowdd.config import Paths
from crowdd.client.control import ControlClient
from crowdd.trust.identity import Identity
from crowdd.errors import Unavailable
from crowdd.data.datasets import load_digits
from crowdd.cli.demo import permissive_idle_table
from crowdd.testing.bounds import at_least

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
]

MM_PORT = 7700


def node_config(name: str, fingerprint: str) -> str:
    return (
        "[daemon]\n"
        f'name = "{name}"\n'
        f'matchmaker_fingerprint = "{fingerprint}"\n'
        'listen_host = "0.0.0.0"\n'
        "retry_min = 0.3\nretry_max = 2.0\n"
        "[job]\nnice = 10\nsteps_per_function = 20\n"
        + permissive_idle_table()
    )


def log_fd(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


async def wait_socket(path: Path, proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert proc.poll() is None, "the daemon exited early"
        try:
            async with ControlClient(path) as c:
                await c.status()
            return
        except Unavailable:
            assert loop.time() < deadline, f"no control socket at {path}"
            await asyncio.sleep(0.2)


async def test_e2e_across_namespaces(tmp_path: Path) -> None:
    from crowdd.testing.netns import NetnsLab, NetnsUnavailable

    a = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test, y_test=a.y_test)
    lab = NetnsLab(4, base=(10, 91))
    try:
        lab.setup()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    daemons: list[subprocess.Popen[Any]] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        mm_ip = lab.hosts[0].ip
        fd = log_fd(tmp_path / "mm.log")
        mm_root = tmp_path / "mm"
        fingerprint = Identity.load_or_create(Paths.under(mm_root).identity_dir, "matchmaker").fingerprint
        lab.popen(0, [sys.executable, "-m", "crowdd", "matchmaker", "--listen", f"0.0.0.0:{MM_PORT}",
                      "--root", str(mm_root)], stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        names = ["host", "worker-1", "worker-2"]
        roots = [tmp_path / n for n in names]
        for i, (name, root) in enumerate(zip(names, roots), start=1):
            root.mkdir()
            (root / "crowdd.toml").write_text(node_config(name, fingerprint))
            fd = log_fd(root / "daemon.log")
            daemons.append(lab.popen(i, [sys.executable, "-m", "crowdd", "daemon", "-v", "--root", str(root),
                                         "--matchmaker", f"{mm_ip}:{MM_PORT}"], stdout=fd, stderr=subprocess.STDOUT))
            os.close(fd)
        socks = [r / "run" / "control.sock" for r in roots]
        await asyncio.gather(*(wait_socket(s, p) for s, p in zip(socks, daemons)))

        events: dict[str, list[dict[str, Any]]] = {n: [] for n in names}

        async def listen(name: str, sock: Path) -> None:
            async for ev in ControlClient(sock).subscribe():
                events[name].append(ev)

        tasks = [asyncio.create_task(listen(n, s)) for n, s in zip(names, socks)]
        await asyncio.sleep(0.3)
        for s in socks[1:]:
            async with ControlClient(s) as c:
                await c.donate(True)
        async with ControlClient(socks[0]) as c:
            await c.host(str(data), {"workers": 2, "min_workers": 2, "epochs": 10, "learning_rate": 0.1})

        def result_of(name: str) -> dict[str, Any] | None:
            return next((e for e in events[name] if e["event"] == "result"), None)

        for _ in range(2400):
            if all(result_of(n) for n in names):
                break
            await asyncio.sleep(0.1)
        res = result_of("host")
        assert res is not None, {n: [e.get("state") for e in events[n] if e["event"] == "state"] for n in names}
        # 0.922 in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(res["test_accuracy"], 0.8)
        for n in names[1:]:  # the same accuracy; the model file is the host's, not shown as theirs
            got = result_of(n)
            assert got is not None and got["test_accuracy"] == res["test_accuracy"] and got["model_path"] is None
        # members saw each other at their own namespace addresses
        async with ControlClient(socks[1]) as c:
            st = await c.status()
        members_ev = [e for e in events["worker-1"] if e["event"] == "members"][-1]["members"]
        addresses = [m["address"] for m in members_ev]  # host first; workers in queue order
        assert addresses[0] == lab.hosts[1].ip
        assert sorted(addresses[1:]) == sorted(lab.hosts[i].ip for i in (2, 3))
        assert st["state"] in ("finished", "standby", "registering", "waiting")
        states = [e["state"] for e in events["worker-2"] if e["event"] == "state"]
        assert states[:6] == ["standby", "registering", "waiting", "replicating", "training", "finished"]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in daemons:  # a clean shutdown first: the daemons end their jobs
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in daemons:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        lab.close()
    # a job runs in its own network namespace, so the lab's teardown does not reach it: it must
    # go with its daemon (its relay and TF servers die with their parents, polling each second)
    left: list[str] = []
    for _ in range(100):
        left = [" ".join(p.info.get("cmdline") or []) for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info.get("cmdline") or [])]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert not left, left
