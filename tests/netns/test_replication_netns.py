"""Replication across 8 hosts in network namespaces on a bridge, links shaped with tc tbf."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd.data.manifest import Manifest
from crowdd.route import node_plan
from crowdd.testing.netns import NetnsLab, Shape, require_root
from crowdd.testing.replication_cluster import NodeCluster

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="network namespaces need root (ip netns add)"),
]

N = 8


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    with NetnsLab(N, shape=Shape("80mbit")) as lab:
        yield lab


def test_hosts_have_their_own_addresses_and_shaped_links(lab: NetnsLab) -> None:
    assert len({h.ip for h in lab.hosts}) == N
    out = lab.run(3, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"{lab.hosts[3].ip}/16" in out
    qdisc = lab.run(3, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in qdisc and "80Mbit" in qdisc
    # host 0 reaches host 7 by its own address across the bridge
    listener = lab.popen(7, [sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    lab.run(0, [sys.executable, "-c", f"import socket; socket.create_connection(('{lab.hosts[7].ip}', 9999), 5)"])
    assert listener.wait(timeout=10) == 0


LISTEN = """
import socket
s = socket.socket()
s.bind(("0.0.0.0", 9999))
s.listen()
print("ready", flush=True)
s.settimeout(10)
s.accept()
"""


def test_eight_hosts_replicate_over_shaped_links(lab: NetnsLab, tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(3 << 20))
    manifest = Manifest.build(src, chunk_size=256 << 10)
    mpath = tmp_path / "manifest.json"
    mpath.write_bytes(manifest.to_json())
    with NodeCluster(tmp_path / "run", n=N, token=secrets.token_hex(16), manifest_path=mpath,
                     route="binomial", stall_timeout=5.0, launch=lab.popen,
                     address=lambda i: lab.hosts[i].ip, extra={0: {"serve_file": str(src)}}) as cluster:
        cluster.start(timeout=60)
        t0 = cluster.go()
        done = cluster.wait_done(timeout=120)
        for i, ev in done.items():
            assert ev["event"] == "done", (i, ev, cluster.log(i))
            assert hashlib.sha256(Path(ev["path"]).read_bytes()).hexdigest() == manifest.sha256
            if i:
                assert ev["sources"] == [node_plan(N, i).source]
        # 3 binomial steps of 3 MiB at 80 Mbit/s take ~0.95 s (unshaped: ~0.05 s): the links are shaped
        assert max(ev["t"] for ev in done.values()) - t0 > 0.6


def test_lab_cleans_up_namespaces_and_processes(tmp_path: Path) -> None:
    lab = NetnsLab(2)
    lab.setup()
    proc = lab.popen(1, ["sleep", "60"])
    names = [h.netns for h in lab.hosts] + [lab.bridge_ns]
    lab.close()
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)


def test_bad_lab_arguments() -> None:
    with pytest.raises(ValueError, match="n_hosts"):
        NetnsLab(0)
    require_root()  # we are root here; the non-root path is covered in tests/unit/test_netns_lab.py


def test_failed_setup_leaves_nothing(tmp_path: Path) -> None:
    lab = NetnsLab(2, shape=Shape("not-a-rate"))
    with pytest.raises(Exception, match="tc|rate|failed"):
        lab.setup()
    listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert lab.prefix not in listed
