"""crowdd.route: the binomial plan and its properties, chain and star, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crowdd.route import ROUTES, Plan, RouteError, binomial_sends, node_plan, steps

sizes = st.integers(min_value=1, max_value=300)


def test_issue_examples_n8() -> None:
    assert binomial_sends(8) == [
        [(0, 1)],
        [(0, 2), (1, 3)],
        [(0, 4), (1, 5), (2, 6), (3, 7)],
    ]
    assert node_plan(8, 0) == Plan(None, (1, 2, 4))
    assert node_plan(8, 1) == Plan(0, (3, 5))
    assert node_plan(8, 2) == Plan(0, (6,))
    assert node_plan(8, 3) == Plan(1, (7,))
    assert node_plan(8, 5) == Plan(1, ())
    assert node_plan(8, 7) == Plan(3, ())
    assert steps(8) == 3


@pytest.mark.parametrize(("n", "expected"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5)])
def test_steps(n: int, expected: int) -> None:
    assert steps(n) == expected
    assert len(binomial_sends(n)) == expected


def test_single_node() -> None:
    for route in ROUTES:
        assert node_plan(1, 0, route) == Plan(None, ())
    assert binomial_sends(1) == []


@given(sizes)
def test_binomial_everyone_receives_once_from_a_holder(n: int) -> None:
    holders = {0}
    received: dict[int, int] = {}
    for sends in binomial_sends(n):
        new = set()
        for src, dst in sends:
            assert src in holders, f"step sends from {src}, which does not hold the data yet"
            assert dst not in received and dst != 0
            received[dst] = src
            new.add(dst)
        # a node cannot both receive and send in the same step
        assert not new & {src for src, _ in sends}
        holders |= new
    assert set(received) == set(range(1, n))
    assert holders == set(range(n))


@given(sizes)
def test_node_plan_matches_binomial_sends(n: int) -> None:
    schedule = binomial_sends(n)
    step_of = {dst: s for s, sends in enumerate(schedule) for _, dst in sends}
    for i in range(n):
        plan = node_plan(n, i)
        if i == 0:
            assert plan.source is None
        else:
            assert plan.source is not None
            assert (plan.source, i) in schedule[step_of[i]]
        expected = [dst for sends in schedule for src, dst in sends if src == i]
        assert list(plan.targets) == expected, "targets in step order"
        # a node sends only after it has received
        if i:
            assert all(step_of[t] > step_of[i] for t in plan.targets)
        # targets are sorted by step, hence increasing
        assert list(plan.targets) == sorted(plan.targets)


@given(sizes)
def test_plans_agree_with_each_other(n: int) -> None:
    for route in ROUTES:
        plans = [node_plan(n, i, route) for i in range(n)]
        edges = {(p.source, i) for i, p in enumerate(plans) if p.source is not None}
        sent = {(i, t) for i, p in enumerate(plans) for t in p.targets}
        assert edges == sent, route
        # every node except the host has exactly one source, and all data starts at the host
        assert plans[0].source is None
        for i in range(1, n):
            hops, j = 0, i
            while j != 0:
                src = plans[j].source
                assert src is not None
                j = src
                hops += 1
                assert hops <= n
        assert len(sent) == n - 1


def test_chain_and_star() -> None:
    assert [node_plan(4, i, "chain") for i in range(4)] == [
        Plan(None, (1,)),
        Plan(0, (2,)),
        Plan(1, (3,)),
        Plan(2, ()),
    ]
    assert node_plan(5, 0, "star") == Plan(None, (1, 2, 3, 4))
    assert [node_plan(5, i, "star") for i in range(1, 5)] == [Plan(0, ())] * 4


@given(st.integers(min_value=2, max_value=300), st.data())
def test_chain_property(n: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    plan = node_plan(n, i, "chain")
    assert plan.source == (i - 1 if i else None)
    assert plan.targets == ((i + 1,) if i + 1 < n else ())


@pytest.mark.parametrize(
    ("n", "i", "pattern"),
    [
        (0, 0, "at least 1 node"),
        (-3, 0, "at least 1 node"),
        (8, 8, "node index 8 out of range for 8 nodes"),
        (8, -1, "node index -1 out of range"),
        (2.5, 0, "group size must be an integer"),
        (True, 0, "group size must be an integer"),
        (8, "1", "node index must be an integer"),
        (8, 1.0, "node index must be an integer"),
    ],
)
def test_bad_n_or_i(n: object, i: object, pattern: str) -> None:
    with pytest.raises(RouteError, match=pattern):
        node_plan(n, i)  # type: ignore[arg-type]


def test_bad_n_for_steps_and_sends() -> None:
    with pytest.raises(RouteError):
        steps(0)
    with pytest.raises(RouteError):
        binomial_sends(-1)


def test_unknown_route() -> None:
    with pytest.raises(RouteError, match="unknown route 'ring'"):
        node_plan(4, 1, "ring")
    assert issubclass(RouteError, ValueError)


# --------------------------------------------------------------------------- NAT'd members


@pytest.mark.parametrize("route", ["binomial", "chain", "star"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_unreachable_members_are_leaves_fed_by_reachable_holders(route: str, n: int) -> None:
    import random

    rng = random.Random(n)
    for _ in range(20):
        reachable = [True] + [rng.random() < 0.5 for _ in range(n - 1)]
        plans = [node_plan(n, i, route, reachable) for i in range(n)]
        for i, p in enumerate(plans):
            if not reachable[i]:
                assert p.targets == () and p.source is not None and reachable[p.source]
            for t in p.targets:  # whoever sends to t is t's source, exactly once
                assert plans[t].source == i
            if p.source is not None:
                assert reachable[p.source] and i in plans[p.source].targets
        # everyone but the host has a source, and following sources always ends at the host
        for i in range(1, n):
            seen, j = set(), i
            while j != 0:
                assert j not in seen
                seen.add(j)
                j = plans[j].source  # type: ignore[assignment]


def test_everyone_reachable_is_the_plain_route() -> None:
    for route in ("binomial", "chain", "star"):
        for n in (1, 4, 9):
            assert [node_plan(n, i, route, [True] * n) for i in range(n)] == [node_plan(n, i, route) for i in range(n)]


def test_reachability_must_cover_the_group_and_include_the_host() -> None:
    with pytest.raises(RouteError, match="entries"):
        node_plan(3, 1, "binomial", [True, False])
    with pytest.raises(RouteError, match="host"):
        node_plan(3, 1, "binomial", [False, True, True])


def test_default_route_is_the_fastest_measured_and_chunks_stay_few() -> None:
    from crowdd.config import ReplicationConfig
    from crowdd.hyperparams import GroupSettings
    from crowdd.route import DEFAULT_CHUNK, DEFAULT_ROUTE, MAX_CHUNKS, chunk_for

    assert DEFAULT_ROUTE == "chain"
    assert GroupSettings().route == ReplicationConfig().route == DEFAULT_ROUTE
    assert GroupSettings().chunk_size == ReplicationConfig().chunk_size == DEFAULT_CHUNK
    assert chunk_for(55 << 20) == DEFAULT_CHUNK
    big = chunk_for(10 << 30)
    assert big * MAX_CHUNKS >= 10 << 30 and big // 2 * MAX_CHUNKS < 10 << 30
    # NAT'd members stay leaves on the default route
    assert node_plan(4, 1, DEFAULT_ROUTE, [True, False, True, True]) == Plan(0, ())
