"""No change counts until it is validated (BOINC's rule), and trust per member (TF-free).

A worker's change arrives at the host's coordinator; :class:`Validator` decides whether it may
touch the model, before any of it does:

1. **Form**: the right number of arrays, each of the right shape, every value finite. A
   change that fails this is *fatal*: no honest client sends one.
2. **Work done** (free riders): not all zero; not a replay of an earlier change (its bytes'
   digest); not staler than ``max_lag`` merged changes.
3. **Size**: its norm at most ``NORM_FACTOR`` times the largest accepted so far.
4. **Effect** on data the host holds back from training: Zeno++'s rule (Xie et al. 2020),
   with the real loss: merged, it must not raise the held-back loss by more than
   ``LOSS_TOLERANCE`` (relative); and FLTrust's agreement (Cao et al. 2021): its cosine with
   the host's own latest change (the host's trainer, on the host's data; until there is one,
   the held-back loss's descent direction) must be at least ``MIN_COSINE`` and
   ``COSINE_SHARE`` of the recently accepted changes' median, unless the change lowers the
   held-back loss by more than ``LOSS_RESCUE`` — when every
   trainer draws from the same data (sharding ``full``) and while the model still learns.

:class:`Trust` keeps each member's last verdicts; a member with ``EXPEL_REJECTED`` of its
last ``EXPEL_WINDOW`` changes rejected, or one fatal change, is expelled with the reason.
The thresholds were measured with honest and bad workers (``benchmarks/byzantine.py``;
figures in ``docs/security.md``).
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: a change may raise the held-back loss by at most this share of it (honest changes, stale by
#: a few merges, raised it by up to 7.7% on Fashion-MNIST; flipped labels by 18% and more)
LOSS_TOLERANCE = 0.15
#: the least cosine with the host's own latest change (honest: >= 0.085 measured; noise of an
#: honest norm: |cos| < 0.005; sign-flipped and IPM: < -0.17)
MIN_COSINE = 0.02
#: a change that lowers the held-back loss by more than this share of it passes whatever its
#: direction (honest changes orthogonal to the host's lowered it by 4-5%; noise of an honest
#: norm moved it by less than 0.4%, either way)
LOSS_RESCUE = 0.01
#: ... and, unless it lowers the held-back loss, at least this share of the median cosine of
#: the recently accepted changes: early in a run honest changes agree closely (0.66-0.91
#: measured), and a change trained on flipped labels, at 0.03 and raising the loss by 12%, was
#: let in by MIN_COSINE alone; late, honest ones agree less (median 0.26, least 0.128) and the
#: bound follows them down (digits: honest changes at 0.05-0.09 under a bound of 0.1 had all
#: lowered the loss)
COSINE_SHARE = 0.25
COSINE_HISTORY = 16
COSINE_MIN_HISTORY = 2
#: (the cosine with the held-back loss's descent direction, Zeno++'s first-order score, is
#: measured and logged but decides nothing once the host has a change of its own: on a model
#: trained to the noise floor honest changes pointed uphill on 144 held-back digits, cosine
#: down to -0.41, and were expelled; flipped labels, which it caught, raise the loss past
#: LOSS_TOLERANCE and point away from the host's change)
#: a change's norm may be at most this many times the largest accepted one
NORM_FACTOR = 10.0  # times the largest accepted change of the run
NORM_MIN_HISTORY = 4
#: the direction check counts only while the model learns fast: its held-back loss fell by at
#: least MIN_PROGRESS (relative) over the last PROGRESS_WINDOW merges. Past that, honest
#: changes are mostly noise and point anywhere: digits runs of 150 epochs in rounds of 10 steps
#: had honest changes at cosines down to -0.23 while the loss still fell 1-2% per 16 merges,
#: and expelled them. A bad change is then held to its form, its work, its size and the loss
#: it adds
MIN_PROGRESS = 0.05
#: ... and while the host's own successive changes agree: the mean cosine of its last
#: AGREEMENT_HISTORY pairs at least MIN_AGREEMENT (no pairs yet: they are taken to). When the
#: host's own changes point anywhere, so do honest workers' (digits in rounds of 10 steps: its
#: pairs averaged -0.03 after the first tenth of a run, and honest workers were expelled;
#: Fashion-MNIST in rounds of 200: 0.8 falling to 0.14 over the first half)
MIN_AGREEMENT = 0.1
AGREEMENT_HISTORY = 4
PROGRESS_WINDOW = 16
#: a member is expelled when this many of its last EXPEL_WINDOW changes were rejected
EXPEL_REJECTED = 3
EXPEL_WINDOW = 4
#: how many digests of past changes are kept to spot a replay
REPLAY_MEMORY = 100_000

REASONS = {
    "form": "was not a finite change of the model's shape",
    "zero": "changed nothing (all zero)",
    "replay": "replayed an earlier change",
    "stale": "was computed from weights too old",
    "norm": "was far larger than the accepted ones",
    "loss": "raised the validation loss",
    "direction": "pointed away from the host's own training",
}


@dataclass(frozen=True)
class Verdict:
    """What the validator decided about one change; ``reason`` is a key of :data:`REASONS`."""

    accepted: bool
    reason: str = ""
    fatal: bool = False
    norm: float = 0.0
    loss_before: float | None = None
    loss_after: float | None = None
    cosine: float | None = None
    descent: float | None = None

    def to_event(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accepted": self.accepted, "norm": round(self.norm, 6)}
        if self.reason:
            out["reason"] = self.reason
        for key in ("loss_before", "loss_after", "cosine", "descent"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 6)
        return out


def _flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)


def well_formed(arrays: Any, shapes: Sequence[tuple[int, ...]]) -> bool:
    """``arrays`` is a list of finite float arrays with exactly ``shapes``."""
    if not isinstance(arrays, (list, tuple)) or len(arrays) != len(shapes):
        return False
    for a, shape in zip(arrays, shapes):
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or tuple(a.shape) != tuple(shape):
            return False
        if not np.isfinite(a).all():
            return False
    return True


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0 or not math.isfinite(na * nb):
        return None
    return float(np.dot(a, b) / (na * nb))


@dataclass
class Validator:
    """Decides whether a change may be merged.

    ``weight_shapes``/``slot_shapes``: what a change must look like. ``loss_of(weights)``: the
    loss on the held-back data of a set of weights (the host's own computation, on its CPU).
    ``max_lag``: how many merges a change may have missed since its weights were handed out.
    """

    weight_shapes: list[tuple[int, ...]]
    slot_shapes: list[tuple[int, ...]]
    loss_of: Callable[[list[np.ndarray]], float]
    max_lag: int
    grad_of: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None
    # whether every trainer draws from the data the host's own change comes from (sharding
    # "full"): FLTrust's direction check assumes it; a worker on a shard of its own honestly
    # moves elsewhere (it was expelled: digits, "overlap")
    directional: bool = True
    loss_tolerance: float = LOSS_TOLERANCE
    min_cosine: float = MIN_COSINE
    norm_factor: float = NORM_FACTOR
    reference: np.ndarray | None = None  # the host's own latest change, flattened
    _cosines: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=COSINE_HISTORY))
    _agreements: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=AGREEMENT_HISTORY))
    _largest: float = 0.0  # the largest accepted change's norm
    _sized: int = 0  # how many accepted changes it is the largest of
    _seen: dict[bytes, None] = field(default_factory=dict)
    _loss: tuple[int, float] | None = None  # (version, held-back loss of the model at it)
    _trace: collections.deque[tuple[int, float]] = field(default_factory=lambda: collections.deque(maxlen=256))
    _descent: tuple[int, np.ndarray] | None = None  # (version, -gradient of the held-back loss there)

    def descent_direction(self, version: int, weights: list[np.ndarray]) -> np.ndarray | None:
        if self.grad_of is None:
            return None
        if self._descent is None or self._descent[0] != version:
            self._descent = (version, -_flat(self.grad_of(weights)))
        return self._descent[1]

    def current_loss(self, version: int, weights: list[np.ndarray]) -> float:
        if self._loss is None or self._loss[0] != version:
            self._note_loss(version, float(self.loss_of(weights)))
        assert self._loss is not None
        return self._loss[1]

    def _note_loss(self, version: int, loss: float) -> None:
        self._loss = (version, loss)
        if math.isfinite(loss) and (not self._trace or self._trace[-1][0] < version):
            self._trace.append((version, loss))

    def merged(self, version: int, loss: float | None) -> None:
        """The model moved to ``version``; its held-back loss is ``loss`` when known."""
        if loss is not None:
            self._note_loss(version, loss)
        else:
            self._loss = None

    def least_cosine(self) -> float:
        """The least cosine with the host's change a change may have now: MIN_COSINE, or
        COSINE_SHARE of the median of the recently accepted changes' when that is higher."""
        if len(self._cosines) < COSINE_MIN_HISTORY:
            return self.min_cosine
        return max(self.min_cosine, COSINE_SHARE * float(np.median(self._cosines)))

    def host_agrees(self) -> bool:
        """Whether the host's own successive changes still agree (MIN_AGREEMENT)."""
        return not self._agreements or float(np.mean(self._agreements)) >= MIN_AGREEMENT

    def learning(self) -> bool:
        """Whether the held-back loss falls fast: by MIN_PROGRESS over the last PROGRESS_WINDOW
        merges, or in proportion over a shorter span (a run's start, or a resumed run's; True
        until there are two losses to compare)."""
        if len(self._trace) < 2:
            return True
        version, now = self._trace[-1]
        then, old = next(((v, loss) for v, loss in reversed(self._trace) if v <= version - PROGRESS_WINDOW),
                         self._trace[0])
        span = min(1.0, (version - then) / PROGRESS_WINDOW)
        return now <= (1.0 - MIN_PROGRESS * span) * old

    def _digest(self, arrays: Sequence[np.ndarray]) -> bytes:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.digest()

    def check(self, weight_change: Any, slot_change: Any, *, lag: int, own: bool,
              version: int, weights: list[np.ndarray], candidate: Callable[[], list[np.ndarray]],
              full_round: bool = True) -> Verdict:
        """The verdict on one change. ``own``: it comes from the host's own trainer (checked
        for form only, and it becomes the reference direction). ``candidate()``: the
        weights as they would be after merging it. ``full_round`` False: the host gave this
        round fewer steps than the rest (the run's last steps); its change is smaller and
        noisier than the ones the direction bound was learnt from, so the direction does not
        decide (seen: an honest worker's short last rounds, re-run after each rejection, were
        rejected three times and expelled); the round's length is the host's choice, never
        the worker's. Every other check holds."""
        if not (well_formed(weight_change, self.weight_shapes) and well_formed(slot_change, self.slot_shapes)):
            return Verdict(False, "form", fatal=True)
        flat = _flat(weight_change)
        norm = float(np.linalg.norm(flat))
        if own:
            agreement = cosine(flat, self.reference) if self.reference is not None else None
            if agreement is not None:
                self._agreements.append(agreement)
            self.reference = flat
            self._remember(weight_change)
            return Verdict(True, norm=norm, cosine=agreement)
        if norm == 0.0:
            return Verdict(False, "zero", norm=norm)
        digest = self._digest(weight_change)
        if digest in self._seen:
            return Verdict(False, "replay", norm=norm)
        self._seen[digest] = None
        if len(self._seen) > REPLAY_MEMORY:
            self._seen.pop(next(iter(self._seen)))
        if lag > self.max_lag:
            return Verdict(False, "stale", norm=norm)
        if self._sized >= NORM_MIN_HISTORY and norm > self.norm_factor * self._largest:
            return Verdict(False, "norm", norm=norm)
        down = self.descent_direction(version, weights)
        dsc = cosine(flat, down) if down is not None else None
        # until the host's trainer has sent its first change, the held-back data's descent
        # direction stands in for it (early on, honest changes agree with it most)
        cos = cosine(flat, self.reference) if self.reference is not None else dsc
        before = self.current_loss(version, weights)
        after = float(self.loss_of(candidate()))
        scores = {"norm": norm, "loss_before": before, "loss_after": after, "cosine": cos, "descent": dsc}
        verdict = Verdict(True, **scores)  # type: ignore[arg-type]
        if not math.isfinite(after) or after > before + self.loss_tolerance * abs(before):
            return Verdict(False, "loss", **scores)  # type: ignore[arg-type]
        # a change that does not agree with the host's is let in only when it lowers the
        # held-back loss by more than LOSS_RESCUE: then the host's own data speaks for it
        if self.directional and full_round and cos is not None and self.learning() and self.host_agrees() and (
                cos < self.least_cosine() and after >= (1.0 - LOSS_RESCUE) * before):
            return Verdict(False, "direction", **scores)  # type: ignore[arg-type]
        if cos is not None and self.reference is not None and full_round:
            self._cosines.append(cos)
        self._note_norm(norm)
        return verdict

    def _remember(self, weight_change: Sequence[np.ndarray]) -> None:
        self._seen[self._digest(weight_change)] = None
        norm = float(np.linalg.norm(_flat(weight_change)))
        if norm > 0:
            self._note_norm(norm)

    def _note_norm(self, norm: float) -> None:
        """Keep the largest accepted norm (a change never needs to be far larger than the
        largest honest one: late in a run honest changes shrink, and a newcomer on a shard
        nobody trained yet moves as much as the run's first changes did)."""
        self._largest = max(self._largest, norm)
        self._sized += 1


@dataclass
class Trust:
    """Each member's last verdicts; who is expelled and why."""

    window: int = EXPEL_WINDOW
    limit: int = EXPEL_REJECTED
    _history: dict[int, collections.deque[str]] = field(default_factory=dict)
    expelled: dict[int, str] = field(default_factory=dict)
    counts: dict[int, list[int]] = field(default_factory=dict)  # slot -> [accepted, rejected]

    def record(self, slot: int, verdict: Verdict) -> str | None:
        """Note a verdict; returns the reason when ``slot`` is expelled by it (once)."""
        counts = self.counts.setdefault(slot, [0, 0])
        counts[0 if verdict.accepted else 1] += 1
        if slot in self.expelled:
            return None
        history = self._history.setdefault(slot, collections.deque(maxlen=self.window))
        history.append(verdict.reason)
        why: str | None = None
        if verdict.fatal:
            why = f"its change {REASONS[verdict.reason]}"
        else:
            rejected = [r for r in history if r]
            if len(rejected) >= self.limit:
                common = collections.Counter(rejected).most_common(1)[0][0]
                why = f"{len(rejected)} of its last {len(history)} changes were rejected (most {REASONS[common]})"
        if why is not None:
            self.expelled[slot] = why
        return why

    def forgive(self, slot: int) -> None:
        """A new member takes ``slot``: it starts with a clean record."""
        self._history.pop(slot, None)
        self.expelled.pop(slot, None)


__all__ = ["COSINE_SHARE", "EXPEL_REJECTED", "EXPEL_WINDOW", "LOSS_RESCUE", "LOSS_TOLERANCE", "MIN_AGREEMENT", "MIN_COSINE", "NORM_FACTOR", "REASONS", "Trust",
           "Validator", "Verdict", "cosine", "well_formed"]
