"""The model as only the host's coordinator holds it (TF-free: numpy arrays).

TensorFlow traffic flows one way (``docs/security.md``): the coordinator keeps every parameter
in its own memory and hands each round the weights; what a worker returns is a change that is
validated (:mod:`crowdd.job.validate`) before :meth:`Params.apply` merges it.
"""

from __future__ import annotations

import numpy as np

from crowdd.hyperparams import Job
from crowdd.job.outer import nesterov


class Params:
    """The model's parameters and optimizer state, as float32 numpy arrays in the
    coordinator's memory: the only copy that counts. ``version`` counts the changes merged."""

    def __init__(self, weights: list[np.ndarray], job: Job, merge: str = "average") -> None:
        self.job = job
        self.merge = merge
        self.weights = [np.array(w, np.float32) for w in weights]
        self.slots: list[np.ndarray] = []
        if job.optimizer == "adam":  # the moments m and v per weight, then the step count t
            self.slots = [np.zeros_like(w) for w in self.weights] + [np.zeros_like(w) for w in self.weights]
            self.slots.append(np.zeros((), np.float32))
        # the outer optimizer's momentum, one per weight (merge "nesterov")
        self.outer = [np.zeros_like(w) for w in self.weights] if merge == "nesterov" else []
        self.version = 0

    def arrays(self) -> list[np.ndarray]:
        """Everything a checkpoint holds (weights, optimizer slots, outer momentum)."""
        return [*self.weights, *self.slots, *self.outer]

    def load(self, arrays: list[np.ndarray]) -> None:
        n, s = len(self.weights), len(self.slots)
        self.weights = [np.array(a, np.float32) for a in arrays[:n]]
        self.slots = [np.array(a, np.float32) for a in arrays[n : n + s]]
        self.outer = [np.array(a, np.float32) for a in arrays[n + s :]]

    def shapes(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """The shapes a change must have: (the weights', the optimizer slots')."""
        return [tuple(a.shape) for a in self.weights], [tuple(a.shape) for a in self.slots]

    def candidate(self, weight_change: list[np.ndarray], scale: float) -> list[np.ndarray]:
        """The weights as they would be after merging ``weight_change`` (for validation)."""
        if self.outer:
            return [w + nesterov(d * scale, m)[1] for w, d, m in zip(self.weights, weight_change, self.outer)]
        return [w + d * scale for w, d in zip(self.weights, weight_change)]

    def apply(self, weight_change: list[np.ndarray], slot_change: list[np.ndarray], scale: float) -> None:
        """Merge one validated change: ``scale`` times it (or DiLoCo's outer Nesterov step of
        it, merge ``nesterov``); the optimizer slots move by ``scale`` times theirs."""
        if self.outer:
            for i, d in enumerate(weight_change):
                m, step = nesterov(d * scale, self.outer[i])
                self.outer[i] = np.asarray(m, np.float32)
                self.weights[i] += step
        else:
            for w, d in zip(self.weights, weight_change):
                w += d * scale
        for s, d in zip(self.slots, slot_change):
            s += d * scale
        self.version += 1


__all__ = ["Params"]
