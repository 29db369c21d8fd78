"""SessionPlan: who is who in the group, the host's route, and what status may show of it."""

from __future__ import annotations

import json

import pytest

from crowdd.hyperparams import GroupSettings, Job
from crowdd.plan import HOST_INDEX, DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.route import node_plan

TOKEN = "s3cret-token-0123456789abcdef"


def members(n: int) -> tuple[PlanMember, ...]:
    out = [PlanMember(0, "host", "h", "10.0.0.1", MemberPorts(7001, 7002, (7003, 7004)))]
    for i in range(1, n):
        out.append(PlanMember(i, "worker", f"w{i}", f"10.0.0.{i + 1}", MemberPorts(8000 + i, 8100 + i, (8200 + i,))))
    return tuple(out)


def plan(index: int = 0, n: int = 5, route: str = "chain") -> SessionPlan:
    return SessionPlan(
        group_id="g1", token=TOKEN, index=index, members=members(n), job=Job(workers=n - 1, epochs=3),
        dataset=DatasetRef("ab" * 32, 1234, "digits"), settings=GroupSettings(route=route, sync_every=7),
    )


def test_host_me_and_is_host() -> None:
    p = plan(index=0)
    assert HOST_INDEX == 0
    assert p.size == 5
    assert p.host.name == "h" and p.host.role == "host"
    assert p.me is p.host
    assert p.is_host

    w = plan(index=3)
    assert w.host.name == "h"
    assert w.me.name == "w3" and w.me.index == 3 and w.me.address == "10.0.0.4"
    assert not w.is_host


@pytest.mark.parametrize("route", ["binomial", "chain", "star"])
def test_route_follows_the_plans_route(route: str) -> None:
    for i in range(5):
        p = plan(index=i, route=route)
        assert p.route() == node_plan(5, i, route)
        for j in range(5):
            assert p.route(j) == node_plan(5, j, route)


def test_route_differs_by_route_name() -> None:
    # a worker of a chain group fetches from its predecessor, whatever a binomial default says
    assert plan(index=3, route="chain").route().source == 2
    assert plan(index=3, route="binomial").route().source == 1
    assert plan(index=3, route="star").route().source == 0
    assert plan(index=0, route="star").route().targets == (1, 2, 3, 4)
    assert plan(index=0, route="chain").route(2).targets == (3,)


def test_summary_shows_the_plan_but_never_the_token() -> None:
    p = plan(index=2)
    s = p.summary()
    assert s["group_id"] == "g1" and s["index"] == 2 and s["size"] == 5
    assert s["job"] == p.job.to_dict()
    assert s["dataset"] == {"digest": "ab" * 32, "size": 1234, "name": "digits"}
    assert s["settings"]["route"] == "chain" and s["settings"]["sync_every"] == 7
    assert "token" not in s
    assert TOKEN not in json.dumps(s)


def test_member_to_dict() -> None:
    m = members(2)[1]
    assert m.to_dict() == {"index": 1, "role": "worker", "name": "w1", "address": "10.0.0.2",
                           "ports": {"data": 8001, "session": 8101, "tf": [8201]}, "cert": m.cert.decode(),
                           "fingerprint": m.fingerprint, "reachable": True}
