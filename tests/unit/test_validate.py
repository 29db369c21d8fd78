"""crowdd.job.validate: no change touches the model before it passes every check, and a member
whose changes keep failing is expelled (TF-free: the held-back loss here is a quadratic)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from crowdd.job.validate import (
    EXPEL_REJECTED,
    EXPEL_WINDOW,
    LOSS_TOLERANCE,
    MIN_COSINE,
    NORM_FACTOR,
    NORM_MIN_HISTORY,
    REASONS,
    Trust,
    Validator,
    Verdict,
    cosine,
    well_formed,
)

SHAPES = [(3,), (2, 2)]
SLOT_SHAPES = [(3,)]
SIZE = 7
# the held-back loss: 0.5 |w - TARGET|^2, far from where the model is, so a step towards it of
# any size used here lowers it
TARGET = [np.full(s, 100.0, np.float32) for s in SHAPES]


def zeros() -> list[np.ndarray]:
    return [np.zeros(s, np.float32) for s in SHAPES]


def loss_of(weights: list[np.ndarray]) -> float:
    return float(sum(0.5 * np.sum(np.square(w - t)) for w, t in zip(weights, TARGET)))


def grad_of(weights: list[np.ndarray]) -> list[np.ndarray]:
    return [w - t for w, t in zip(weights, TARGET)]


def split(flat: np.ndarray) -> list[np.ndarray]:
    """A flat vector of SIZE as a change of SHAPES."""
    flat = np.asarray(flat, np.float32)
    return [flat[:3].copy(), flat[3:].reshape(2, 2).copy()]


def honest(seed: int, norm: float = 1.0) -> list[np.ndarray]:
    """A step down the held-back loss (towards TARGET), a little noisy, of about ``norm``."""
    rng = np.random.default_rng(seed)
    v = np.ones(SIZE) + 0.2 * rng.standard_normal(SIZE)
    return split(v / np.linalg.norm(v) * norm)


def slot_change() -> list[np.ndarray]:
    return [np.zeros(s, np.float32) for s in SLOT_SHAPES]


class Host:
    """A validator and the model it guards (the weights stay put unless ``merge``)."""

    def __init__(self, *, grad: bool = True, max_lag: int = 4, loss: Callable[[list[np.ndarray]], float] = loss_of,
                 **kw: Any) -> None:
        self.weights = zeros()
        self.version = 0
        self.v = Validator(list(SHAPES), list(SLOT_SHAPES), loss, max_lag, grad_of=grad_of if grad else None, **kw)

    def check(self, change: Any, *, lag: int = 0, own: bool = False, slots: Any = None, full_round: bool = True
              ) -> Verdict:
        return self.v.check(change, slot_change() if slots is None else slots, lag=lag, own=own, version=self.version,
                            weights=self.weights, candidate=lambda: [w + d for w, d in zip(self.weights, change)],
                            full_round=full_round)

    def merge(self, change: list[np.ndarray]) -> None:
        self.weights = [w + d for w, d in zip(self.weights, change)]
        self.version += 1
        self.v.merged(self.version, loss_of(self.weights))


# --------------------------------------------------------------------------- form


@pytest.mark.parametrize(
    "change",
    [
        [np.zeros(3, np.float32)],  # one array short
        [*honest(1), np.zeros(1, np.float32)],  # one too many
        [np.ones(3, np.float32), np.ones((4,), np.float32)],  # a wrong shape
        [np.ones((3, 1), np.float32), np.ones((2, 2), np.float32)],
        [np.ones(3, np.int32), np.ones((2, 2), np.int32)],  # not floats
        [np.array(["a", "b", "c"]), np.ones((2, 2), np.float32)],
        [[1.0, 1.0, 1.0], np.ones((2, 2), np.float32)],  # not an array
        [np.array([1.0, np.nan, 1.0], np.float32), np.ones((2, 2), np.float32)],
        [np.ones(3, np.float32), np.array([[1.0, np.inf], [1.0, 1.0]], np.float32)],
        [np.ones(3, np.float16), np.full((2, 2), -np.inf, np.float16)],
        np.ones(SIZE, np.float32),  # not a list of arrays
        {"w": np.ones(3, np.float32)},
        None,
    ],
    ids=lambda c: "change",
)
def test_a_change_of_the_wrong_form_is_fatal(change: Any) -> None:
    host = Host()
    verdict = host.check(change)
    assert not verdict.accepted and verdict.reason == "form" and verdict.fatal
    # the host's own trainer is held to the same form
    verdict = host.check(change, own=True)
    assert not verdict.accepted and verdict.reason == "form" and verdict.fatal
    assert host.v.reference is None


@pytest.mark.parametrize(
    "slots",
    [[], [np.zeros(4, np.float32)], [np.array([0.0, np.nan, 0.0], np.float32)], [np.zeros(3, np.int64)]],
    ids=["missing", "shape", "nan", "int"],
)
def test_a_slot_change_of_the_wrong_form_is_fatal(slots: list[np.ndarray]) -> None:
    verdict = Host().check(honest(1), slots=slots)
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "form", True)


def test_well_formed_and_cosine() -> None:
    assert well_formed(honest(1), SHAPES) and well_formed(tuple(honest(1)), SHAPES)
    assert well_formed([a.astype(np.float16) for a in honest(1)], SHAPES)
    assert not well_formed(honest(1), [(3,), (4,)])
    assert well_formed([], [])
    a = np.array([1.0, 0.0])
    assert cosine(a, np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(a, np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, np.zeros(2)) is None


# --------------------------------------------------------------------------- work done


def test_an_all_zero_change_is_rejected_as_zero() -> None:
    host = Host()
    verdict = host.check(zeros())
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "zero", False)
    assert verdict.norm == 0.0


def test_a_replay_of_an_identical_change_is_rejected() -> None:
    host = Host()
    change = honest(1)
    assert host.check(change).accepted
    copy = [np.array(a) for a in change]  # the same bytes, new arrays
    verdict = host.check(copy, lag=1)
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "replay", False)
    # a rejected change is remembered too: sending it again is a replay, not a fresh check
    stale = honest(2)
    assert host.check(stale, lag=99).reason == "stale"
    assert host.check(stale).reason == "replay"
    # a change one bit apart is a different change
    nudged = [np.array(a) for a in change]
    nudged[0][0] = np.nextafter(nudged[0][0], np.float32(10))
    assert host.check(nudged).accepted


def test_a_copy_of_the_hosts_own_change_is_a_replay() -> None:
    host = Host()
    own = honest(3)
    assert host.check(own, own=True).accepted
    verdict = host.check([np.array(a) for a in own])
    assert not verdict.accepted and verdict.reason == "replay"


def test_a_change_staler_than_max_lag_is_rejected() -> None:
    host = Host(max_lag=4)
    assert host.check(honest(1), lag=4).accepted
    verdict = host.check(honest(2), lag=5)
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "stale", False)


# --------------------------------------------------------------------------- size


def test_a_change_far_larger_than_the_largest_accepted_is_rejected_once_there_is_a_history() -> None:
    host = Host()
    big = NORM_FACTOR * 1.5
    # with fewer than NORM_MIN_HISTORY accepted changes there is nothing to compare with: a large
    # change (still downhill, still lowering the loss) is judged on its effect
    for seed in range(NORM_MIN_HISTORY - 1):
        assert host.check(honest(seed)).accepted
    first = host.check(honest(100, norm=big))
    assert first.accepted, first
    # the bound is the largest accepted change's norm (big) times the factor
    verdict = host.check(honest(101, norm=big * NORM_FACTOR * 1.1))
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "norm", False)
    assert verdict.norm == pytest.approx(big * NORM_FACTOR * 1.1, rel=1e-5)
    # later changes shrink; a change as large as the run's largest one stays acceptable (a
    # newcomer on a shard nobody trained yet)
    for seed in range(NORM_MIN_HISTORY, 2 * NORM_MIN_HISTORY):
        assert host.check(honest(seed, norm=0.1)).accepted
    assert host.check(honest(102, norm=big)).accepted


def test_a_rejected_change_does_not_count_towards_the_norm_history() -> None:
    host = Host()
    for seed in range(NORM_MIN_HISTORY - 1):
        assert host.check(honest(seed)).accepted
    assert host.check(honest(50, norm=20.0), lag=99).reason == "stale"  # large, and rejected
    assert host.check(zeros()).reason == "zero"
    # still one short of a history: a large change is not yet judged by its size
    assert host.check(honest(51, norm=NORM_FACTOR * 1.5)).accepted


# --------------------------------------------------------------------------- effect


def test_an_honest_descending_change_is_accepted_with_its_scores() -> None:
    host = Host()
    own = honest(7)
    assert host.check(own, own=True).accepted
    change = honest(8)
    verdict = host.check(change, lag=2)
    assert verdict.accepted and verdict.reason == "" and not verdict.fatal
    assert verdict.loss_before == pytest.approx(loss_of(zeros()))
    assert verdict.loss_after == pytest.approx(loss_of(change))
    assert verdict.loss_after is not None and verdict.loss_before is not None
    assert verdict.loss_after < verdict.loss_before
    assert verdict.cosine is not None and verdict.cosine > 0.9
    assert verdict.descent is not None and verdict.descent > 0.9
    event = verdict.to_event()
    assert event["accepted"] is True and "reason" not in event
    assert set(event) == {"accepted", "norm", "loss_before", "loss_after", "cosine", "descent"}


def test_a_change_that_raises_the_loss_beyond_the_tolerance_is_rejected() -> None:
    """Judged on the held-back loss alone (no descent direction, no reference): a rise within
    LOSS_TOLERANCE (relative) passes, one beyond it does not."""
    host = Host(grad=False)
    before = loss_of(zeros())
    # moving every weight away from TARGET by x raises the loss to 0.5 * SIZE * (100 + x)^2
    def away(rise: float) -> list[np.ndarray]:
        x = 100.0 * (np.sqrt(1.0 + rise) - 1.0)
        return split(np.full(SIZE, -x))

    ok = host.check(away(LOSS_TOLERANCE * 0.8))
    assert ok.accepted and ok.loss_after is not None and ok.loss_after > before
    bad = host.check(away(LOSS_TOLERANCE * 1.2))
    assert (bad.accepted, bad.reason, bad.fatal) == (False, "loss", False)
    assert bad.loss_after == pytest.approx(before * (1 + LOSS_TOLERANCE * 1.2), rel=1e-4)
    assert bad.to_event()["reason"] == "loss"


def test_a_change_whose_merged_loss_is_not_finite_is_rejected() -> None:
    host = Host(grad=False, loss=lambda w: float("nan") if abs(float(w[0][0])) > 10 else loss_of(w))
    assert host.check(split(np.full(SIZE, 20.0))).reason == "loss"


def test_the_loss_check_is_first_among_the_effects() -> None:
    """A change that goes uphill by a lot fails on its loss (the strongest evidence)."""
    host = Host()
    assert host.check(honest(1), own=True).accepted
    verdict = host.check(split(-np.ones(SIZE) * 50))
    assert verdict.reason == "loss"
    assert verdict.cosine is not None and verdict.cosine < MIN_COSINE
    assert verdict.descent is not None and verdict.descent < 0


def test_a_change_pointing_away_from_the_hosts_own_change_is_rejected() -> None:
    """It lowers the held-back loss and is not uphill, but is orthogonal to what the host's
    own trainer did: FLTrust's check."""
    host = Host()
    reference = split(np.eye(SIZE)[0])
    assert host.check(reference, own=True).accepted
    sideways = split(np.eye(SIZE)[1] * 0.5)  # towards TARGET too, orthogonal to the reference
    verdict = host.check(sideways)
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "direction", False)
    assert verdict.cosine == pytest.approx(0.0, abs=1e-6)
    assert verdict.loss_after is not None and verdict.loss_before is not None
    assert verdict.loss_after < verdict.loss_before
    # a little of the reference's direction is enough
    v = np.eye(SIZE)[1] * 0.5 + np.eye(SIZE)[0] * 0.05
    assert cosine(v, np.eye(SIZE)[0]) > MIN_COSINE  # type: ignore[operator]
    assert host.check(split(v)).accepted


