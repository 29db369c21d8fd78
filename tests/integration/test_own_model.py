"""A host's own Keras model: a small CNN with a Rescaling layer, fine-tuned from its saved
weights by a real host + worker, then loaded in a fresh Python on raw inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crowdd.datasets import convert
from crowdd.job import MODEL_FILE
from crowdd.job.local import run_cluster
from crowdd.modelfile import check_model_file

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
    assert done["test_accuracy"] >= pretrained - 0.05  # it started from the saved weights

    fresh = subprocess.run([sys.executable, "-c", PREDICT, done["model_path"], str(npz)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(done["test_accuracy"], abs=0.01)
