"""A run whose loss stops being a number ends cleanly: the advice, the last finite checkpoint,
no model of NaNs, and nothing left running (real job processes on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from crowdd.data.datasets import ArraySet, convert
from crowdd.testing.local_cluster import run_cluster
from crowdd.testing.bounds import at_least

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def unscaled(n: int = 600) -> ArraySet:
    """Two classes told apart by features in the tens of thousands (a CSV nobody scaled)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 8)) * 30_000 + y[:, None] * 20_000
    return ArraySet(x[:500], y[:500], x[500:], y[500:])


def unscaling_model(path: Path, features: int, classes: int) -> None:
    """A host's own model that feeds the raw features straight in (no scaling layer)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.Sequential([keras.Input((features,)), keras.layers.Dense(64, activation="relu"),
                      keras.layers.Dense(classes, activation="softmax")]).save(path)


def test_a_diverging_run_ends_with_the_advice_and_a_finite_checkpoint(tmp_path: Path) -> None:
    from crowdd.job import MODEL_FILE

    prepared = convert(unscaled(), tmp_path / "data")
    (tmp_path / "run" / "member0").mkdir(parents=True)
    unscaling_model(tmp_path / "run" / "member0" / MODEL_FILE, 8, 2)
    job = {"model": "file", "epochs": 50, "batch_size": 20, "learning_rate": 50.0}
    settings = {"steps_per_function": 5, "sync_every": 5, "threads": 1, "nice": 5, "checkpoint_secs": 0.1}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings,
                         timeout=300)
    error = result.error
    assert error is not None, [e["event"] for e in result.events]
    assert result.done is None
    assert error["message"].startswith("loss diverged at step "), error
    assert "lower the learning rate (e.g. --lr 5)" in error["message"]
    assert "or scale the features" in error["message"]
    assert result.returncode == 1  # the host job ended by itself, not killed
    out = tmp_path / "run" / "member0" / "out"
    assert not (out / "model.keras").exists()  # no model of NaNs
    # the model as it was before the diverging change, kept (that change was never merged)
    assert error.get("checkpoint"), error
    with np.load(error["checkpoint"]) as z:
        assert z.files and all(np.isfinite(z[k]).all() for k in z.files)
    started = next(e for e in result.events if e["event"] == "started")
    for pid in started["children"].values():
        assert not alive(pid), "a TF server outlived the diverged run"
    # the job's scratch directory went with it
    assert not (tmp_path / "run" / "member0" / "tmp").exists()
    assert os.path.isdir(tmp_path / "run" / "member0")


def test_a_host_asked_to_stop_keeps_its_checkpoint_and_writes_the_model_so_far(tmp_path: Path) -> None:
    import threading
    import time

    from crowdd.job import STOP_FILE

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 900)
    x = rng.normal(0, 1, (900, 6)) + y[:, None]
    prepared = convert(ArraySet(x[:800], y[:800], x[800:], y[800:]), tmp_path / "data")
    job = {"epochs": 5000, "batch_size": 20, "learning_rate": 0.1}
    settings = {"steps_per_function": 10, "sync_every": 5, "threads": 1, "nice": 5, "checkpoint_secs": 30.0}
    workdir = tmp_path / "run" / "member0"

    def ask_to_stop(event: dict) -> None:
        if event["event"] == "progress" and event["step"] >= 100:
            threading.Timer(0.0, lambda: (workdir / STOP_FILE).touch()).start()

    t0 = time.monotonic()
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings,
                         timeout=300, log=ask_to_stop)
    done = result.done
    assert done is not None, result.events
    assert done["stopped"] is True and 100 <= done["steps"] < done["total_steps"]
    assert result.returncode == 0
    assert Path(done["checkpoint"]).is_file()
    with np.load(done["checkpoint"]) as z:
        assert int(z["step"]) == done["steps"]
    assert Path(done["model_path"]).is_file()
    # 0.77 and 0.76 (stopped early) in two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_least(done["test_accuracy"], 0.5)  # three separable classes: it learned something
    assert time.monotonic() - t0 < 200


def test_unscaled_everyday_data_trains_at_the_default_learning_rate(tmp_path: Path) -> None:
    """scikit-learn's wine (proline in the thousands, hue around 1) with the mlp preset at lr 0.5:
    the model standardizes each feature itself."""
    from sklearn.datasets import load_wine

    d = load_wine()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.data[order], d.target[order]
    prepared = convert(ArraySet(x[:140], y[:140], x[140:], y[140:]), tmp_path / "data")
    job = {"epochs": 30, "batch_size": 10}  # learning rate: the default 0.5
    settings = {"steps_per_function": 10, "sync_every": 5, "threads": 1, "nice": 5}
    result = run_cluster(tmp_path / "run", prepared.data_path, prepared.manifest_path, 1, job, settings, timeout=300)
    assert result.error is None, result.error
    assert result.done is not None, result.error
    # 0.9474 in both of two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
    at_least(result.done["test_accuracy"], 0.85)
