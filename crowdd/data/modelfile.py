"""A host's own Keras model file, checked without TensorFlow (the daemon never imports it).

A ``.keras`` file is a zip holding ``config.json`` (the architecture) and, when saved with
them, the weights (fine-tuning starts from them). This module reads the architecture only:
it refuses what Keras' safe mode would refuse (a ``Lambda`` layer, custom code) and checks
the model against the dataset — its input shape, and a softmax output with one unit per
class — naming what does not fit. The job loads it with ``safe_mode=True``.
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.errors import InputError
from crowdd.data.manifest import Layout

MAX_CONFIG = 16 << 20
FIELD = "model_file"


@dataclass(frozen=True)
class ModelInfo:
    """What the file says about the model: the input shape (without the batch), the output
    units and activation when the last layer tells them."""

    input_shape: tuple[int | None, ...]
    output_units: int | None
    output_activation: str | None
    has_weights: bool


def _fail(path: Path, message: str) -> InputError:
    return InputError(f"{path}: {message}", field=FIELD)


def read_config(path: Path) -> tuple[dict[str, Any], bool]:
    """The model's ``config.json`` and whether the file carries weights."""
    if path.suffix != ".keras":
        raise _fail(path, "a model file must be a Keras 3 .keras file (model.save('model.keras'))")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "config.json" not in names:
                raise _fail(path, "not a Keras 3 model file (no config.json inside)")
            if z.getinfo("config.json").file_size > MAX_CONFIG:
                raise _fail(path, "config.json is too large")
            raw = z.read("config.json")
    except InputError:
        raise
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _fail(path, f"not a readable .keras file ({exc})") from None
    try:
        config = json.loads(raw)
    except ValueError:
        raise _fail(path, "config.json is not JSON") from None
    if not isinstance(config, dict):
        raise _fail(path, "config.json is not an object")
    return config, "model.weights.h5" in names


def _objects(obj: Any) -> Iterator[dict[str, Any]]:
    """Every serialized Keras object (a dict with a class_name) in the config, depth first."""
    if isinstance(obj, dict):
        if "class_name" in obj:
            yield obj
        for v in obj.values():
            yield from _objects(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _objects(v)


def check_safe(path: Path, config: dict[str, Any]) -> None:
    """Refuse what Keras' safe mode refuses: Lambda layers and anything not built into Keras."""
    for obj in _objects(config):
        name = obj.get("class_name")
        if name == "__keras_tensor__":
            continue
        if name == "Lambda":
            raise _fail(path, "has a Lambda layer (arbitrary code); crowdd loads models in Keras' safe mode: "
                              "replace it with built-in layers")
        module = obj.get("module")
        registered = obj.get("registered_name")
        if isinstance(module, str) and not (module == "keras" or module.startswith("keras.")):
            raise _fail(path, f"uses {name} from {module!r}, not a built-in Keras object; crowdd loads models "
                              "in Keras' safe mode, without custom code")
        if isinstance(registered, str) and ">" in registered:
            raise _fail(path, f"uses the custom object {registered!r}; crowdd loads models in Keras' safe mode, "
                              "without custom code")


def _layers(config: dict[str, Any]) -> list[dict[str, Any]]:
    layers = (config.get("config") or {}).get("layers")
    return [x for x in layers if isinstance(x, dict)] if isinstance(layers, list) else []


def _ref_name(ref: Any) -> str | None:
    """``["name", 0, 0]`` or ``[["name", 0, 0]]`` → "name" (only a single input/output)."""
    if isinstance(ref, list) and ref and isinstance(ref[0], list):
        ref = ref[0] if len(ref) == 1 else None
    return ref[0] if isinstance(ref, list) and ref and isinstance(ref[0], str) else None


def describe_model(path: Path, config: dict[str, Any], has_weights: bool) -> ModelInfo:
    kind = config.get("class_name")
    if kind not in ("Sequential", "Functional", "Model"):
        raise _fail(path, f"holds a {kind}, not a Sequential or Functional model")
    layers = _layers(config)
    inner = config.get("config") or {}
    if kind == "Sequential":
        first = layers[0] if layers else {}
        last = layers[-1] if layers else {}
    else:
        by_name = {(x.get("config") or {}).get("name", x.get("name")): x for x in layers}
        first = by_name.get(_ref_name(inner.get("input_layers"))) or {}
        last = by_name.get(_ref_name(inner.get("output_layers"))) or {}
        if not first or not last:
            raise _fail(path, "the model must have exactly one input and one output")
    cfg = first.get("config") or {}
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape is None:
        shape = (first.get("build_config") or {}).get("input_shape")
    if not isinstance(shape, list) or len(shape) < 2:
        raise _fail(path, "cannot tell the model's input shape (start it with keras.Input(shape=...))")
    out_cfg = last.get("config") or {}
    units = out_cfg.get("units") if last.get("class_name") == "Dense" else None
    activation = out_cfg.get("activation") if last.get("class_name") == "Dense" else None
    if last.get("class_name") == "Softmax" or (last.get("class_name") == "Activation"
                                               and out_cfg.get("activation") == "softmax"):
        activation = "softmax"
    return ModelInfo(tuple(shape[1:]), units if isinstance(units, int) else None,
                     activation if isinstance(activation, str) else None, has_weights)


def check_fits(path: Path, info: ModelInfo, layout: Layout) -> None:
    """The model against the dataset: same number of input features (a reshape is fine) and
    a softmax output of one unit per class."""
    want = tuple(layout.feature_shape)
    if any(d is None for d in info.input_shape):
        raise _fail(path, f"the model's input shape {list(info.input_shape)} has free dimensions; the dataset's "
                          f"samples are {list(want)}")
    have = tuple(int(d) for d in info.input_shape if d is not None)
    if math.prod(have) != math.prod(want) or (have != want and tuple(d for d in have if d != 1)
                                                  != tuple(d for d in want if d != 1)):
        raise _fail(path, f"the model takes inputs of shape {list(have)} but the dataset's samples are "
                          f"{list(want)}")
    if layout.task == "regression":
        if info.output_units is not None and info.output_units != 1:
            raise _fail(path, f"the model's output layer has {info.output_units} units; a regression model "
                              "predicts one number (Dense(1))")
        if info.output_activation == "softmax":
            raise _fail(path, "the model ends in a softmax; a regression model predicts a number (Dense(1))")
        return
    if info.output_units is not None and info.output_units != layout.num_classes:
        raise _fail(path, f"the model's output layer has {info.output_units} units but the dataset has "
                          f"{layout.num_classes} classes")
    if info.output_activation is not None and info.output_activation != "softmax":
        raise _fail(path, f"the model's output activation is {info.output_activation!r}; crowdd trains "
                          "classifiers on probabilities: end with a softmax (activation='softmax')")


def check_model_file(path: Path, layout: Layout) -> ModelInfo:
    """Everything the daemon can check about a host's model file, without TensorFlow."""
    config, has_weights = read_config(path)
    check_safe(path, config)
    info = describe_model(path, config, has_weights)
    check_fits(path, info, layout)
    return info


__all__ = ["ModelInfo", "check_fits", "check_model_file", "check_safe", "describe_model", "read_config"]
