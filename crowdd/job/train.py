"""One training round on a worker, and the model state only the host's coordinator holds.

TensorFlow traffic flows one way (``docs/security.md``): the coordinator holds every
parameter in its own memory (:class:`Params`), and a round is one scheduled function
``round(iterator, weights, slots, lr, k) -> change`` whose inputs the coordinator sends and
whose output it fetches. A worker never reads or writes anything of the host's: it takes
``k`` local steps (``model.stateless_call``) from the weights it was handed and returns the
difference. The coordinator checks that change (:mod:`crowdd.job.validate`) before any of it
touches the model, then merges it (:meth:`Params.apply`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from crowdd.hyperparams import Job
from crowdd.job.params import Params

#: what weights and weight changes travel as between the coordinator and a worker (the
#: coordinator keeps float32; optimizer slots travel as float32). A handed-out weight's
#: rounding error (2^-11 relative) is not accumulated: a worker returns the change from the
#: value it was handed.
WIRE_DTYPE = tf.float16
WIRE_NUMPY = np.float16
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7


def round_inputs(params: Params) -> tuple[list[Any], list[Any]]:
    """What a round is handed: the weights as WIRE_DTYPE, the optimizer slots as float32."""
    return ([tf.constant(w.astype(WIRE_NUMPY)) for w in params.weights], [tf.constant(s) for s in params.slots])


def local_update(job: Job, weights: list, slots: list, grads: list, lr=None) -> tuple[list, list]:
    """One step of the job's optimizer on tensor copies: ``(new weights, new slots)``, at the
    learning rate ``lr`` (a float32 tensor; default: the job's)."""
    if lr is None:
        lr = tf.constant(job.learning_rate, tf.float32)
    if job.optimizer == "sgd":
        return [w - lr * g for w, g in zip(weights, grads)], slots
    n = len(weights)
    m, v, t = slots[:n], slots[n : 2 * n], slots[2 * n] + 1.0
    m = [mi + (g - mi) * (1 - ADAM_BETA1) for mi, g in zip(m, grads)]
    v = [vi + (tf.square(g) - vi) * (1 - ADAM_BETA2) for vi, g in zip(v, grads)]
    lr_t = lr * tf.sqrt(1 - tf.pow(ADAM_BETA2, t)) / (1 - tf.pow(ADAM_BETA1, t))
    new = [w - lr_t * mi / (tf.sqrt(vi) + ADAM_EPSILON) for w, mi, vi in zip(weights, m, v)]
    return new, [*m, *v, t]


def make_round_fn(model, job: Job, loss_fn, regression: bool = False, flip_labels: frozenset[int] = frozenset(),
                  num_classes: int = 0):
    """``fn(iterator, weights, slots, lr, k) -> (weight change, slot change, loss_sum,
    correct, samples, worker_index)``: ``k`` local steps from the handed weights
    (``regression``: ``correct`` is the sum of absolute errors instead).

    The model's non-trainable values (a Normalization's statistics) are baked in as
    constants: the function captures nothing of the coordinator's, so a worker running it
    never needs a connection back. ``flip_labels`` (tests only, :mod:`crowdd.job.byzantine`):
    the data shards whose labels a bad worker trains on flipped.
    """
    fixed = [tf.constant(v.numpy()) for v in model.non_trainable_variables]
    flipped = tf.constant(sorted(flip_labels) or [-1], tf.int32)

    def local_steps(iterator, k, weights, slots, lr):
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        samples = tf.constant(0.0)
        widx = tf.constant(-1, tf.int32)
        for _ in tf.range(k):
            x, y, widx = next(iterator)
            if flip_labels:
                bad = tf.reduce_any(tf.equal(flipped, widx))
                y = tf.where(bad, num_classes - 1 - y, y)
            with tf.GradientTape() as tape:
                tape.watch(weights)
                probs, _ = model.stateless_call(weights, [tf.identity(f) for f in fixed], x, training=True)
                loss = loss_fn(y, probs)
            grads = tape.gradient(loss, weights)
            weights, slots = local_update(job, weights, slots, grads, lr)
            batch = tf.cast(tf.shape(y)[0], tf.float32)
            loss_sum += loss * batch
            if regression:
                correct += tf.reduce_sum(tf.abs(tf.reshape(probs, [-1]) - tf.reshape(y, [-1])))
            else:
                hits = tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), y)
                correct += tf.reduce_sum(tf.cast(hits, tf.float32))
            samples += batch
        return weights, slots, loss_sum, correct, samples, widx

    @tf.function
    def train_round(iterator, weights, slots, lr, k):
        start = [tf.cast(w, tf.float32) for w in weights]
        new_w, new_s, loss_sum, correct, samples, widx = local_steps(iterator, k, start, list(slots), lr)
        weight_change = [tf.cast(n - o, WIRE_DTYPE) for n, o in zip(new_w, start)]
        slot_change = [n - o for n, o in zip(new_s, slots)]
        return weight_change, slot_change, loss_sum, correct, samples, widx

    return train_round


__all__ = ["WIRE_DTYPE", "Params", "local_update", "make_round_fn", "round_inputs"]
