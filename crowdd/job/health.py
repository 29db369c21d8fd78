"""Is the run still healthy? Non-finite losses and weights, and what to tell the host (TF-free)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np


def finite(value: Any) -> bool:
    """Whether a scalar (a loss) is a finite number."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def all_finite(arrays: Iterable[Any]) -> bool:
    """Whether every element of every array (weights, optimizer slots) is finite."""
    return all(bool(np.isfinite(np.asarray(a)).all()) for a in arrays)


def suggest_lr(lr: float) -> str:
    """A learning rate ten times lower, printed as a user would type it."""
    return f"{lr / 10:g}"


def divergence_message(step: int, lr: float) -> str:
    """What the host is told when the loss stops being a number."""
    return (
        f"loss diverged at step {step}; lower the learning rate (e.g. --lr {suggest_lr(lr)}) "
        "or scale the features"
    )


class Diverged(Exception):
    """The loss (or the weights) stopped being finite at ``step``."""

    def __init__(self, step: int, lr: float) -> None:
        super().__init__(divergence_message(step, lr))
        self.step = step


__all__ = ["Diverged", "all_finite", "divergence_message", "finite", "suggest_lr"]