def test_a_short_last_round_is_not_judged_by_its_direction_but_by_everything_else() -> None:
    """The run's last rounds are shorter (the host gives each what is left): their changes are
    smaller and noisier, and an honest worker's were rejected for direction, re-run, rejected
    again, and expelled. The host knows a round's length; a short one is judged on everything
    but the direction. The control: the same change from a full round is rejected for it, and
    a short round that raises the loss is still rejected."""
    host = Host()
    assert host.check(split(np.eye(SIZE)[0]), own=True).accepted
    sideways = split(np.eye(SIZE)[1] * 0.5)  # lowers the held-back loss, orthogonal to the host's
    assert host.check(sideways).reason == "direction"
    assert host.check(split(np.eye(SIZE)[1] * 0.49), full_round=False).accepted
    uphill = host.check(split(-np.ones(SIZE) * 50), full_round=False)
    assert (uphill.accepted, uphill.reason) == (False, "loss")


def test_until_the_host_sends_a_change_the_descent_direction_stands_in_for_it() -> None:
    host = Host()
    assert host.v.reference is None
    # along the held-back descent direction's flank: accepted without any reference
    sideways = split(np.eye(SIZE)[1] * 0.5)
    verdict = host.check(sideways)
    assert verdict.accepted and verdict.cosine == pytest.approx(verdict.descent)  # type: ignore[arg-type]
    # orthogonal to the descent direction: not uphill, the loss hardly moves, but it does
    # nothing for the model
    v = np.zeros(SIZE)
    v[0], v[1] = 0.5, -0.5
    verdict = host.check(split(v))
    assert (verdict.accepted, verdict.reason, verdict.fatal) == (False, "direction", False)
    assert verdict.cosine == pytest.approx(0.0, abs=1e-6) and verdict.descent == pytest.approx(0.0, abs=1e-6)
    assert verdict.loss_after is not None and verdict.loss_before is not None
    assert verdict.loss_after < verdict.loss_before * (1 + LOSS_TOLERANCE)
    # with neither a reference nor a descent direction, the check is skipped
    assert Host(grad=False).check(split(v)).accepted


