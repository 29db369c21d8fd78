"""Keras models from the job spec: an MLP (the paper's 784-100-10) and a small CNN.

Every model starts by subtracting the training set's per-feature mean (``center``, computed
by the host with :func:`crowdd.job.data.train_mean`): zero-mean inputs are the classic
conditioning fix for SGD (LeCun et al., "Efficient BackProp", 1998, section 4.3). On
Fashion-MNIST it is worth about two points of test accuracy at the paper's learning rate 0.5
(docs/accuracy.md). The same layer also applies the dataset's ``scale`` (1/255 for pixels),
so the model takes the features exactly as the user gave them: ``model.keras`` predicts on
raw inputs, with nothing to multiply first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras
import numpy as np

from crowdd.hyperparams import Job
from crowdd.job import MODEL_FILE
from crowdd.data.manifest import Layout


def build_model(
    job: Job, layout: Layout, center: np.ndarray | None = None, target: tuple[float, float] = (0.0, 1.0),
    variance: np.ndarray | None = None,
) -> keras.Model:
    """A softmax classifier for ``layout``'s features; built (its variables exist).

    ``center``: per-feature means of the raw features (shape ``layout.feature_shape``),
    subtracted first, then the difference is multiplied by ``layout.scale``; None applies the
    scale alone. ``variance``: per-feature variances of the raw features (float data): each
    feature is then standardized instead of multiplied by ``layout.scale`` — unscaled
    everyday data (a CSV of measurements in different units) trains at the default learning
    rate; a feature that never varies is left unscaled. ``target``: a regression target's mean and standard deviation: the last
    layer predicts in standard deviations, a constant layer after it turns that into the
    target's units.
    """
    shape = tuple(layout.feature_shape)
    if job.model == "file":
        return load_host_model(Path(MODEL_FILE), layout)
    inputs = keras.Input(shape=shape, name="features")
    x = inputs
    mean = np.zeros(shape, np.float32) if center is None else np.asarray(center, np.float32)
    if mean.shape != shape:
        raise ValueError(f"center has shape {mean.shape}, the features {shape}")
    # (x - mean) / sqrt(variance) = (x - mean) * scale. Constants, not variables: nothing for
    # the coordinator to hold or train.
    if variance is None:
        spread = np.full(shape, (1.0 / float(layout.scale)) ** 2, np.float32)
    else:
        spread = np.asarray(variance, np.float32)
        if spread.shape != shape:
            raise ValueError(f"variance has shape {spread.shape}, the features {shape}")
        spread = np.where(spread > 1e-12, spread, 1.0).astype(np.float32)
    x = keras.layers.Normalization(
        axis=tuple(range(1, len(shape) + 1)), mean=mean, variance=spread, name="center"
    )(x)
    if job.model == "mlp":
        x = keras.layers.Flatten()(x) if len(shape) > 1 else x
        for i, units in enumerate(job.hidden):
            x = keras.layers.Dense(units, activation="relu", name=f"hidden{i}")(x)
    elif job.model == "cnn":
        x = keras.layers.Reshape(shape if len(shape) == 3 else (*shape, 1))(x)
        for i, filters in enumerate((16, 32)):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
            x = keras.layers.MaxPooling2D(2, padding="same")(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(job.hidden[0], activation="relu", name="hidden0")(x)
    else:  # validate_job rules this out
        raise ValueError(f"unknown model {job.model!r}")
    if layout.task == "regression":
        t_mean, t_std = target
        z = keras.layers.Dense(1, name="target_z")(x)
        outputs = keras.layers.Rescaling(scale=float(t_std), offset=float(t_mean), name="target")(z)
        return keras.Model(inputs, outputs, name=f"crowdd_{job.model}_regression")
    outputs = keras.layers.Dense(layout.num_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=f"crowdd_{job.model}")


def load_host_model(path: Path, layout: Layout) -> keras.Model:
    """The host's own model (Keras safe mode: no Lambda, no custom code), its weights kept
    (fine-tuning), fed the raw features; a reshape in front when only the shape's 1s differ.
    Raises ValueError naming what does not fit the dataset."""
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    shape = tuple(layout.feature_shape)
    have = tuple(model.input_shape[1:])
    out = tuple(model.output_shape[1:])
    if layout.task == "regression" and out != (1,):
        raise ValueError(f"the model's output shape is {list(out)}; a regression model predicts one number")
    if layout.task != "regression" and out != (layout.num_classes,):
        raise ValueError(f"the model's output shape is {list(out)}; the dataset has {layout.num_classes} classes")
    if have == shape:
        return model
    if math.prod(d or 0 for d in have) != math.prod(shape):
        raise ValueError(f"the model takes inputs of shape {list(have)} but the dataset's samples are {list(shape)}")
    inputs = keras.Input(shape=shape, name="features")
    return keras.Model(inputs, model(keras.layers.Reshape(have)(inputs)), name="crowdd_file")


def loss_function(job: Job, layout: Layout | None = None, target_std: float = 1.0) -> Any:
    """``loss(y, predictions)``: cross-entropy for classes; for a regression target the mean
    squared error in the target's standard deviations (well-conditioned whatever its units)."""
    if layout is not None and layout.task == "regression":
        import tensorflow as tf

        inv = 1.0 / float(target_std)

        def mse_z(y: Any, pred: Any) -> Any:
            y = tf.reshape(tf.cast(y, tf.float32), [-1, 1])
            return tf.reduce_mean(tf.square((tf.reshape(pred, [-1, 1]) - y) * inv))

        return mse_z
    if job.loss == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy()
    raise ValueError(f"unknown loss {job.loss!r}")


__all__ = ["build_model", "load_host_model", "loss_function"]
