"""The run's health checks and the advice a diverged run gives (TF-free)."""

from __future__ import annotations

import numpy as np

from crowdd.job.health import Diverged, all_finite, divergence_message, finite


def test_a_loss_that_is_not_a_number_is_not_finite() -> None:
    assert finite(0.5) and finite(np.float32(3))
    assert not finite(float("nan")) and not finite(np.float32("inf")) and not finite(None)


def test_weights_with_one_nan_are_not_finite() -> None:
    assert all_finite([np.zeros(3), np.ones((2, 2))])
    assert not all_finite([np.zeros(3), np.array([[1.0, np.nan]])])


def test_the_advice_names_the_step_and_a_lower_learning_rate() -> None:
    assert divergence_message(120, 0.5) == (
        "loss diverged at step 120; lower the learning rate (e.g. --lr 0.05) or scale the features"
    )
    assert Diverged(7, 50.0).step == 7 and "--lr 5)" in str(Diverged(7, 50.0))
