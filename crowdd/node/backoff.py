"""Retry delays: exponential backoff with full jitter."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter: uniform(min, min(max, min·2^n))."""

    def __init__(self, lo: float, hi: float, rng: random.Random) -> None:
        self.lo, self.hi, self.rng = lo, max(lo, hi), rng
        self.n = 0

    def next(self) -> float:
        cap = min(self.hi, self.lo * (2**self.n))
        self.n = min(self.n + 1, 30)
        return self.rng.uniform(self.lo, cap)

    def reset(self) -> None:
        self.n = 0


__all__ = ["Backoff"]
