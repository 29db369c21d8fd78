"""The attacker's tools and the home router work (root only): against a bare, exposed TF
server the outsider's scan finds its port and the TF recipe reads and writes files — the
proof that the private-network test can fail — and a NAT'd host can dial out but not be
dialled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crowdd.testing.netns import NetnsLab, NetnsUnavailable
from crowdd.testing.outsider import tf_attack

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
]


@pytest.fixture
def lab() -> NetnsLab:
    lab = NetnsLab(3, base=(10, 95))
    try:
        lab.setup()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    yield lab  # type: ignore[misc]
    lab.close()


def _wait_listening(lab: NetnsLab, index: int, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.run(index, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on {port} in host {index}")


def test_the_outsider_runs_ops_on_an_exposed_tf_server(lab: NetnsLab, tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_text("volunteer's secret\n")
    out = tmp_path / "written-by-outsider"
    # a bare TF server, as TF ships it (crowdd's own forbids itself every write)
    serve = ("import tensorflow as tf; tf.distribute.Server(tf.train.ClusterSpec({'worker': ['0.0.0.0:2222']}), "
             "job_name='worker', task_index=0, protocol='grpc').join()")
    lab.popen(0, [sys.executable, "-c", serve], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_listening(lab, 0, 2222)
    scan = lab.run(1, [sys.executable, "-m", "crowdd.testing.outsider", "scan", lab.hosts[0].ip], timeout=120)
    assert 2222 in json.loads(scan.stdout)[lab.hosts[0].ip]
    attack = tf_attack(f"{lab.hosts[0].ip}:2222", str(canary), str(out), argv_prefix=lab.argv(1, [])[:4])
    assert attack.read and attack.wrote, attack
    assert out.read_text() == "written by an outsider"


def test_home_router_lets_lan_hosts_out_and_nobody_in(lab: NetnsLab) -> None:
    if subprocess.run(["which", "nft"], capture_output=True).returncode != 0:
        pytest.skip("nft not found (install nftables)")
    (lan,) = lab.add_home_router(2, 1)
    listen = "import socket,sys; s=socket.create_server(('0.0.0.0', 4000)); print('up', flush=True); s.accept(); print('got')"
    server = lab.popen(0, [sys.executable, "-c", listen], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "up"
    dial = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); print('ok')"
    # out: the LAN host reaches the internet host (masqueraded as the router)
    assert lab.run(lan.index, [sys.executable, "-c", dial, lab.hosts[0].ip, "4000"]).stdout.strip() == "ok"
    # in: a server on the LAN host is not reachable from the internet, at the router's address or its own
    lab.popen(lan.index, [sys.executable, "-c", listen.replace("4000", "4001")], stdout=subprocess.DEVNULL)
    _wait_listening(lab, lan.index, 4001)
    for target in (lab.hosts[2].ip, lan.ip):
        res = lab.run(1, [sys.executable, "-c", dial, target, "4001"], check=False)
        assert res.returncode != 0, f"{target}:4001 answered from the internet"
