"""A host's model file is checked without TensorFlow: safe mode, input shape, classes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from crowdd.errors import InputError
from crowdd.data.manifest import Layout
from crowdd.data.modelfile import check_model_file

LAYOUT = Layout(feature_shape=(8, 8), feature_dtype="uint8", scale=1 / 16, num_classes=10, train_count=10,
                test_count=2)


def layer(cls: str, module: str = "keras.layers", registered: str | None = None, **config: Any) -> dict[str, Any]:
    return {"module": module, "class_name": cls, "config": config, "registered_name": registered}


def sequential(*layers: dict[str, Any], shape: list[int | None] | None = None) -> dict[str, Any]:
    first = layer("InputLayer", batch_shape=[None, *(shape or [8, 8])])
    return {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": [first, *layers]}}


def save(path: Path, config: dict[str, Any], weights: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("metadata.json", "{}")
        if weights:
            z.writestr("model.weights.h5", b"\x89HDF")
    return path


def refused(path: Path, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern) as err:
        check_model_file(path, LAYOUT)
    assert err.value.field == "model_file" and str(path) in err.value.message


DENSE10 = layer("Dense", name="out", units=10, activation="softmax")


def test_a_fitting_model_is_described(tmp_path: Path) -> None:
    info = check_model_file(save(tmp_path / "m.keras", sequential(layer("Flatten"), DENSE10)), LAYOUT)
    assert info.input_shape == (8, 8) and info.output_units == 10 and info.output_activation == "softmax"
    assert info.has_weights
    flat = check_model_file(save(tmp_path / "c.keras", sequential(DENSE10, shape=[8, 8, 1]), weights=False), LAYOUT)
    assert flat.input_shape == (8, 8, 1) and not flat.has_weights  # a channel of 1: reshaped in the job


def test_functional_models_are_read_by_their_input_and_output_layers(tmp_path: Path) -> None:
    inp = {**layer("InputLayer", name="x", batch_shape=[None, 8, 8]), "name": "x"}
    out = {**layer("Dense", name="y", units=3, activation="softmax"), "name": "y"}
    config = {"module": "keras.src.models.functional", "class_name": "Functional",
              "config": {"name": "f", "layers": [inp, out], "input_layers": ["x", 0, 0], "output_layers": [["y", 0, 0]]}}
    refused(save(tmp_path / "f.keras", config), r"output layer has 3 units but the dataset has 10 classes")


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (sequential(layer("Lambda", function="lambda x: x"), DENSE10), r"Lambda layer .* safe mode"),
        (sequential(layer("MyLayer", module="mypackage.layers"), DENSE10), r"MyLayer from 'mypackage\.layers'"),
        (sequential(layer("Dense", registered="Custom>Dense", units=10), DENSE10), r"custom object 'Custom>Dense'"),
        (sequential(layer("Flatten"), DENSE10, shape=[28, 28]), r"inputs of shape \[28, 28\] but the dataset's samples are \[8, 8\]"),
        (sequential(layer("Flatten"), DENSE10, shape=[None, 8]), r"free dimensions"),
        (sequential(layer("Flatten"), layer("Dense", units=10, activation="linear")), r"activation is 'linear'.*softmax"),
        ({"module": "keras.layers", "class_name": "Dense", "config": {}}, r"holds a Dense, not a Sequential"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_with_the_reason(tmp_path: Path, config: dict[str, Any], pattern: str) -> None:
    refused(save(tmp_path / "m.keras", config), pattern)


def test_a_file_that_is_not_a_keras_model_is_refused(tmp_path: Path) -> None:
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"\x89HDF")
    refused(h5, r"must be a Keras 3 \.keras file")
    junk = tmp_path / "j.keras"
    junk.write_bytes(b"not a zip")
    refused(junk, r"not a readable \.keras file")
    empty = tmp_path / "e.keras"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("other.txt", "x")
    refused(empty, r"no config\.json inside")
