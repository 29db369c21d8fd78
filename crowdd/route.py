"""Replication routes: who sends the dataset to whom. Pure functions of (n, i).

Node 0 is the host and holds the data at the start. Every node computes its own plan from
the group size alone, so no coordinator is needed after matching.

- ``binomial``: at step s (1-based) every node i < 2^(s-1) sends to i + 2^(s-1) when that
  node exists; ceil(log2 n) steps.
- ``chain``: 0 → 1 → 2 → … (pipelined, cut-through).
- ``star``: the host sends to everyone (the single file server baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTES = ("binomial", "chain", "star")


class RouteError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    source: int | None
    targets: tuple[int, ...]


def steps(n: int) -> int:
    """Number of binomial steps for n nodes: ceil(log2 n)."""
    _check(n, 0)
    return (n - 1).bit_length()


def binomial_sends(n: int) -> list[list[tuple[int, int]]]:
    """The sends of each step: ``[[(src, dst), ...] for s in 1..steps]``."""
    out = []
    for s in range(1, steps(n) + 1):
        half = 1 << (s - 1)
        out.append([(i, i + half) for i in range(half) if i + half < n])
    return out


def node_plan(n: int, i: int, route: str = "binomial") -> Plan:
    """Where node i gets the data from and whom it sends it to, in order.

    >>> node_plan(8, 1)
    Plan(source=0, targets=(3, 5))
    """
    _check(n, i)
    if route == "binomial":
        source = None if i == 0 else i - (1 << (i.bit_length() - 1))
        targets = []
        half = 1 << i.bit_length() if i else 1
        while i + half < n:
            targets.append(i + half)
            half <<= 1
        return Plan(source, tuple(targets))
    if route == "chain":
        return Plan(None if i == 0 else i - 1, (i + 1,) if i + 1 < n else ())
    if route == "star":
        return Plan(None if i == 0 else 0, tuple(range(1, n)) if i == 0 else ())
    raise RouteError(f"unknown route {route!r} (known: {', '.join(ROUTES)})")


def _check(n: int, i: int) -> None:
    for what, v in (("group size", n), ("node index", i)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise RouteError(f"{what} must be an integer, got {v!r}")
    if n < 1:
        raise RouteError(f"a group has at least 1 node, got {n}")
    if not 0 <= i < n:
        raise RouteError(f"node index {i} out of range for {n} nodes")
