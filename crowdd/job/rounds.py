"""The coordinator's rounds: one for every idle trainer, on the model as it is now.

A round is ``k`` steps of the trainers' function (:func:`crowdd.job.train.make_round_fn`)
scheduled on the strategy's coordinator; it comes back as one change. The books here count
the steps done or in flight (``scheduled``): a failed, rejected or given-up round's steps go
back, so someone runs them again. The trainers' learning rate is the user's times the merge
rule's factor at this point of the run (:func:`crowdd.job.outer.lr_factor`), set as steps
are done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from crowdd.job.arrivals import Arrivals
from crowdd.job.faults import RETRYABLE, RetryBudget
from crowdd.job.params import Params
from crowdd.job.train import round_inputs


@dataclass(frozen=True)
class Round:
    """One round handed out: its ``RemoteValue``, its steps, the model version it started from."""

    value: Any
    steps: int
    base_version: int


class Rounds:
    """Hands out rounds and keeps their books. ``schedule(fn, args)`` is the strategy
    coordinator's; ``forget(remote_value)`` drops the cluster's note of where one ran;
    ``rate_at(step)`` is the trainers' learning rate at that step."""

    def __init__(self, schedule: Callable[..., Any], forget: Callable[[Any], None], round_fn: Any, iterator: Any,
                 params: Params, total: int, k_round: int, budget: RetryBudget, rate_at: Callable[[int], float],
                 done: int) -> None:
        self.schedule = schedule
        self.forget = forget
        self.round_fn = round_fn
        self.iterator = iterator
        self.params = params
        self.total = total
        self.k_round = k_round
        self.budget = budget
        self.rate_at = rate_at
        self.scheduled = done  # steps done or in flight
        self.in_flight: list[Round] = []
        self.arrivals = Arrivals()
        self.rate = rate_at(done)
        self._inputs: tuple[int, Any, Any] = (-1, None, None)

    def set_rate(self, step: int) -> None:
        self.rate = self.rate_at(step)

    def current_inputs(self) -> tuple[Any, Any]:
        """The round inputs of the model as it is now (made once per version)."""
        if self._inputs[0] != self.params.version:
            weights, slots = round_inputs(self.params)
            self._inputs = (self.params.version, weights, slots)
        return self._inputs[1], self._inputs[2]

    def dispatch(self, trainers: int) -> None:
        """A round for every idle trainer (of ``trainers`` attached), on the model as it is now."""
        while self.scheduled < self.total and len(self.in_flight) < max(1, trainers):
            n = min(self.k_round, self.total - self.scheduled)
            weights_in, slots_in = self.current_inputs()
            try:
                rv = self.schedule(self.round_fn, args=(self.iterator, weights_in, slots_in,
                                                        tf.constant(self.rate, tf.float32), tf.constant(n, tf.int32)))
            except RETRYABLE as exc:  # an earlier function's error; TF cancelled the queue
                self.budget.failed(exc)
                continue
            self.arrivals.watch(rv)
            self.in_flight.append(Round(rv, n, self.params.version))
            self.scheduled += n

    def wait(self, timeout: float) -> Round | None:
        """The first round back within ``timeout`` s, out of the books' in-flight list."""
        k = self.arrivals.wait([r.value for r in self.in_flight], timeout)
        return self.in_flight.pop(k) if k >= 0 else None

    def give_back(self, steps: int) -> None:
        """A round's steps that did not count: someone runs them again."""
        self.scheduled -= steps

    def drop(self, remote_value: Any) -> None:
        """A detached slot's running round: given up, its steps back."""
        for k, r in enumerate(self.in_flight):
            if remote_value is not None and r.value is remote_value:
                del self.in_flight[k]
                self.scheduled -= r.steps
                self.forget(r.value)
                break
