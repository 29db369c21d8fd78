"""crowdd.job.outer: the PS's merge rules on numpy arrays (TF-free)."""

from __future__ import annotations

import numpy as np
import pytest

from crowdd.job.outer import (
    DECAY_FROM, OUTER_LR, OUTER_MOMENTUM, choose_sync_every, effective_merge, lr_factor, lr_scale, nesterov,
    push_scale,
)


def test_push_scale_per_merge() -> None:
    assert push_scale("sum", 4) == 1.0
    assert push_scale("average", 4) == 0.25
    assert push_scale("nesterov", 4) == 0.25
    assert push_scale("average-sqrt-lr", 4) == 0.25
    assert push_scale("average", 0) == 1.0
    with pytest.raises(ValueError):
        push_scale("median", 2)


def test_first_nesterov_step_is_lr_times_one_plus_mu() -> None:
    d = np.array([1.0, -2.0], np.float32)
    m, step = nesterov(d, np.zeros(2, np.float32))
    np.testing.assert_allclose(m, d)
    np.testing.assert_allclose(step, OUTER_LR * (1 + OUTER_MOMENTUM) * d, rtol=1e-6)


def test_nesterov_matches_torch_sgd_on_the_negated_pseudo_gradient() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=5)
    ref_w, buf = w.copy(), np.zeros(5)
    m = np.zeros(5)
    for _ in range(6):
        delta = rng.normal(size=5) * 0.1
        # torch.optim.SGD(lr, momentum=mu, nesterov=True) on g = -delta
        g = -delta
        buf = OUTER_MOMENTUM * buf + g
        ref_w -= OUTER_LR * (g + OUTER_MOMENTUM * buf)
        m, step = nesterov(delta, m)
        w += step
    np.testing.assert_allclose(w, ref_w, rtol=1e-12)


def test_a_steady_change_is_amplified_by_lr_over_one_minus_mu() -> None:
    m = 0.0
    for _ in range(500):
        m, step = nesterov(1.0, m)
    assert step == pytest.approx(OUTER_LR * (1 + OUTER_MOMENTUM / (1 - OUTER_MOMENTUM)))


def test_a_single_trainer_never_gets_the_outer_optimizer() -> None:
    assert effective_merge("nesterov", 1) == "average"
    assert effective_merge("nesterov", 4) == "nesterov"
    assert effective_merge("sum", 1) == "sum"


def test_k_keeps_communication_a_small_share_of_a_round() -> None:
    # the MLP [100] (318 KB of fp32 weights), 7.6 ms a step at 0.4 CPU, 3 remote workers
    k50 = choose_sync_every(0.0076, 318_040, 50e6 / 8, 3)
    k10 = choose_sync_every(0.0076, 318_040, 10e6 / 8, 3)
    assert k50 == 201 and k10 == 1005
    assert choose_sync_every(0.0076, 318_040, 50e6 / 8, 0) == 10
    assert choose_sync_every(1e-6, 1 << 30, 1.0, 8) == 2000
    with pytest.raises(ValueError):
        choose_sync_every(0.01, 1, 0.0, 1)


def test_only_average_sqrt_lr_scales_the_trainers_learning_rate_by_sqrt_w() -> None:
    assert lr_scale("average-sqrt-lr", 4) == 2.0
    assert lr_scale("average-sqrt-lr", 9) == 3.0
    assert lr_scale("average-sqrt-lr", 1) == 1.0  # the host alone trains at the user's rate
    assert lr_scale("average-sqrt-lr", 0) == 1.0
    for merge in ("average", "sum", "nesterov"):
        assert lr_scale(merge, 4) == 1.0
    with pytest.raises(ValueError):
        lr_scale("median", 2)


def test_the_sqrt_factor_holds_for_the_first_half_then_falls_to_the_users_rate_at_the_end() -> None:
    assert DECAY_FROM == 0.5
    for p in (0.0, 0.25, 0.5):
        assert lr_factor("average-sqrt-lr", 4, p) == 2.0
    assert lr_factor("average-sqrt-lr", 4, 0.75) == pytest.approx(1.5)
    assert lr_factor("average-sqrt-lr", 4, 1.0) == pytest.approx(1.0)
    # out-of-range progress (a resumed run past its plan, a step count of 0) is clamped
    assert lr_factor("average-sqrt-lr", 4, 1.7) == pytest.approx(1.0)
    assert lr_factor("average-sqrt-lr", 4, -1.0) == 2.0
    factors = [lr_factor("average-sqrt-lr", 9, i / 100) for i in range(101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # never rises


def test_the_other_rules_and_a_lone_trainer_keep_the_users_rate_throughout() -> None:
    for p in (0.0, 0.6, 1.0):
        assert lr_factor("average-sqrt-lr", 1, p) == 1.0
        for merge in ("average", "sum", "nesterov"):
            assert lr_factor(merge, 4, p) == 1.0
    with pytest.raises(ValueError):
        lr_factor("median", 2, 0.5)
