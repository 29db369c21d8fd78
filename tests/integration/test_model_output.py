"""The model a host gets: it takes raw inputs, scores as the run reported in a fresh Python,
and comes with a model card (real job processes on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crowdd.data.datasets import convert
from crowdd.testing.local_cluster import run_cluster
from crowdd.data.manifest import Manifest
from crowdd.testing.bounds import at_least, at_most

pytestmark = pytest.mark.slow

PREDICT = """
import sys, numpy as np, keras
model = keras.models.load_model(sys.argv[1])
with np.load(sys.argv[2]) as z:
    x, y = z["x_test"], z["y_test"]
print(float(np.mean(model.predict(x, verbose=0).argmax(-1) == y)))
"""


def test_the_saved_model_predicts_on_raw_inputs_as_reported_and_has_a_card(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.images[order].astype(np.int64), d.target[order]  # raw pixel values 0..16, never scaled
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=y[1500:])
    prepared = convert(npz, tmp_path / "data")
    assert prepared.manifest.layout is not None and prepared.manifest.layout.scale == pytest.approx(1 / 16)
    job = {"epochs": 4, "batch_size": 32, "learning_rate": 0.3}
    settings = {"steps_per_function": 20, "sync_every": 5, "threads": 1, "nice": 5}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings, timeout=300)
    done = result.done
    assert done is not None, result.events
    # 0.9697 in both of two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_least(done["test_accuracy"], 0.8)

    fresh = subprocess.run([sys.executable, "-c", PREDICT, done["model_path"], str(npz)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(done["test_accuracy"], abs=0.01)

    card = json.loads(Path(done["card_path"]).read_text())
    manifest = Manifest.from_json(prepared.manifest_path.read_bytes())
    assert card["dataset"]["digest"] == manifest.digest() and card["dataset"]["test_records"] == len(y) - 1500
    assert card["output"]["classes"] == [str(i) for i in range(10)]
    assert card["input"] == {"shape": [8, 8], "raw": True, "note": card["input"]["note"]}
    assert card["hyperparameters"]["learning_rate"] == 0.3 and card["plan"]["sync_every"] == 5
    assert [e["epoch"] for e in card["evaluations"]] == [1, 2, 3, 4]
    assert card["test_accuracy"] == done["test_accuracy"] and card["steps"] == done["steps"]
    assert card["seconds"] > 0 and card["stopped_early"] is False
    assert "keras.models.load_model" in card["usage"] and done["model_path"] in card["usage"]


def test_a_regression_target_trains_the_mlp_preset_and_reports_mae(tmp_path: Path) -> None:
    """scikit-learn's diabetes (integer targets 25..346) as a regression, not 347 classes."""
    from sklearn.datasets import load_diabetes

    from crowdd.data.datasets import read_canonical

    d = load_diabetes()
    csv = tmp_path / "diabetes.csv"
    np.savetxt(csv, np.column_stack([d.data, d.target]), delimiter=",", fmt="%.8g",
               header=",".join([*d.feature_names, "progression"]), comments="")
    prepared = convert(csv, tmp_path / "data", label="progression", task="regression")
    layout = prepared.manifest.layout
    assert layout is not None and layout.task == "regression" and layout.num_classes == 1
    # 40 epochs: the test MAE is lowest within the first ~10 and creeps up after (353 training
    # rows); at 150 epochs runs ended anywhere in 48..62, at 40 in 51..53 (the parameter server);
    # with the one-way coordinator, five runs of this test (2026-12-07, `pytest -s` prints it):
    # 49.3, 46.9, 46.5, 47.7, 49.1. The bound sits ~6 above the worst; predicting the mean: ~64
    job = {"epochs": 40, "batch_size": 20, "learning_rate": 0.05, "hidden": [32]}
    settings = {"steps_per_function": 20, "sync_every": 5, "threads": 1, "nice": 5}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings, timeout=300)
    done = result.done
    assert done is not None, result.events
    print(f"\ntest MAE {done['test_mae']:.1f}")
    assert "test_accuracy" not in done, done
    # 50.74 and 47.00 in two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_most(done["test_mae"], 55, "test_mae")
    assert done["test_mse"] > done["test_mae"]
    evals = [e for e in result.events if e["event"] == "eval"]
    assert evals and all("test_mae" in e and "test_mse" in e for e in evals)
    progress = [e for e in result.events if e["event"] == "progress"]
    assert progress and all("mae" in e and "accuracy" not in e for e in progress)

    raw = read_canonical(prepared.data_path, layout)
    npz = tmp_path / "test.npz"
    np.savez(npz, x_test=raw.x_test, y_test=raw.y_test)
    script = ("import sys, numpy as np, keras\nz = np.load(sys.argv[2])\n"
              "p = keras.models.load_model(sys.argv[1]).predict(z['x_test'], verbose=0)[:, 0]\n"
              "print(float(np.mean(np.abs(p - z['y_test']))))\n")
    fresh = subprocess.run([sys.executable, "-c", script, done["model_path"], str(npz)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(done["test_mae"], abs=0.01)
    card = json.loads(Path(done["card_path"]).read_text())
    assert card["output"]["kind"] == "regression" and card["test_mae"] == done["test_mae"]
