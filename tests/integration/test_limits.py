"""[limits] disk_max_gb on a real daemon: old datasets and job directories pruned at start
(a host's latest model kept), and a dataset larger than the cap refused with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crowdd.node.disk import MODEL_FILE
from crowdd.node.ports import free_port
from crowdd.platform.process import kill_group

pytestmark = pytest.mark.timeout(120)
SHA = ["a" * 64, "b" * 64]


def _old(p: Path, age: float) -> None:
    os.utime(p, (age, age))


def test_a_daemon_keeps_to_its_disk_cap(tmp_path: Path) -> None:
    root = tmp_path / "node"
    cache, jobs = root / "cache" / "datasets", root / "state" / "jobs"
    cache.mkdir(parents=True)
    jobs.mkdir(parents=True)
    for i, sha in enumerate(SHA):  # two datasets of 3 kB: the older goes
        (cache / f"{sha}.data").write_bytes(b"x" * 3000)
        _old(cache / f"{sha}.data", 1000 + i)
    model_job = jobs / "g1-0"
    model_job.mkdir()
    (model_job / MODEL_FILE).write_bytes(b"m" * 6000)  # the host's latest model: kept though oldest
    for p in (model_job / MODEL_FILE, model_job):
        _old(p, 500)
    # 10 kB cap; the job's own files (identity, state) are not counted
    (root / "crowdd.toml").write_text('[daemon]\nlisten_host = "127.0.0.1"\n[limits]\ndisk_max_gb = 0.00001\n'
                                      "[security]\nallow_exposed_tensorflow = true\n")
    proc = subprocess.Popen([sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker",
                             f"127.0.0.1:{free_port()}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (root / "run" / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        assert not (cache / f"{SHA[0]}.data").exists()
        assert (cache / f"{SHA[1]}.data").exists() and (model_job / MODEL_FILE).exists()

        data = tmp_path / "big.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x_train=rng.random((200, 8, 8)), y_train=rng.integers(0, 10, 200),
                 x_test=rng.random((50, 8, 8)), y_test=rng.integers(0, 10, 50))
        r = subprocess.run([sys.executable, "-m", "crowdd", "host", str(data), "--root", str(root)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "is larger than this node may keep ([limits] disk_max_gb = 1e-05)" in r.stderr
        assert not list((root / "cache" / "incoming").glob("*/*"))
        log = (root / "log" / "crowdd.log").read_text()
        assert f"disk cap: removed dataset {SHA[0]}" in log
    finally:
        kill_group(proc, 15.0)
