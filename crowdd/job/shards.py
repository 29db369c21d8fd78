"""The paper's sharding modes as plain arithmetic (TF-free; :mod:`crowdd.job.data` uses it)."""

from __future__ import annotations

import math


def segments(sharding: str, num_workers: int) -> tuple[int, int]:
    """(number of segments, segments per worker) for ``num_workers`` worker servers."""
    if sharding == "full":
        return 1, 1
    if sharding == "disjoint":
        return num_workers, 1
    if sharding == "overlap":
        return num_workers + 1, 2
    raise ValueError(f"unknown sharding {sharding!r}")


def shard_bounds(sharding: str, num_workers: int, worker: int, n: int) -> tuple[int, int]:
    """[start, end) of worker ``worker``'s training records out of ``n``.

    Segments are ``n // count`` records; the last one also takes the remainder.
    """
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} out of range 0..{num_workers - 1}")
    count, span = segments(sharding, num_workers)
    if sharding == "full":
        return 0, n
    seg = n // count
    end = n if worker + span >= count else (worker + span) * seg
    return worker * seg, end


def steps_per_epoch(sharding: str, num_workers: int, worker: int, n: int, batch: int) -> int:
    start, end = shard_bounds(sharding, num_workers, worker, n)
    return math.ceil((end - start) / batch)


def total_steps(sharding: str, num_workers: int, n: int, batch: int, epochs: int) -> int:
    """The run's length: every worker's ``epochs`` passes over its shard."""
    return epochs * sum(steps_per_epoch(sharding, num_workers, j, n, batch) for j in range(num_workers))


__all__ = ["segments", "shard_bounds", "steps_per_epoch", "total_steps"]
