"""crowdd.job.train: the scheduled training function, run in this process on plain variables.

The trainers' learning rate lives in a variable (on the PS in a real job) that every round
reads, so the host can change it as the run goes (crowdd.job.outer.lr_factor).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from crowdd.hyperparams import Job  # noqa: E402
from crowdd.job.models import build_model, loss_function  # noqa: E402
from crowdd.job.train import TrainState, make_train_fn  # noqa: E402
from crowdd.manifest import Layout  # noqa: E402

LAYOUT = Layout(feature_shape=(4,), feature_dtype="float32", scale=1.0, num_classes=3, train_count=64, test_count=0)


def batches() -> Any:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=8).astype(np.int32)
    return iter(tf.data.Dataset.from_tensors((x, y, tf.constant(0, tf.int32))).repeat())


def one_step_change(lr: float | None) -> list[np.ndarray]:
    """The change one step (pushed at 1/2) makes to a fresh model, the state's rate set to ``lr``."""
    job = Job(model="mlp", hidden=(8,), learning_rate=0.3, batch_size=8)
    tf.keras.utils.set_random_seed(1)
    state = TrainState(build_model(job, LAYOUT), job, "average-sqrt-lr")
    assert float(state.learning_rate.numpy()) == pytest.approx(0.3)  # the job's rate until the host sets one
    assert all(v is not state.learning_rate for v in state.variables())  # not checkpointed: it follows from the steps done
    if lr is not None:
        state.learning_rate.assign(lr)
    before = [w.numpy().copy() for w in state.weights]
    train = make_train_fn(state, loss_function(job, LAYOUT), sync_every=1, push_scale=0.5)
    _loss, _correct, samples, _widx = train(batches(), 1)
    assert float(samples) == 8
    return [w.numpy() - b for w, b in zip(state.weights, before)]


def test_every_round_steps_at_the_rate_the_variable_holds() -> None:
    at_job_rate = one_step_change(None)
    doubled = one_step_change(0.6)
    assert any(np.abs(d).max() > 0 for d in at_job_rate)
    for a, b in zip(at_job_rate, doubled):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-4, atol=1e-7)
    # a rate of 0 leaves the model where it was: the job's own rate is not used instead
    for d in one_step_change(0.0):
        assert not np.any(d)