def test_the_descent_score_is_measured_but_the_hosts_own_change_decides() -> None:
    """A small uphill step that agrees with the host's own change raises the held-back loss by
    far less than the tolerance: its descent cosine (Zeno++'s first-order score) is reported,
    but once the host has a change of its own it is that change that judges the direction
    (honest changes of a model trained to the noise floor point uphill on small held-back
    sets: see MIN_COSINE's note)."""
    host = Host()
    uphill = [-a for a in honest(4, norm=0.5)]
    assert host.check([2 * a for a in uphill], own=True).accepted  # the host's trainer agrees
    verdict = host.check(uphill)
    assert verdict.accepted, verdict
    assert verdict.cosine == pytest.approx(1.0)
    assert verdict.descent is not None and verdict.descent < -0.5
    assert verdict.loss_after is not None and verdict.loss_before is not None
    assert verdict.loss_before < verdict.loss_after < verdict.loss_before * (1 + LOSS_TOLERANCE)


def test_the_hosts_own_change_is_checked_for_form_only_and_becomes_the_reference() -> None:
    host = Host(max_lag=0)
    for seed in range(NORM_MIN_HISTORY):
        assert host.check(honest(seed), own=True).accepted
    # uphill, huge, stale, far larger than the history: the host's own trainer is trusted
    own = split(-np.ones(SIZE) * 1000)
    verdict = host.check(own, own=True, lag=10)
    assert verdict.accepted and verdict.reason == "" and verdict.loss_after is None
    assert verdict.norm == pytest.approx(1000 * np.sqrt(SIZE), rel=1e-5)
    np.testing.assert_array_equal(host.v.reference, np.concatenate([a.reshape(-1) for a in own]))
    # and a worker's change is now judged against it: an honest one points away from it
    verdict = host.check(honest(20))
    assert verdict.reason == "direction" and verdict.cosine is not None and verdict.cosine < -0.9


