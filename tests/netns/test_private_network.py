"""The group's private network under attack (root only).

An internet bridge with a matchmaker, a host, a public worker, an outsider and a home router;
two workers behind the router (nftables masquerade, unsolicited inbound dropped). While the
group trains, the outsider connect-scans every TCP port of every member (the router's address
for the NAT'd ones) and tries the TensorFlow recipe on each open port: no attempt may run an
op. The NAT'd workers train (their TF tasks' progress reaches the host); the run is then stopped
(the model kept) and ends with a result on every member.
A capture on the internet bridge holds no plaintext crowdd frame and no dataset bytes.

It fails on a daemon whose TF servers face the network. To see that, run it against the tree
from before the private network (3d2a98b), with this file and today's harness:

    mkdir /tmp/old && git archive 3d2a98b | tar -x -C /tmp/old
    cp crowdd/testing/{netns,outsider}.py /tmp/old/crowdd/testing/
    cp tests/netns/test_private_network.py /tmp/old/tests/netns/
    cd /tmp/old && PYTHONPATH=/tmp/old /path/to/.venv/bin/python -m pytest tests/netns/test_private_network.py

→ the outsider reads the canary and writes a file through the host's PS and worker-0 ports
and the public worker's port (``read=True, wrote=True``); the NAT'd workers' TF servers are
unreachable, so training never starts (the host job gives up at its start timeout); the
capture holds every plaintext frame and the dataset bytes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from test_daemon_netns import log_fd, wait_socket

from crowdd.config import Paths
from crowdd.client.control import ControlClient
from crowdd.data.datasets import load_digits
from crowdd.cli.demo import permissive_idle_table
from crowdd.trust.identity import Identity
from crowdd.testing.netns import NetnsLab, NetnsUnavailable
from crowdd.testing.outsider import tf_attack

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
]

MM_PORT = 7700
ATTACK_AFTER = 120.0  # s after the host starts training (its TF start timeout is 300 s)
MM, HOST, PUBLIC, OUTSIDER, ROUTER = range(5)


def node_config(name: str, fingerprint: str) -> str:
    return (
        "[daemon]\n"
        f'name = "{name}"\n'
        f'matchmaker_fingerprint = "{fingerprint}"\n'
        "retry_min = 0.3\nretry_max = 2.0\n"
        "[job]\nnice = 10\nsteps_per_function = 10\nsync_every = 5\n"
        + permissive_idle_table()
    )


async def test_outsider_reaches_no_tensorflow_and_natd_workers_train(tmp_path: Path) -> None:
    for tool in ("nft", "tcpdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (scripts/setup installs it as root on Debian)")
    a = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=a.x_train, y_train=a.y_train, x_test=a.x_test, y_test=a.y_test)
    canary = tmp_path / "canary.txt"
    canary.write_text("a volunteer's private file\n")
    lab = NetnsLab(5, base=(10, 97))
    try:
        lab.setup()
        lan = lab.add_home_router(ROUTER, 2)
    except NetnsUnavailable as exc:
        lab.close()
        pytest.skip(str(exc))
    daemons: list[subprocess.Popen[Any]] = []
    tasks: list[asyncio.Task[None]] = []
    capture = tmp_path / "internet.pcap"
    try:
        tcpdump = subprocess.Popen(["ip", "netns", "exec", lab.bridge_ns, "tcpdump", "-i", "br0", "-U", "-s", "0",  # noqa: ASYNC220
                                    "-w", str(capture)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mm_root = tmp_path / "mm"
        fingerprint = Identity.load_or_create(Paths.under(mm_root).identity_dir, "matchmaker").fingerprint
        fd = log_fd(tmp_path / "mm.log")
        lab.popen(MM, [sys.executable, "-m", "crowdd", "matchmaker", "--listen", f"0.0.0.0:{MM_PORT}",
                       "--root", str(mm_root)], stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        where = {"host": HOST, "public": PUBLIC, "natd-1": lan[0].index, "natd-2": lan[1].index}
        names = list(where)
        roots = {n: tmp_path / n for n in names}
        for name, index in where.items():
            root = roots[name]
            root.mkdir()
            (root / "crowdd.toml").write_text(node_config(name, fingerprint))
            fd = log_fd(root / "daemon.log")
            daemons.append(lab.popen(index, [sys.executable, "-m", "crowdd", "daemon", "-v", "--root", str(root),
                                             "--matchmaker", f"{lab.hosts[MM].ip}:{MM_PORT}"],
                                     stdout=fd, stderr=subprocess.STDOUT))
            os.close(fd)
        socks = {n: roots[n] / "run" / "control.sock" for n in names}
        await asyncio.gather(*(wait_socket(socks[n], p) for n, p in zip(names, daemons)))
        events: dict[str, list[dict[str, Any]]] = {n: [] for n in names}

        async def listen(name: str) -> None:
            async for ev in ControlClient(socks[name]).subscribe():
                events[name].append(ev)

        tasks = [asyncio.create_task(listen(n)) for n in names]
        await asyncio.sleep(0.3)
        for n in names[1:]:
            async with ControlClient(socks[n]) as c:
                await c.donate(True)
        async with ControlClient(socks["host"]) as c:
            await c.host(str(data), {"workers": 3, "min_workers": 3, "epochs": 80, "learning_rate": 0.1,
                                     "batch_size": 32, "sharding": "full"})

        def first(name: str, kind: str) -> dict[str, Any] | None:
            return next((e for e in events[name] if e["event"] == kind), None)

        def host_states() -> list[str]:
            return [e["state"] for e in events["host"] if e["event"] == "state"]

        def host_gave_up() -> bool:  # left training without a result: the session failed
            states = host_states()
            return "training" in states and states[-1] not in ("training", "finished") and not first("host", "result")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 240
        while "training" not in host_states() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert "training" in host_states(), ("the group never trained", {n: [e.get("state") for e in events[n]
                                                                            if e["event"] == "state"] for n in names})
        # Attack once training runs, but no later than ATTACK_AFTER s into it: a daemon that
        # cannot train (today, a NAT'd worker's TF server is unreachable) still has its TF
        # servers up then, and the attack must reach them before the host's start timeout.
        deadline = loop.time() + ATTACK_AFTER
        while first("host", "progress") is None and not first("host", "result") and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert first("host", "result") is None, "training ended before the attack (raise epochs)"

        # ---- the outsider, during training: every port of every member's internet address
        targets = [lab.hosts[HOST].ip, lab.hosts[PUBLIC].ip, lab.hosts[ROUTER].ip]
        scan = await asyncio.to_thread(lab.run, OUTSIDER, [sys.executable, "-m", "crowdd.testing.outsider", "scan",
                                                           *targets], timeout=300)
        open_ports: dict[str, list[int]] = json.loads(scan.stdout)
        assert first("host", "result") is None, "training ended during the scan (raise epochs)"
        attempts = [f"{ip}:{port}" for ip, ports in open_ports.items() for port in ports]
        assert attempts, f"the scan found no open port at all ({open_ports}): it cannot have looked"
        prefix = lab.argv(OUTSIDER, [])[:4]
        # all at once (each in its own process): a non-TF port holds its attempt until the timeout
        with ThreadPoolExecutor(max_workers=min(8, len(attempts))) as pool:
            attacks = await asyncio.gather(*(loop.run_in_executor(pool, functools.partial(
                tf_attack, t, str(canary), str(tmp_path / f"pwned-{i}"), argv_prefix=prefix, timeout=90))
                for i, t in enumerate(attempts)))
        assert not [x for x in attacks if x.ran_an_op], attacks
        assert not list(tmp_path.glob("pwned-*"))
        # the NAT'd workers have no open port at all on the internet
        assert open_ports[lab.hosts[ROUTER].ip] == []

        # ---- the NAT'd workers' TF tasks do real work; then the run is stopped (the model kept)
        # and ends with a result everywhere
        def natd_progress() -> bool:
            members = [e for e in events["host"] if e["event"] == "members"]
            natd = {m["index"] for m in members[-1]["members"] if m["name"].startswith("natd")} if members else set()
            seen = {e.get("worker") for e in events["host"] if e["event"] == "progress"}
            return len(natd) == 2 and natd <= seen

        deadline = loop.time() + 300
        while not natd_progress() and not first("host", "result") and not host_gave_up() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if not first("host", "result"):
            async with ControlClient(socks["host"]) as c:
                await c.stop()
        deadline = loop.time() + 120
        while not all(first(n, "result") for n in names) and not host_gave_up() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        res = first("host", "result")
        assert res is not None and res.get("test_accuracy") is not None, [e for e in events["host"] if e["event"] == "log"][-5:]
        members = [e for e in events["host"] if e["event"] == "members"][-1]["members"]
        natd = {m["index"] for m in members if m["name"].startswith("natd")}
        assert len(natd) == 2 and all(m["state"] != "gone" for m in members)
        # each progress event names the TF worker task whose function it was (task j = member j here)
        workers_seen = {e.get("worker") for e in events["host"] if e["event"] == "progress"}
        assert natd <= workers_seen, (natd, workers_seen)
        mm_log = (tmp_path / "mm.log").read_text()
        for name in ("natd-1", "natd-2"):  # the matchmaker saw they are behind a NAT...
            assert f"worker '{name}' at {lab.hosts[ROUTER].ip} is not reachable" in mm_log
        assert "worker 'public'" not in mm_log  # ...and that the public worker is not
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in daemons:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in daemons:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        tcpdump.send_signal(signal.SIGINT)
        try:
            tcpdump.wait(10)
        except subprocess.TimeoutExpired:
            tcpdump.kill()
        lab.close()

    # ---- the wire: encrypted end to end
    wire = capture.read_bytes()
    dataset = next((roots["host"] / "cache").rglob("*.data")).read_bytes()
    assert len(wire) > len(dataset), "the capture missed the session (the dataset crossed the bridge 3 times)"
    for plain in (b'"proto":"crowdd/1"', b'"type":"hello"', b'"type":"group"', b'"type":"train"', b'"token"'):
        assert plain not in wire, plain
    step = max(1, len(dataset) // 50)
    samples = [dataset[i:i + 48] for i in range(step, len(dataset) - 48, step)]
    assert not [s for s in samples if s.count(0) < 40 and s in wire], "dataset bytes in clear on the wire"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info.get("cmdline") or [])]
