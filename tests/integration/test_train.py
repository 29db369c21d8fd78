"""crowdd.job.train: one round on a worker (``make_round_fn``) and the model the host's
coordinator holds (``Params``), run in this process.

There is no parameter server: the coordinator hands a round the weights (as WIRE_DTYPE) and
the optimizer slots, and the learning rate to step at; the round returns only the change its
``k`` local steps made. ``Params`` merges a (validated) change, and ``candidate`` says what a
merge would produce without making it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from crowdd.hyperparams import Job  # noqa: E402
from crowdd.job.models import build_model, loss_function  # noqa: E402
from crowdd.job.outer import OUTER_LR, OUTER_MOMENTUM  # noqa: E402
from crowdd.job.train import WIRE_DTYPE, Params, make_round_fn, round_inputs  # noqa: E402
from crowdd.data.manifest import Layout  # noqa: E402

LAYOUT = Layout(feature_shape=(4,), feature_dtype="float32", scale=1.0, num_classes=3, train_count=64, test_count=0)
BATCH = 8


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=BATCH).astype(np.int32)
    return x, y


def batches(worker: int = 0, y: np.ndarray | None = None) -> Any:
    """The same batch forever, as shard ``worker``'s iterator yields it: ``(x, y, worker)``."""
    x, y0 = data()
    labels = y0 if y is None else y
    return iter(tf.data.Dataset.from_tensors((x, labels, tf.constant(worker, tf.int32))).repeat())


def setup(optimizer: str = "sgd", lr: float = 0.3, flip: frozenset[int] = frozenset()) -> tuple[Job, Any, Params, Any]:
    job = Job(model="mlp", hidden=(8,), learning_rate=lr, batch_size=BATCH, optimizer=optimizer)
    tf.keras.utils.set_random_seed(1)
    model = build_model(job, LAYOUT)
    params = Params([v.numpy() for v in model.trainable_variables], job)
    loss_fn = loss_function(job, LAYOUT)
    return job, model, params, make_round_fn(model, job, loss_fn, flip_labels=flip, num_classes=LAYOUT.num_classes)


def run_round(fn: Any, params: Params, lr: float, k: int, it: Any = None) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    weights, slots = round_inputs(params)
    dw, ds, loss_sum, correct, samples, widx = fn(it if it is not None else batches(), weights, slots,
                                                 tf.constant(lr, tf.float32), tf.constant(k, tf.int32))
    return [d.numpy() for d in dw], [d.numpy() for d in ds], (loss_sum, correct, samples, widx)


def test_params_hand_out_wire_weights_and_float32_slots() -> None:
    _, model, params, _ = setup("adam")
    n = len(model.trainable_variables)
    assert len(params.slots) == 2 * n + 1  # m, v, and the step count
    weights, slots = round_inputs(params)
    assert [w.dtype for w in weights] == [WIRE_DTYPE] * n
    assert all(s.dtype == tf.float32 for s in slots) and len(slots) == 2 * n + 1
    for w, p in zip(weights, params.weights):
        np.testing.assert_array_equal(w.numpy(), p.astype(np.float16))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert params.shapes() == (shapes, shapes * 2 + [()])
    # a checkpoint's arrays load back
    arrays = [a + 1 for a in params.arrays()]
    params.load(arrays)
    for a, b in zip(params.arrays(), arrays):
        np.testing.assert_array_equal(a, b)


def test_a_round_returns_a_change_of_the_models_shapes_in_the_wire_dtype() -> None:
    _, model, params, fn = setup()
    before = [w.copy() for w in params.weights]
    dw, ds, (loss_sum, correct, samples, widx) = run_round(fn, params, 0.3, 3, batches(worker=2))
    assert [d.dtype for d in dw] == [np.float16] * len(params.weights)
    assert [d.shape for d in dw] == [w.shape for w in params.weights]
    assert ds == []  # sgd has no slots
    assert any(np.abs(d).max() > 0 for d in dw)
    assert float(samples) == 3 * BATCH and int(widx) == 2
    assert float(loss_sum) > 0 and 0 <= float(correct) <= 3 * BATCH
    for a, b in zip(params.weights, before):  # the round changed nothing of the coordinator's
        np.testing.assert_array_equal(a, b)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_a_round_captures_no_variable_of_the_coordinator() -> None:
    """The function a worker runs holds no handle to anything of the host's: no variable is
    captured (it could only be read over a connection back to the host)."""
    _, _, params, fn = setup("adam")
    weights, slots = round_inputs(params)
    concrete = fn.get_concrete_function(batches(), weights, slots, tf.constant(0.1, tf.float32),
                                        tf.constant(1, tf.int32))
    assert concrete.variables == ()
    assert all(c.dtype != tf.resource for c in concrete.captured_inputs)


