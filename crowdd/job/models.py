"""Keras models from the job spec: an MLP (the paper's 784-100-10) and a small CNN."""

from __future__ import annotations

import keras

from crowdd.hyperparams import Job
from crowdd.manifest import Layout


def build_model(job: Job, layout: Layout) -> keras.Model:
    """A softmax classifier for ``layout``'s features; built (its variables exist)."""
    shape = tuple(layout.feature_shape)
    inputs = keras.Input(shape=shape, name="features")
    if job.model == "mlp":
        x = keras.layers.Flatten()(inputs) if len(shape) > 1 else inputs
        for i, units in enumerate(job.hidden):
            x = keras.layers.Dense(units, activation="relu", name=f"hidden{i}")(x)
    elif job.model == "cnn":
        x = keras.layers.Reshape(shape if len(shape) == 3 else (*shape, 1))(inputs)
        for i, filters in enumerate((16, 32)):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
            x = keras.layers.MaxPooling2D(2, padding="same")(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(job.hidden[0], activation="relu", name="hidden0")(x)
    else:  # validate_job rules this out
        raise ValueError(f"unknown model {job.model!r}")
    outputs = keras.layers.Dense(layout.num_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=f"crowdd_{job.model}")


def loss_function(job: Job) -> keras.losses.Loss:
    if job.loss == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy()
    raise ValueError(f"unknown loss {job.loss!r}")


__all__ = ["build_model", "loss_function"]