def test_the_held_back_loss_is_computed_once_per_version() -> None:
    calls: list[int] = []

    def counting(weights: list[np.ndarray]) -> float:
        calls.append(1)
        return loss_of(weights)

    host = Host(loss=counting)
    assert host.check(honest(1)).accepted
    assert host.check(honest(2)).accepted
    assert len(calls) == 3  # the loss before once, and each candidate's
    host.merge(honest(1))  # merged() hands the loss at the new version: not recomputed
    calls.clear()
    verdict = host.check(honest(3))
    assert verdict.accepted and len(calls) == 1
    assert verdict.loss_before == pytest.approx(loss_of(host.weights))


# --------------------------------------------------------------------------- trust


def rejected(reason: str = "direction") -> Verdict:
    return Verdict(False, reason)


def test_a_member_is_expelled_after_enough_of_its_last_changes_are_rejected() -> None:
    trust = Trust()
    assert trust.record(2, Verdict(True)) is None
    for _ in range(EXPEL_REJECTED - 1):
        assert trust.record(2, rejected()) is None
    why = trust.record(2, rejected())
    assert why is not None and 2 in trust.expelled and trust.expelled[2] == why
    assert why.startswith(f"{EXPEL_REJECTED} of its last {min(EXPEL_WINDOW, EXPEL_REJECTED + 1)} changes were rejected")
    assert REASONS["direction"] in why
    assert trust.counts[2] == [1, EXPEL_REJECTED]


