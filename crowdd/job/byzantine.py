"""Bad workers, for tests and ``benchmarks/byzantine.py`` only (TF-free).

Switched on by the environment of the *host's* job, never by a setting a user could write:
``CROWDD_TEST_BYZANTINE="2:sign-flip,3:alie"`` makes the changes that worker slots 2 and 3
return arrive at the host's validator as a bad worker of that kind would send them. The
change is replaced where it arrives (the coordinator's fetch), before validation: to the
validator it is exactly what a modified client on that machine would have sent. One mode,
``flip-labels``, is real work: that slot trains on its shard with every label ``c`` replaced
by ``classes - 1 - c`` (the round function flips them on the worker for that shard only).

Modes (the attacks of the robust-training literature):
``nan``; ``scale100`` (×100); ``sign-flip``; ``noise`` (Gaussian, the honest change's
norm); ``alie`` ("a little is enough", Baruah et al. 2019: the honest changes' mean minus
``ALIE_Z`` standard deviations, coordinate by coordinate, from the changes the attacker has
seen); ``ipm-0.1`` and ``ipm-0.5`` (inner product manipulation, Xie et al. 2019: ``-eps``
times the honest mean); ``flip-labels``; ``free-rider`` (an all-zero change first, then
replays of a change another member sent).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

ENV = "CROWDD_TEST_BYZANTINE"
MODES = ("nan", "scale100", "sign-flip", "noise", "alie", "ipm-0.1", "ipm-0.5", "flip-labels", "free-rider")
ALIE_Z = 1.0
HISTORY = 8

Change = list[np.ndarray]


def parse(value: str) -> dict[int, str]:
    """``"2:sign-flip,3:alie"`` -> ``{2: "sign-flip", 3: "alie"}``; ValueError when malformed.
    Slot 0 (the host's own trainer) cannot be made bad."""
    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        slot, _, mode = part.partition(":")
        if not slot.isdigit() or int(slot) < 1 or mode not in MODES:
            raise ValueError(f"{ENV}: expected SLOT:MODE with SLOT >= 1 and MODE one of {', '.join(MODES)}, got {part!r}")
        out[int(slot)] = mode
    return out


@dataclass
class BadWorkers:
    """Which slots are bad and how; :meth:`corrupt` turns an honest change into theirs."""

    modes: Mapping[int, str] = field(default_factory=dict)
    seed: int = 0
    _honest: collections.deque[Change] = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    _sent: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> BadWorkers:
        return cls(parse(environ.get(ENV, "")))

    @property
    def flipped(self) -> frozenset[int]:
        """The slots whose shards train on flipped labels."""
        return frozenset(s for s, m in self.modes.items() if m == "flip-labels")

    def seen(self, change: Change) -> None:
        """A change an honest member sent (what a colluding attacker learns)."""
        self._honest.append([np.array(a, np.float32) for a in change])

    def corrupt(self, slot: int, change: Change) -> Change:
        """What bad slot ``slot`` sends instead of its honest ``change`` (unchanged if honest)."""
        mode = self.modes.get(slot)
        if mode is None or mode == "flip-labels":
            return change
        n = self._sent.get(slot, 0)
        self._sent[slot] = n + 1
        rng = np.random.default_rng(self.seed + 7919 * slot + n)
        if mode == "nan":
            return [np.full_like(a, np.nan) for a in change]
        if mode == "scale100":
            return [a * 100.0 for a in change]
        if mode == "sign-flip":
            return [-a for a in change]
        if mode == "noise":
            norm = float(np.sqrt(sum(float(np.sum(np.square(a))) for a in change)))
            noise = [rng.standard_normal(a.shape).astype(np.float32) for a in change]
            nn = float(np.sqrt(sum(float(np.sum(np.square(a))) for a in noise))) or 1.0
            return [a * (norm / nn) for a in noise]
        pool = list(self._honest) or [change]
        mean = [np.mean([p[i] for p in pool], axis=0) for i in range(len(change))]
        if mode == "alie":
            std = [np.std([p[i] for p in pool], axis=0) for i in range(len(change))]
            return [(m - ALIE_Z * s).astype(np.float32) for m, s in zip(mean, std)]
        if mode.startswith("ipm-"):
            eps = float(mode[4:])
            return [(-eps * m).astype(np.float32) for m in mean]
        if mode == "free-rider":
            if n == 0 or not self._honest:
                return [np.zeros_like(a) for a in change]
            return [np.array(a) for a in self._honest[-1]]
        raise ValueError(f"unknown mode {mode!r}")


__all__ = ["ENV", "MODES", "BadWorkers", "parse"]
