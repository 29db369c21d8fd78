"""The scheduled training function: Downpour-style local steps on copies of the PS variables.

Each call reads the parameter server's variables once per ``sync_every`` steps, takes that
many local steps on tensor copies (``model.stateless_call``), then pushes the accumulated
change with ``assign_add``. This keeps the per-step cost close to a local loop while the
updates stay asynchronous across workers.
"""

from __future__ import annotations

import tensorflow as tf

from crowdd.hyperparams import Job
from crowdd.job.outer import nesterov

#: what weights and weight changes travel as between a worker and the PS (the PS keeps
#: float32; optimizer slots travel as float32). A pulled weight's rounding error (2^-11
#: relative) is not accumulated: a worker pushes the change from the value it pulled.
WIRE_DTYPE = tf.float16
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-7


class TrainState:
    """Model and optimizer state; create it inside ``strategy.scope()`` to live on the PS."""

    def __init__(self, model, job: Job, merge: str = "average") -> None:
        self.model = model
        self.job = job
        self.merge = merge
        self.weights = [v.value for v in model.trainable_variables]
        self.slots: list[tf.Variable] = []
        # the trainers' learning rate, on the PS: the host sets it as the run goes
        # (crowdd.job.outer.lr_factor); every round reads it. Not checkpointed: it follows
        # from the steps done.
        self.learning_rate = tf.Variable(float(job.learning_rate), trainable=False, dtype=tf.float32,
                                         name="learning_rate")
        # the outer optimizer's momentum, one per weight, on the PS (merge "nesterov")
        self.outer: list[tf.Variable] = [
            tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False, name=f"outer_m{i}")
            for i, w in enumerate(self.weights)
        ] if merge == "nesterov" else []
        if job.optimizer == "adam":
            for i, w in enumerate(self.weights):
                self.slots.append(tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False, name=f"adam_m{i}"))
            for i, w in enumerate(self.weights):
                self.slots.append(tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False, name=f"adam_v{i}"))
            self.slots.append(tf.Variable(0.0, trainable=False, name="adam_t"))

    def variables(self) -> list:
        """Everything a checkpoint holds."""
        return [*self.weights, *self.slots, *self.outer]


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


def make_train_fn(state: TrainState, loss_fn, sync_every: int, push_scale: float = 1.0, regression: bool = False):
    """``fn(iterator, n) -> (loss_sum, correct, samples, worker_index)`` for ``n`` steps
    (``regression``: ``correct`` is the sum of absolute errors instead).

    ``push_scale`` multiplies each pushed change: 1 adds every worker's whole change (Downpour
    SGD, the paper's asynchronous updates); 1/W averages the W workers' changes (model
    averaging: stable at high learning rates, where W summed changes overshoot). With
    ``state.outer`` (merge ``nesterov``) the scaled change of the weights goes through the
    outer Nesterov optimizer (:func:`crowdd.job.outer.nesterov`) instead.
    """
    model = state.model
    job = state.job
    variables = [*state.weights, *state.slots]  # what a worker reads and pushes to
    outer = state.outer
    nw = len(state.weights)
    fixed = [v.value for v in model.non_trainable_variables]
    k_max = int(sync_every)

    def local_steps(iterator, k, weights, slots, lr):
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        samples = tf.constant(0.0)
        widx = tf.constant(-1, tf.int32)
        for _ in tf.range(k):
            x, y, widx = next(iterator)
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

    def narrow(x, weight: bool):
        return tf.cast(x, WIRE_DTYPE) if weight and WIRE_DTYPE != tf.float32 else x

    def widen(x):
        return tf.cast(x, tf.float32) if x.dtype != tf.float32 else x

    def pull(var, weight: bool):
        """The PS's value, sent as WIRE_DTYPE (cast on the PS, widened here)."""
        with tf.device(var.device):
            value = narrow(var.read_value(), weight)
        return tf.identity(widen(value))

    def push(var, delta, weight: bool):
        """Add ``delta`` on the PS, sent as WIRE_DTYPE (narrowed here, widened on the PS)."""
        small = narrow(delta, weight)
        with tf.device(var.device):
            var.assign_add(widen(small))

    @tf.function
    def train(iterator, n: int):
        """``n`` is a Python int: the sync rounds unroll, so no PS access sits in a tf loop."""
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        samples = tf.constant(0.0)
        widx = tf.constant(-1, tf.int32)
        rounds = [k_max] * (n // k_max) + ([n % k_max] if n % k_max else [])
        for k in rounds:
            start = [pull(v, i < nw) for i, v in enumerate(variables)]
            lr = pull(state.learning_rate, False)
            weights, slots, ls, c, s, widx = local_steps(iterator, tf.constant(k), start[:nw], start[nw:], lr)
            for i, (var, new, old) in enumerate(zip(variables, [*weights, *slots], start)):
                delta = (new - old) * push_scale if push_scale != 1.0 else new - old
                if outer and i < nw:
                    # DiLoCo's outer Nesterov step on the PS (crowdd.job.outer); the momentum
                    # is read and written without a lock, as the weights are (Hogwild)
                    with tf.device(var.device):
                        m, step = nesterov(widen(narrow(delta, True)), outer[i].read_value())
                        outer[i].assign(m)
                        var.assign_add(step)
                else:
                    push(var, delta, i < nw)
            loss_sum += ls
            correct += c
            samples += s
        return loss_sum, correct, samples, widx

    return train


__all__ = ["TrainState", "local_update", "make_train_fn"]
