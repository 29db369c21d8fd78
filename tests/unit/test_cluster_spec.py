"""host.cluster_spec: the TF cluster the host hands to every member of its group."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crowdd.hyperparams import GroupSettings, Job
from crowdd.node.host import cluster_spec
from crowdd.node.ports import Reservation
from crowdd.node.session import members_from_plan
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan


def plan() -> SessionPlan:
    members = (PlanMember(0, "host", "h", "10.0.0.1", MemberPorts(1, 2, (3, 4))),
               PlanMember(1, "worker", "w1", "10.0.0.2", MemberPorts(5, 6, (7001,))),
               PlanMember(2, "worker", "w2", "10.0.0.3", MemberPorts(8, 9, (7002,))),
               PlanMember(3, "worker", "w3", "10.0.0.4", MemberPorts(10, 11, (7003,))))
    return SessionPlan("g", "t" * 64, 0, members, Job(), DatasetRef("0" * 64, 100, "d"), GroupSettings())


@pytest.fixture
def res() -> Iterator[Reservation]:
    r = Reservation("127.0.0.1", 0, 0, 2)
    try:
        yield r
    finally:
        r.close()


def test_host_ps_and_worker_zero_use_the_reserved_tf_ports_then_live_workers_in_order(res: Reservation) -> None:
    p = plan()
    ps_port, w0_port = res.tf_ports
    assert ps_port != w0_port and ps_port > 0 and w0_port > 0
    live = members_from_plan(p)[1:]
    spec = cluster_spec(p, res, live)
    assert spec == {
        "ps": [f"10.0.0.1:{ps_port}"],
        "worker": [f"10.0.0.1:{w0_port}", "10.0.0.2:7001", "10.0.0.3:7002", "10.0.0.4:7003"],
    }


def test_only_live_workers_are_in_the_cluster_in_the_order_given(res: Reservation) -> None:
    p = plan()
    members = members_from_plan(p)
    spec = cluster_spec(p, res, [members[3], members[1]])  # w2 dropped out before training
    assert spec["worker"] == [f"10.0.0.1:{res.tf_ports[1]}", "10.0.0.4:7003", "10.0.0.2:7001"]
    assert spec["ps"] == [f"10.0.0.1:{res.tf_ports[0]}"]


def test_a_host_alone_is_its_own_ps_and_only_worker(res: Reservation) -> None:
    spec = cluster_spec(plan(), res, [])
    assert spec == {"ps": [f"10.0.0.1:{res.tf_ports[0]}"], "worker": [f"10.0.0.1:{res.tf_ports[1]}"]}


def test_the_host_address_is_the_plans_not_the_bound_one(res: Reservation) -> None:
    spec = cluster_spec(plan(), res, [])
    assert all(a.startswith("10.0.0.1:") for a in spec["ps"] + spec["worker"])
    assert not any(a.startswith("127.0.0.1") for a in spec["ps"] + spec["worker"])
