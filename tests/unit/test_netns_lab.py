"""The namespace harness refuses clearly when it cannot work, and the outsider's scan and TF
recipe behave on loopback (no root needed for these)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crowdd.testing import netns, outsider


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    lab = netns.NetnsLab(2)
    with pytest.raises(netns.NetnsUnavailable, match="need root"):
        lab.setup()
    lab.close()  # nothing was built; closing is a no-op


def test_missing_ip_tool_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "IP", "/nonexistent/ip")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    lab = netns.NetnsLab(1)
    with pytest.raises(netns.NetnsUnavailable, match="not found"):
        lab.setup()


def test_names_are_unique_per_lab_and_fit_interface_limits() -> None:
    a, b = netns.NetnsLab(300), netns.NetnsLab(300)
    assert a.prefix != b.prefix
    assert all(len(h.bridge_port) <= 15 for h in a.hosts)
    assert len({h.ip for h in a.hosts}) == 300
    assert a.hosts[0].ip == "10.77.0.1" and a.hosts[255].ip == "10.77.1.0"


def test_bad_host_count() -> None:
    with pytest.raises(ValueError, match="n_hosts"):
        netns.NetnsLab(0)


def test_home_router_without_nft_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "NFT", "/nonexistent/nft")
    lab = netns.NetnsLab(1)  # checked before anything is built, so no root is needed here
    with pytest.raises(netns.NetnsUnavailable, match="nftables"):
        lab.add_home_router(0, 2)
    assert len(lab.hosts) == 1


def _listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0))
    s.listen()
    return s


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def test_scan_reports_exactly_the_listening_ports() -> None:
    a, b = _listener(), _listener()
    with a, b:
        open_ports = sorted(s.getsockname()[1] for s in (a, b))
        closed = _closed_port()
        assert outsider.scan("127.0.0.1", [closed, *open_ports], timeout=2.0) == open_ports
        # batches smaller than the port list: every batch is scanned
        assert outsider.scan("127.0.0.1", [open_ports[0], closed, open_ports[1]], batch=1, timeout=2.0) == open_ports


def test_scan_stays_below_a_low_descriptor_limit() -> None:
    """A 1024 (here 200) descriptor limit must not make a wide scan crash with EMFILE."""
    code = (
        "import resource, socket, sys\n"
        "from crowdd.testing.outsider import scan\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))\n"
        "s = socket.create_server(('127.0.0.1', 0)); s.listen()\n"
        "port = s.getsockname()[1]\n"
        "print(port in scan('127.0.0.1', range(max(1, port - 1500), port + 1), timeout=2.0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_scan_of_a_silent_address_ends_within_its_timeout() -> None:
    started = time.monotonic()
    assert outsider.scan("192.0.2.1", range(1, 200), timeout=0.3) == []  # TEST-NET-1: nothing answers
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_tf_attack_on_a_port_that_is_not_tensorflow_runs_no_op(tmp_path: Path) -> None:
    """A silent, non-TF listener: the recipe runs no op and the attempt ends at its timeout
    (the private-network test relies on this for every crowdd port it finds)."""
    with _listener() as s:
        port = s.getsockname()[1]
        got = outsider.tf_attack(f"127.0.0.1:{port}", str(tmp_path / "canary"), str(tmp_path / "out"), timeout=20)
    assert not got.ran_an_op and got.error, got
    assert not (tmp_path / "out").exists()


BUILD_AND_HANG = """
import sys, time
from crowdd.testing.netns import NetnsLab
lab = NetnsLab(2)
lab.setup()
print(lab.prefix, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_a_lab_whose_owner_was_killed_is_swept_by_the_next_one() -> None:
    """A run killed with SIGKILL cannot close its lab; the next lab's setup deletes the dead
    owner's namespaces. The control: a lab whose owner is alive is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", BUILD_AND_HANG], stdout=subprocess.PIPE, text=True)
    assert dead.stdout is not None
    prefix = dead.stdout.readline().strip()
    names = {f"{prefix}-br", f"{prefix}-h0", f"{prefix}-h1"}
    assert names <= {p.name for p in netns.NETNS_DIR.iterdir()}
    with netns.NetnsLab(1) as alive:
        assert not netns.sweep_stale_labs()  # the owner lives: nothing of its is touched
        assert names <= {p.name for p in netns.NETNS_DIR.iterdir()}
        dead.kill()
        dead.wait()
        assert set(netns.sweep_stale_labs()) == names
        assert not names & {p.name for p in netns.NETNS_DIR.iterdir()}
        assert f"{alive.prefix}-h0" in {p.name for p in netns.NETNS_DIR.iterdir()}  # this test's own lab stays
    assert not list(netns.OWNERS.glob(f"{prefix}*"))