def test_the_reason_names_the_most_common_cause() -> None:
    trust = Trust()
    assert trust.record(1, rejected("norm")) is None
    assert trust.record(1, rejected("direction")) is None
    why = trust.record(1, rejected("direction"))
    assert why is not None and f"(most {REASONS['direction']})" in why and REASONS["norm"] not in why


def test_rejections_spread_out_beyond_the_window_do_not_expel() -> None:
    trust = Trust()
    pattern = [rejected()] + [Verdict(True)] * (EXPEL_WINDOW - EXPEL_REJECTED + 1)
    for _ in range(10):
        for v in pattern:
            assert trust.record(3, v) is None
    assert trust.expelled == {}


def test_one_fatal_change_expels_at_once() -> None:
    trust = Trust()
    for _ in range(5):
        trust.record(4, Verdict(True))
    why = trust.record(4, Verdict(False, "form", fatal=True))
    assert why == f"its change {REASONS['form']}"
    assert trust.expelled == {4: why}


def test_a_member_is_expelled_only_once_and_forgive_gives_a_clean_record() -> None:
    trust = Trust()
    assert trust.record(5, Verdict(False, "form", fatal=True)) is not None
    assert trust.record(5, Verdict(False, "form", fatal=True)) is None  # already out: said once
    for _ in range(EXPEL_WINDOW):
        assert trust.record(5, rejected()) is None
    assert trust.counts[5] == [0, 2 + EXPEL_WINDOW]  # still counted
    trust.forgive(5)  # a newcomer takes slot 5
    assert 5 not in trust.expelled
    for _ in range(EXPEL_REJECTED - 1):  # the old rejections do not count against it
        assert trust.record(5, rejected()) is None
    assert trust.record(5, rejected()) is not None


def test_members_are_judged_apart() -> None:
    trust = Trust()
    for _ in range(EXPEL_REJECTED - 1):
        assert trust.record(1, rejected()) is None
        assert trust.record(2, rejected()) is None
    assert trust.record(1, Verdict(True)) is None
    assert trust.record(2, rejected()) is not None
    assert set(trust.expelled) == {2}


def test_every_reason_has_words() -> None:
    assert set(REASONS) == {"form", "zero", "replay", "stale", "norm", "loss", "direction"}
    assert all(isinstance(v, str) and v for v in REASONS.values())


def test_once_the_held_back_loss_stops_falling_direction_no_longer_decides() -> None:
    """A model trained to its noise floor: honest changes point anywhere, so a change at right
    angles to the host's is no longer rejected for it; it is still held to its loss."""
    from crowdd.job.validate import MIN_PROGRESS, PROGRESS_WINDOW, Validator

    plateau = {"loss": 10.0, "rise": 0.0}
    shapes = [tuple(s) for s in SHAPES]
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    v = Validator(shapes, [], lambda w: plateau["loss"] + (0.0 if w is weights else plateau["rise"]), max_lag=8)
    reference = split(np.eye(SIZE)[0])
    sideways = split(np.eye(SIZE)[1] * 0.5)

    def check(change: list[np.ndarray], version: int) -> Any:
        return v.check(change, [], lag=0, own=False, version=version, weights=weights, candidate=lambda: list(weights))

    assert v.check(reference, [], lag=0, own=True, version=0, weights=weights, candidate=lambda: weights).accepted
    assert v.learning()  # no history yet
    assert check(sideways, 1).reason == "direction"
    for version in range(2, PROGRESS_WINDOW + 3):  # the loss stays put for a window of merges
        v.merged(version, plateau["loss"] * (1 - MIN_PROGRESS / 10))
    assert not v.learning()
    assert check(split(np.eye(SIZE)[2] * 0.5), PROGRESS_WINDOW + 3).accepted
    plateau["rise"] = 5.0  # ... but not a change that raises the loss
    assert check(split(np.eye(SIZE)[3] * 0.5), PROGRESS_WINDOW + 4).reason == "loss"
    # still learning: the loss fell by more than MIN_PROGRESS over the window
    w = Validator(shapes, [], lambda _w: 1.0, max_lag=8)
    for version in range(PROGRESS_WINDOW + 2):
        w.merged(version, 10.0 * (1 - 2 * MIN_PROGRESS) ** version)
    assert w.learning()


