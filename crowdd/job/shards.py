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


#: the host holds back about this many training records to validate changes on
HOLDOUT_TARGET = 1000
#: ... and never more than one in this many
HOLDOUT_MIN_EVERY = 10


def holdout_every(train_count: int) -> int:
    """Every how many-th training record the host holds back from training (a stride, so a
    dataset sorted by class gives every class its share): about :data:`HOLDOUT_TARGET`
    records, at most one in :data:`HOLDOUT_MIN_EVERY`. 0: too few records to spare any."""
    if train_count < 5 * HOLDOUT_MIN_EVERY:
        return 0
    return max(HOLDOUT_MIN_EVERY, train_count // HOLDOUT_TARGET)


def holdout_count(train_count: int, every: int) -> int:
    """How many records :func:`holdout_every`'s stride holds back."""
    return 0 if every <= 1 else (train_count + every - 1) // every


__all__ = ["HOLDOUT_TARGET", "holdout_count", "holdout_every", "segments", "shard_bounds", "steps_per_epoch", "total_steps"]
