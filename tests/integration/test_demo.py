"""`crowdd demo` as a real process: it trains, prints the accuracy, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_daemon_e2e import digits_npz

import crowdd.cli.demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def leftovers(root: Path) -> list[str]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(root) in cmd and p.pid != os.getpid():
            out.append(cmd)
    return out


def run_demo(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``crowdd demo``; on a timeout, SIGINT it (it cleans up) before failing."""
    proc = subprocess.Popen([sys.executable, "-m", "crowdd", "demo", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError("the demo did not finish in time:\n" + out[-3000:]) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def test_demo_trains_and_cleans_up(tmp_path: Path) -> None:
    data = digits_npz(tmp_path / "digits.npz")
    root = tmp_path / "demo"
    try:
        code, out = run_demo(["--workers", "2", "--dataset", str(data), "--root", str(root)], 240)
    finally:
        crowdd.cli.demo.kill_strays(root)
    assert code == 0, out[-3000:]
    m = re.search(r"final test accuracy: (\d\.\d+)", out)
    assert m and float(m.group(1)) > 0.7, out
    model = re.search(r"model: (\S+)", out)
    assert model and Path(model.group(1)).is_file()
    for name in ("host", "worker-1", "worker-2"):
        assert re.search(rf"{name}\s+\S+ -> training", out), out
    assert "dataset verified" in out
    assert not leftovers(root)


@contextlib.contextmanager
def long_demo(tmp_path: Path, epochs: int) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A one-worker demo that trains long enough to be interrupted; ended on the way out."""
    data = digits_npz(tmp_path / "digits.npz")
    root = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "crowdd", "demo", "--workers", "1", "--dataset", str(data), "--epochs", str(epochs),
         "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        yield proc, root
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        crowdd.cli.demo.kill_strays(root)


def test_demo_killed_leaves_nothing_behind(tmp_path: Path) -> None:
    """Even a SIGKILLed demo takes its daemons (and their jobs) down with it."""
    with long_demo(tmp_path, 500) as (proc, root):
        assert proc.stdout is not None
        for line in proc.stdout:
            if re.search(r"host\s+replicating -> training", line):
                break
        os.killpg(proc.pid, signal.SIGKILL)  # no finally, no atexit
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and leftovers(root):
            time.sleep(0.2)
        assert not leftovers(root)


def test_demo_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    with long_demo(tmp_path, 2000) as (proc, root):  # minutes of training: still running when interrupted
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(r"worker-1\s+\S+ -> training", line):
                break
        assert any("-> training" in ln for ln in lines), "".join(lines)
        time.sleep(3)  # the jobs are starting or running now
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, rest
        assert "interrupted" in rest
    assert not leftovers(root)


def test_default_dataset_falls_back_to_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crowdd.cli.demo, "FASHION_MNIST", tmp_path / "absent")
    import io

    out = io.StringIO()
    path = crowdd.cli.demo.default_dataset(tmp_path, out)
    assert path == tmp_path / "digits.npz" and path.stat().st_size > 0
    assert "digits" in out.getvalue()


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    for argv in (["--workers", "0"], ["--epochs", "0"], ["--dataset", str(tmp_path / "none.npz")]):
        r = subprocess.run([sys.executable, "-m", "crowdd", "demo", *argv, "--root", str(tmp_path / "d")],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2 and "crowdd demo:" in r.stderr


def test_epochs_help_tells_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from crowdd.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {crowdd.cli.demo.DEFAULT_EPOCHS};" in text
    assert f"{crowdd.cli.demo.SMALL_EPOCHS} for an .npz under 2 MiB" in text


def test_demo_nodes_donate_whatever_the_load() -> None:
    import tomllib

    from crowdd.config import config_from_dict

    cfg = config_from_dict(tomllib.loads(crowdd.cli.demo.node_config("127.0.0.1:1", "n", 10)))
    assert cfg.idle.user_idle_minutes == 0 and cfg.idle.max_other_cpu_percent == 100 and cfg.idle.allow_on_battery


def test_a_diverging_demo_ends_with_the_advice_and_leaves_nothing_running(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    x = rng.normal(0, 1, (400, 6)) * 50_000 + y[:, None] * 30_000  # a CSV nobody scaled
    data = tmp_path / "unscaled.csv"
    np.savetxt(data, np.column_stack([y, x]), delimiter=",", header="label," + ",".join(f"f{i}" for i in range(6)),
               comments="", fmt="%.6g")
    from test_runs_end_well import unscaling_model

    model = tmp_path / "raw.keras"
    unscaling_model(model, 6, 2)  # the host's own model: no scaling layer
    root = tmp_path / "demo"
    try:
        code, out = run_demo(["--workers", "1", "--dataset", str(data), "--epochs", "200", "--model-file", str(model),
                              "--root", str(root)], 240)
    finally:
        strays = crowdd.cli.demo.kill_strays(root)
    assert code == 1, out[-3000:]
    assert re.search(r"loss diverged at step \d+; lower the learning rate \(e\.g\. --lr 0\.05\) or scale the features",
                     out), out[-3000:]
    assert "not JSON compliant" not in out and "Traceback" not in out
    assert strays == 0 and not leftovers(root)


MAE_IN_FRESH_PYTHON = """
import sys, numpy as np, keras
from crowdd.data.datasets import load
data = load(__import__("pathlib").Path(sys.argv[2]), label="progression", task="regression")
pred = keras.models.load_model(sys.argv[1]).predict(data.x_test.astype("float32"), verbose=0)[:, 0]
print(float(np.mean(np.abs(pred - data.y_test.astype("float32")))))
"""


def test_demo_trains_the_hosts_regression_mlp_on_a_csv(tmp_path: Path) -> None:
    import os

    import numpy as np

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (600, 4)) * [1, 10, 100, 1000] + [0, 50, 500, 5000]  # raw, unscaled features
    y = 150 + 40 * (x[:, 0]) - 3 * (x[:, 1] - 50) + 0.2 * (x[:, 2] - 500) + rng.normal(0, 5, 600)
    data = tmp_path / "progress.csv"
    np.savetxt(data, np.column_stack([x, y]), delimiter=",", fmt="%.6f",
               header="age,bmi,bp,chol,progression", comments="")
    norm = keras.layers.Normalization()
    norm.adapt(x[:480])
    model = keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1), keras.layers.Rescaling(float(np.std(y)), float(np.mean(y)))])
    model_file = tmp_path / "mlp.keras"
    model.save(model_file)
    root = tmp_path / "demo"
    try:
        code, out = run_demo(["--workers", "1", "--dataset", str(data), "--label", "progression", "--task", "regression",
                              "--model-file", str(model_file), "--epochs", "120", "--lr", "0.05", "--root", str(root)],
                             240)
    finally:
        crowdd.cli.demo.kill_strays(root)
    assert code == 0, out[-3000:]
    m = re.search(r"final test MAE: (\d+\.\d+)", out)
    assert m, out[-3000:]
    mae = float(m.group(1))
    assert mae < 15, out[-3000:]  # noise is 5; a mean predictor would be ~100
    model_path = re.search(r"model: (\S+\.keras)", out)
    assert model_path, out
    fresh = subprocess.run([sys.executable, "-c", MAE_IN_FRESH_PYTHON, model_path.group(1), str(data)],
                           capture_output=True, text=True, timeout=180, check=False,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert float(fresh.stdout.strip().splitlines()[-1]) == pytest.approx(mae, abs=0.01)
    assert not leftovers(root)


def test_demo_trains_the_hosts_cnn_on_an_image_folder(tmp_path: Path) -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from test_own_model import digit_folder

    folder = tmp_path / "digits"
    digit_folder(folder / "train", {"one": 1, "seven": 7, "zero": 0}, per_class=100)
    digit_folder(folder / "test", {"one": 1, "seven": 7, "zero": 0}, per_class=100)  # same images: a smoke test
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 3, activation="relu", padding="same"), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model_file = tmp_path / "cnn.keras"
    model.save(model_file)
    root = tmp_path / "demo"
    try:
        code, out = run_demo(["--workers", "1", "--dataset", str(folder), "--model-file", str(model_file),
                              "--epochs", "10", "--lr", "0.1", "--root", str(root)], 240)
    finally:
        crowdd.cli.demo.kill_strays(root)
    assert code == 0, out[-3000:]
    m = re.search(r"final test accuracy: (\d\.\d+)", out)
    assert m and float(m.group(1)) > 0.9, out[-3000:]
    assert "model card (classes, metrics, how it was trained):" in out
    assert not leftovers(root)
