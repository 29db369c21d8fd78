"""Replication routes: who sends the dataset to whom. Pure functions of (n, i).

Node 0 is the host and holds the data at the start. Every node computes its own plan from
the group size alone, so no coordinator is needed after matching.

- ``binomial``: at step s (1-based) every node i < 2^(s-1) sends to i + 2^(s-1) when that
  node exists; ceil(log2 n) steps.
- ``chain``: 0 → 1 → 2 → … (pipelined, cut-through).
- ``star``: the host sends to everyone (the single file server baseline).

:data:`DEFAULT_ROUTE` is ``chain``: the fastest measured (``benchmarks/replication.py``, 16
nodes, 64 MiB at 100 Mbit/s: chain 1.08x S/B at 256 KiB chunks, where binomial takes
ceil(log2 N) transfers, 4.2x S/B). A cut-through chain moves the whole file once per link in
parallel; its cost over S/B is one chunk's store-and-forward time per hop, which is why the
default chunk is 256 KiB (:data:`DEFAULT_CHUNK`). Members that cannot accept connections are
leaves on every route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROUTES = ("binomial", "chain", "star")
#: the group's route unless the host sets ``[replication] route``: the fastest measured.
DEFAULT_ROUTE = "chain"
#: the default chunk (bytes): a chain pays one chunk's store-and-forward time per hop.
DEFAULT_CHUNK = 256 << 10
#: a dataset is cut into at most this many chunks (its manifest must fit one frame).
MAX_CHUNKS = 4096
#: the largest chunk a member accepts: each receiver holds a chunk in memory, so a manifest
#: from the group must not make it allocate more (a host's dataset is at most
#: MAX_CHUNK * MAX_CHUNKS = 64 GiB).
MAX_CHUNK = 16 << 20


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


def node_plan(n: int, i: int, route: str = "binomial", reachable: Sequence[bool] | None = None) -> Plan:
    """Where node i gets the data from and whom it sends it to, in order.

    ``reachable[j]`` False (the matchmaker could not connect back to node j: it is behind a
    NAT) makes j a leaf: the route runs over the reachable nodes only (the host first), and
    the unreachable ones fetch from a reachable holder each, round robin, after that
    holder's own route targets. An unreachable node is never anyone's source. Everyone
    reachable (or None) gives the plain route.

    >>> node_plan(8, 1)
    Plan(source=0, targets=(3, 5))
    >>> node_plan(4, 1, "binomial", [True, False, True, True])
    Plan(source=0, targets=())
    """
    _check(n, i)
    if reachable is not None and not all(reachable):
        return _with_leaves(n, i, route, list(reachable))
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


def _with_leaves(n: int, i: int, route: str, reachable: list[bool]) -> Plan:
    if len(reachable) != n:
        raise RouteError(f"reachable has {len(reachable)} entries for {n} nodes")
    if not reachable[0]:
        raise RouteError("the host (node 0) must be reachable")
    held = [j for j in range(n) if reachable[j]]
    leaves = [j for j in range(n) if not reachable[j]]
    holder_of = {u: held[k % len(held)] for k, u in enumerate(leaves)}
    if not reachable[i]:
        return Plan(holder_of[i], ())
    sub = node_plan(len(held), held.index(i), route)
    own = tuple(held[t] for t in sub.targets)
    extra = tuple(u for u in leaves if holder_of[u] == i)
    return Plan(None if sub.source is None else held[sub.source], own + extra)


def chunk_for(size: int, chunk: int = DEFAULT_CHUNK) -> int:
    """The chunk size for a file of ``size`` bytes: ``chunk``, doubled until the file has at
    most :data:`MAX_CHUNKS` chunks (the manifest lists every chunk's sha256 and travels as one
    frame)."""
    while chunk * MAX_CHUNKS < size:
        chunk *= 2
    return chunk


def _check(n: int, i: int) -> None:
    for what, v in (("group size", n), ("node index", i)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise RouteError(f"{what} must be an integer, got {v!r}")
    if n < 1:
        raise RouteError(f"a group has at least 1 node, got {n}")
    if not 0 <= i < n:
        raise RouteError(f"node index {i} out of range for {n} nodes")
