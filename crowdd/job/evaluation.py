"""The coordinator's evaluations: the model as it is now, on the test split.

Each evaluation writes its figures to TensorBoard (scalars, without the tensorboard
package), emits an ``eval`` event and is kept for the model card. The clock it keeps tells
the events how long training has run and how much of that went to evaluating.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from crowdd.job.events import EventWriter
from crowdd.job.health import Diverged, finite
from crowdd.job.params import Params

BATCH = 2500


def scalar(tag: str, value: float) -> None:
    """A TensorBoard scalar without the tensorboard package (``tf.summary.scalar`` needs it)."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=meta)


class Evaluation:
    """Evaluates ``model`` (loaded from ``params`` first) on ``x_test``/``y_test``."""

    def __init__(self, model: Any, params: Params, loss_fn: Any, test: tuple[Any, Any], regression: bool,
                 writer: Any, events: EventWriter, learning_rate: float) -> None:
        self.model = model
        self.params = params
        self.loss_fn = loss_fn
        self.x_test, self.y_test = test
        self.regression = regression
        self.writer = writer
        self.events = events
        self.learning_rate = learning_rate
        # a compiled forward pass: Keras' predict() costs several times more per evaluation
        self.forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self.done: list[dict[str, Any]] = []  # every evaluation, for the model card
        self.train_t0 = self.last = time.monotonic()
        self.eval_s = 0.0

    def start_clock(self) -> None:
        """Training begins now."""
        self.train_t0 = self.last = time.monotonic()

    def __call__(self, epoch: int, step: int) -> dict[str, float]:
        t_eval = time.monotonic()
        for var, value in zip(self.model.trainable_variables, self.params.weights):
            var.assign(value)
        x_test, y_test = self.x_test, self.y_test
        probs = np.concatenate([self.forward(x_test[i : i + BATCH]).numpy() for i in range(0, len(x_test), BATCH)])
        test_loss = float(self.loss_fn(y_test, probs))
        if not finite(test_loss):
            raise Diverged(step, self.learning_rate)
        metrics: dict[str, Any]
        if self.regression:
            err = np.asarray(probs, np.float64).reshape(-1) - y_test.astype(np.float64)
            metrics = {"test_mse": float(np.mean(err**2)), "test_mae": float(np.mean(np.abs(err)))}
        else:
            metrics = {"test_accuracy": float(np.mean(np.argmax(probs, axis=-1) == y_test))}
        with self.writer.as_default(step=step):
            for key, value in metrics.items():
                scalar(key.replace("_", "/", 1), value)
            scalar("test/loss", test_loss)
        now = time.monotonic()
        self.eval_s += now - t_eval
        self.last = now
        # train_seconds: since the training loop began (evaluations included), for time-to-accuracy
        self.events.emit("eval", epoch=epoch, step=step, test_loss=test_loss, **metrics,
                         train_seconds=round(now - self.train_t0, 3), eval_seconds=round(self.eval_s, 3))
        self.done.append({"epoch": epoch, "step": step, "test_loss": test_loss, **metrics,
                          "time": round(time.time(), 3)})
        return {"test_loss": test_loss, **metrics}
