"""crowdd.job.judge: every change's one path into the model (TF-free)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from crowdd.hyperparams import Job
from crowdd.job.byzantine import BadWorkers
from crowdd.job.judge import ChangeDesk
from crowdd.job.params import Params
from crowdd.job.validate import Validator

TARGET = np.array([1.0, 2.0, 3.0], np.float32)


def loss_of(weights: list[np.ndarray]) -> float:
    return float(0.5 * np.sum(np.square(weights[0] - TARGET)))


def desk(optimizer: str = "sgd", bad: str = "") -> tuple[ChangeDesk, io.StringIO]:
    params = Params([np.zeros(3, np.float32)], Job(optimizer=optimizer))
    shapes = params.shapes()
    audit = io.StringIO()
    validator = Validator(shapes[0], shapes[1], loss_of, max_lag=8)
    from crowdd.job.byzantine import parse

    return ChangeDesk(params, validator, 0.5, bad=BadWorkers(parse(bad)), audit=audit), audit


def step(scale: float = 1.0) -> list[np.ndarray]:
    return [(TARGET * 0.1 * scale).astype(np.float16)]


def test_a_good_change_is_merged_at_the_merge_scale_and_audited() -> None:
    d, audit = desk()
    ruling = d.take(1, 0, step(), [])
    assert ruling.verdict.accepted and ruling.expel is None
    np.testing.assert_allclose(d.params.weights[0], TARGET * 0.05, rtol=1e-3)
    assert d.params.version == 1
    line = json.loads(audit.getvalue())
    assert line["slot"] == 1 and line["accepted"] and line["lag"] == 0
    assert d.summary(7)["changes"] == {"1": {"accepted": 1, "rejected": 0}} and d.summary(7)["held_back"] == 7


def test_a_rejected_change_touches_nothing_and_its_sender_is_expelled_in_the_end() -> None:
    d, _ = desk()
    before = [w.copy() for w in d.params.weights]
    rulings = [d.take(2, 0, [-a for a in step(5 + k)], []) for k in range(3)]  # far uphill, each a little different
    assert [r.verdict.accepted for r in rulings] == [False] * 3
    np.testing.assert_array_equal(d.params.weights[0], before[0])  # not even partly
    assert d.params.version == 0
    assert rulings[-1].expel is not None and "3 of its last 3" in rulings[-1].expel
    assert d.summary(0)["expelled"] == {"2": rulings[-1].expel}


def test_a_non_finite_change_expels_at_once_and_never_ends_the_run() -> None:
    d, _ = desk()
    ruling = d.take(3, 0, [np.array([np.nan, 0, 0], np.float16)], [])
    assert not ruling.verdict.accepted and ruling.verdict.fatal and ruling.expel is not None
    assert np.isfinite(d.params.weights[0]).all()


def test_the_hosts_own_change_is_never_expelled_and_anything_but_a_list_is_refused() -> None:
    d, _ = desk()
    assert d.take(0, 0, step(), []).verdict.accepted  # own: the reference
    ruling = d.take(0, 1, "not a change", [])
    assert not ruling.verdict.accepted and ruling.expel is None  # the coordinator decides (divergence)
    assert d.take(1, 1, {"a": 1}, []).verdict.reason == "form"


def test_the_test_hook_corrupts_only_its_slots_changes_where_they_arrive() -> None:
    d, audit = desk(bad="2:sign-flip")
    assert d.take(1, 0, step(), []).verdict.accepted
    assert not d.take(2, 1, step(5), []).verdict.accepted  # an honest change, flipped on arrival
    assert d.take(0, 1, step(), []).verdict.accepted  # slot 0 cannot be made bad


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_slot_changes_are_merged_with_the_weights(optimizer: str) -> None:
    d, _ = desk(optimizer)
    slots = [np.ones_like(s) for s in d.params.slots]
    assert d.take(1, 0, step(), slots).verdict.accepted
    for s in d.params.slots:
        np.testing.assert_allclose(s, 0.5)
