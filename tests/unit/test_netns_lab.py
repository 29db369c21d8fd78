"""The namespace harness refuses clearly when it cannot work (no root needed for these)."""

from __future__ import annotations

import pytest

from crowdd.testing import netns


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
