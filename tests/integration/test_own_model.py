"""A host's own Keras model: a small CNN with a Rescaling layer, fine-tuned from its saved
weights by a real host + worker, then loaded in a fresh Python on raw inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crowdd.data.datasets import convert
from crowdd.job import MODEL_FILE
from crowdd.testing.local_cluster import run_cluster
from crowdd.data.modelfile import check_model_file
from crowdd.testing.bounds import at_least

pytestmark = pytest.mark.slow

PREDICT = """
import sys, numpy as np, keras
model = keras.models.load_model(sys.argv[1])
with np.load(sys.argv[2]) as z:
    x, y = z["x_test"], z["y_test"]
print(float(np.mean(model.predict(x, verbose=0).argmax(-1) == y)))
"""


def test_own_cnn_with_rescaling_fine_tunes_and_predicts_on_raw_inputs(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.images[order].astype(np.int64), d.target[order]  # raw pixel values 0..16
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=y[1500:])
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),  # the dataset's samples are 8x8: a reshape is put in front
        keras.layers.Rescaling(1 / 16),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1500, :, :, None], y[:1500], epochs=3, verbose=0)
    pretrained = float(model.evaluate(x[1500:, :, :, None], y[1500:], verbose=0)[1])
    assert pretrained > 0.85
    path = tmp_path / "cnn.keras"
    model.save(path)

    prepared = convert(npz, tmp_path / "data")
    assert prepared.manifest.layout is not None
    info = check_model_file(path, prepared.manifest.layout)  # what the daemon checks, TF-free
    assert info.input_shape == (8, 8, 1) and info.output_units == 10 and info.has_weights

    member0 = tmp_path / "run" / "member0"
    member0.mkdir(parents=True)
    (member0 / MODEL_FILE).write_bytes(path.read_bytes())  # as the host daemon puts it there
    job = {"model": "file", "epochs": 1, "batch_size": 50, "learning_rate": 0.01}
    settings = {"steps_per_function": 10, "sync_every": 5, "threads": 1, "nice": 5}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings, timeout=300)
    done = result.done
    assert done is not None, result.events
    # 0.9125 against a bound of 0.866 in both of two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_least(done["test_accuracy"], pretrained - 0.05)  # it started from the saved weights

    fresh = subprocess.run([sys.executable, "-c", PREDICT, done["model_path"], str(npz)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(done["test_accuracy"], abs=0.01)


def digit_folder(root: Path, classes: dict[str, int], per_class: int = 120, size: int = 8) -> None:
    """scikit-learn's digits as PNG files, one folder per class (grayscale 0..255)."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    d = load_digits()
    for name, digit in classes.items():
        (root / name).mkdir(parents=True)
        imgs = d.images[d.target == digit][:per_class]
        for i, img in enumerate(imgs):
            px = np.round(img * 255 / 16).astype(np.uint8)[:, :, None]
            if size != 8:
                px = tf.cast(tf.image.resize(px, (size, size)), tf.uint8).numpy()
            (root / name / f"{i:03d}.png").write_bytes(tf.io.encode_png(px).numpy())


def test_an_image_folder_trains_the_hosts_cnn_and_the_model_reads_raw_pixels(tmp_path: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from crowdd.data.datasets import read_canonical

    folder = tmp_path / "shapes"
    digit_folder(folder, {"one": 1, "seven": 7, "zero": 0})
    (folder / "notes.txt").write_text("not an image, not a class")
    prepared = convert(folder, tmp_path / "data")
    layout = prepared.manifest.layout
    assert layout is not None
    assert layout.class_names == ("one", "seven", "zero") and layout.feature_shape == (8, 8, 1)
    assert layout.train_count + layout.test_count == 360 and layout.test_count == 72  # --test-fraction 0.2
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    path = tmp_path / "cnn.keras"
    model.save(path)  # untrained: the crowd trains it
    check_model_file(path, layout)
    member0 = tmp_path / "run" / "member0"
    member0.mkdir(parents=True)
    (member0 / MODEL_FILE).write_bytes(path.read_bytes())
    job = {"model": "file", "epochs": 8, "batch_size": 20, "learning_rate": 0.1}
    settings = {"steps_per_function": 10, "sync_every": 5, "threads": 1, "nice": 5}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings, timeout=300)
    done = result.done
    assert done is not None, result.events
    # 1.0 in both of two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_least(done["test_accuracy"], 0.9)
    card = __import__("json").loads(Path(done["card_path"]).read_text())
    assert card["output"]["classes"] == ["one", "seven", "zero"]

    raw = read_canonical(prepared.data_path, layout)  # the pixels as the PNG files hold them
    npz = tmp_path / "test.npz"
    np.savez(npz, x_test=raw.x_test, y_test=raw.y_test)
    fresh = subprocess.run([sys.executable, "-c", PREDICT, done["model_path"], str(npz)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(done["test_accuracy"], abs=0.01)


def test_image_folder_errors_name_the_file(tmp_path: Path) -> None:
    from crowdd.data.datasets import DatasetError, ImageOptions, load

    folder = tmp_path / "imgs"
    digit_folder(folder, {"a": 1, "b": 2}, per_class=5)
    digit_folder(tmp_path / "big", {"b": 2}, per_class=1, size=12)
    odd = folder / "b" / "zzz.png"
    (tmp_path / "big" / "b" / "000.png").rename(odd)
    with pytest.raises(DatasetError, match=rf"{odd}: 12x12 pixels but .*a/000\.png is 8x8; give --image-size"):
        load(folder)
    arrays = load(folder, images=ImageOptions(size=(8, 8), color="rgb"))
    assert arrays.x_train.shape[1:] == (8, 8, 3) and arrays.class_names == ("a", "b")
    odd.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=rf"{odd}: not a readable PNG or JPEG image"):
        load(folder)
