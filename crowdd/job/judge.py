"""The coordinator's desk for workers' changes: check one, merge it or not, keep the record
(TF-free).

:meth:`ChangeDesk.take` is every change's one path into the model: the test-only bad-worker
hook (:mod:`crowdd.job.byzantine`) where it arrives, the validator's verdict
(:mod:`crowdd.job.validate`), the merge (:meth:`crowdd.job.params.Params.apply`) only when it
passes, the member's record (:class:`crowdd.job.validate.Trust`), and one line of the audit log.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from crowdd.job.byzantine import BadWorkers
from crowdd.job.params import Params
from crowdd.job.validate import Trust, Validator, Verdict


@dataclass(frozen=True)
class Ruling:
    """The verdict on one change, and the reason its sender is expelled by it (None: it is not)."""

    verdict: Verdict
    expel: str | None = None


def _arrays(value: Any) -> Any:
    """A fetched change as float32 arrays; anything else is left for the validator to refuse."""
    if not isinstance(value, (list, tuple)):
        return value
    try:
        return [np.asarray(a, np.float32) for a in value]
    except (TypeError, ValueError):
        return value


@dataclass
class ChangeDesk:
    """``scale``: what a change is multiplied by when merged (the merge rule's). ``audit``: where
    every verdict goes, one JSON object a line (the host's to read; None: nowhere)."""

    params: Params
    validator: Validator
    scale: float
    trust: Trust = field(default_factory=Trust)
    bad: BadWorkers = field(default_factory=BadWorkers)
    audit: TextIO | None = None
    cpu_seconds: float = 0.0
    checked: int = 0

    def take(self, slot: int, base_version: int, weight_change: Any, slot_change: Any,
             full_round: bool = True) -> Ruling:
        """Judge the change slot ``slot`` computed from the weights of ``base_version``; merge
        it if it passes. Slot 0 is the host's own trainer: never expelled. ``full_round``
        False: a round shorter than the rest (:meth:`Validator.check`)."""
        t0 = time.thread_time()
        weight_change, slot_change = _arrays(weight_change), _arrays(slot_change)
        own = slot == 0
        if not own and self.bad.modes and isinstance(weight_change, list):
            weight_change = self.bad.corrupt(slot, weight_change)
        params, lag = self.params, self.params.version - base_version
        verdict = self.validator.check(
            weight_change, slot_change, lag=lag, own=own, version=params.version, weights=params.weights,
            candidate=lambda: params.candidate(weight_change, self.scale), full_round=full_round)
        if verdict.accepted:
            params.apply(weight_change, slot_change, self.scale)
            self.validator.merged(params.version, verdict.loss_after if not params.outer else None)
            if not own and self.bad.modes and slot not in self.bad.modes:
                self.bad.seen(weight_change)  # what a colluding attacker learns
        why = self.trust.record(slot, verdict)
        self.cpu_seconds += time.thread_time() - t0
        self.checked += 1
        if self.audit is not None:
            self.audit.write(json.dumps({"slot": slot, "version": params.version, "lag": lag,
                                         **verdict.to_event()}) + "\n")
        return Ruling(verdict, None if own else why)

    def summary(self, held_back: int) -> dict[str, Any]:
        """For the ``done`` event: the record of every slot, who was expelled, the cost."""
        return {
            "held_back": held_back,
            "changes": {str(s): {"accepted": c[0], "rejected": c[1]} for s, c in sorted(self.trust.counts.items())},
            "expelled": {str(s): why for s, why in sorted(self.trust.expelled.items())},
            "check_cpu_seconds": round(self.cpu_seconds, 4),
            "checked": self.checked,
        }


__all__ = ["ChangeDesk", "Ruling"]