def test_sgd_one_step_changes_the_weights_by_minus_lr_times_the_gradient() -> None:
    job, model, params, fn = setup()
    lr = 0.25
    dw, _, _ = run_round(fn, params, lr, 1)
    # the gradient at the weights as handed out (WIRE_DTYPE), on the same batch
    x, y = data()
    start = [tf.constant(w.astype(np.float16).astype(np.float32)) for w in params.weights]
    fixed = [tf.constant(v.numpy()) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(start)
        probs, _ = model.stateless_call(start, fixed, tf.constant(x), training=True)
        loss = loss_function(job, LAYOUT)(tf.constant(y), probs)
    grads = [g.numpy() for g in tape.gradient(loss, start)]
    assert any(np.abs(g).max() > 0 for g in grads)
    for d, g in zip(dw, grads):
        expected = -lr * g
        # fp16 rounds to 2^-11 relative; float32 (w - lr g) - w loses a little more near 0
        np.testing.assert_allclose(d.astype(np.float32), expected, rtol=2e-3, atol=2e-6)


def test_every_round_steps_at_the_rate_it_is_handed() -> None:
    _, _, params, fn = setup()
    at = run_round(fn, params, 0.3, 1)[0]
    doubled = run_round(fn, params, 0.6, 1)[0]
    assert any(np.abs(d).max() > 0 for d in at)
    for a, b in zip(at, doubled):
        np.testing.assert_allclose(b.astype(np.float32), 2 * a.astype(np.float32), rtol=2e-3, atol=1e-6)
    # a rate of 0 leaves the model where it was: the job's own rate is not used instead
    for d in run_round(fn, params, 0.0, 1)[0]:
        assert not np.any(d)


def test_adam_rounds_return_slot_changes_and_count_their_steps() -> None:
    _, _, params, fn = setup("adam", lr=0.01)
    dw, ds, (_, _, samples, _) = run_round(fn, params, 0.01, 2)
    assert [d.dtype for d in dw] == [np.float16] * len(params.weights)
    assert [s.shape for s in ds] == [s.shape for s in params.slots]
    assert all(s.dtype == np.float32 for s in ds)
    assert float(ds[-1]) == 2.0 and float(samples) == 2 * BATCH  # two steps taken
    n = len(params.weights)
    assert any(np.abs(m).max() > 0 for m in ds[:n]) and all(np.all(v >= 0) for v in ds[n : 2 * n])
    # adam's first step moves each weight by about lr (its normalized step)
    first = run_round(fn, params, 0.01, 1)[0]
    assert max(float(np.abs(d).max()) for d in first) == pytest.approx(0.01, rel=0.05)


def test_a_flipped_shard_trains_on_flipped_labels() -> None:
    """The test hook (crowdd.job.byzantine's flip-labels): the round flips the labels of the
    listed shards only, c -> classes - 1 - c."""
    _, _, params, fn = setup(flip=frozenset({2}))
    _, y = data()
    flipped = run_round(fn, params, 0.3, 1, batches(worker=2))[0]
    honest = run_round(fn, params, 0.3, 1, batches(worker=1))[0]
    _, _, params2, plain = setup()
    by_hand = run_round(plain, params2, 0.3, 1, batches(worker=2, y=LAYOUT.num_classes - 1 - y))[0]
    same = run_round(plain, params2, 0.3, 1, batches(worker=1))[0]
    for a, b in zip(flipped, by_hand):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    for a, b in zip(honest, same):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(flipped, honest))


def _change(params: Params, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.01, size=w.shape).astype(np.float16) for w in params.weights]


def test_apply_merges_scale_times_the_change_and_candidate_foresees_it() -> None:
    _, _, params, _ = setup("adam")
    start = [w.copy() for w in params.weights]
    slots0 = [s.copy() for s in params.slots]
    dw = _change(params, 1)
    ds = [np.full_like(s, 0.5) for s in params.slots]
    cand = params.candidate(dw, 0.25)
    for w, s in zip(params.weights, start):  # a candidate changes nothing
        np.testing.assert_array_equal(w, s)
    assert params.version == 0
    params.apply(dw, ds, 0.25)
    assert params.version == 1
    for w, s, d, c in zip(params.weights, start, dw, cand):
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, s + 0.25 * d.astype(np.float32), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(c, w)  # exactly what apply produced
    for s, s0 in zip(params.slots, slots0):
        np.testing.assert_allclose(s, s0 + 0.125)


def test_nesterov_merges_an_outer_momentum_step_and_candidate_foresees_it() -> None:
    job, model, _, _ = setup()
    params = Params([v.numpy() for v in model.trainable_variables], job, "nesterov")
    assert len(params.outer) == len(params.weights)
    assert len(params.arrays()) == 2 * len(params.weights)  # the momentum is checkpointed
    w0 = [w.copy() for w in params.weights]
    m: list[np.ndarray] = [np.zeros_like(w) for w in w0]
    expected: list[np.ndarray] = [w.copy() for w in w0]
    for seed in (1, 2, 3):
        dw = _change(params, seed)
        cand = params.candidate(dw, 0.5)
        outer_before = [o.copy() for o in params.outer]
        params.apply(dw, [], 0.5)
        for i, d in enumerate(dw):
            delta = 0.5 * d.astype(np.float32)
            m[i] = OUTER_MOMENTUM * m[i] + delta
            expected[i] = expected[i] + OUTER_LR * (delta + OUTER_MOMENTUM * m[i])
        for w, e, c, o, mi in zip(params.weights, expected, cand, params.outer, m):
            np.testing.assert_allclose(w, e, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(c, w, rtol=1e-6, atol=1e-8)  # what apply produced
            np.testing.assert_allclose(o, mi, rtol=1e-5, atol=1e-8)
        assert any(not np.array_equal(a, b) for a, b in zip(params.outer, outer_before))
    assert params.version == 3