def test_the_least_cosine_follows_the_accepted_changes_up() -> None:
    """Early in a run honest changes agree closely with the host's: a change that barely
    agrees (above MIN_COSINE, below COSINE_SHARE of the accepted ones' median) is rejected."""
    from crowdd.job.validate import COSINE_SHARE, Validator

    shapes = [tuple(s) for s in SHAPES]
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    rise = {"after": 0.0}
    v = Validator(shapes, [], lambda w: 1.0 + (0.0 if w is weights else rise["after"]), max_lag=8)

    def at(cos: float, k: int) -> list[np.ndarray]:
        flat = np.zeros(SIZE)
        flat[0], flat[1 + k % (SIZE - 1)] = cos, np.sqrt(1 - cos * cos)
        return split(flat * (1 + 0.01 * k))

    def check(change: list[np.ndarray]) -> Any:
        return v.check(change, [], lag=0, own=False, version=0, weights=weights, candidate=lambda: list(weights))

    assert v.check(split(np.eye(SIZE)[0]), [], lag=0, own=True, version=0, weights=weights,
                   candidate=lambda: weights).accepted
    assert v.least_cosine() == MIN_COSINE
    for k in range(4):
        assert check(at(0.8, k)).accepted
    assert v.least_cosine() == pytest.approx(COSINE_SHARE * 0.8)
    barely = check(at(0.05, 10))  # it does not lower the held-back loss
    assert (barely.accepted, barely.reason) == (False, "direction") and barely.cosine > MIN_COSINE  # type: ignore[operator]
    assert check(at(0.3, 11)).accepted
    rise["after"] = -0.005  # lowering the held-back loss a little is not enough ...
    assert check(at(0.05, 12)).reason == "direction"
    rise["after"] = -0.02  # ... by more than LOSS_RESCUE, the host's own data speaks for it
    assert check(at(0.05, 13)).accepted
    assert check(at(-0.01, 14)).accepted


def test_a_resumed_run_at_its_noise_floor_is_not_learning_after_a_few_merges() -> None:
    """No need to wait a whole window: a short span whose loss hardly moves says enough (a
    host restarted from a checkpoint of a well-trained model), one that falls fast too."""
    from crowdd.job.validate import MIN_PROGRESS, PROGRESS_WINDOW, Validator

    flat = Validator([(1,)], [], lambda w: 1.0, max_lag=8)
    assert flat.learning()
    for version in range(3):
        flat.merged(version, 0.05 * (1 - MIN_PROGRESS / PROGRESS_WINDOW / 4) ** version)
    assert not flat.learning()
    fast = Validator([(1,)], [], lambda w: 1.0, max_lag=8)
    for version in range(3):
        fast.merged(version, 2.3 * 0.7**version)
    assert fast.learning()


def test_when_the_hosts_own_changes_stop_agreeing_direction_no_longer_decides() -> None:
    from crowdd.job.validate import AGREEMENT_HISTORY, Validator

    shapes = [tuple(s) for s in SHAPES]
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    v = Validator(shapes, [], lambda w: 1.0, max_lag=8)

    def own(flat: np.ndarray) -> None:
        assert v.check(split(flat), [], lag=0, own=True, version=0, weights=weights, candidate=lambda: weights).accepted

    def sideways(size: float = 0.5) -> Any:
        return v.check(split(np.eye(SIZE)[1] * size), [], lag=0, own=False, version=0, weights=weights,
                       candidate=lambda: list(weights))

    own(np.eye(SIZE)[0])
    assert v.host_agrees() and sideways().reason == "direction"
    for k in range(AGREEMENT_HISTORY):  # the host's own changes now point anywhere
        own(np.eye(SIZE)[2 + k % (SIZE - 2)] * (-1) ** k)
    assert not v.host_agrees()
    assert sideways(0.6).accepted
