"""The job spec is checked before TensorFlow starts: every impossible value names its field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crowdd.config import JobConfig
from crowdd.data.datasets import ArraySet, convert
from crowdd.job import EXIT_BAD_SPEC
from crowdd.job.events import EventWriter, parse_event
from crowdd.job.shards import segments, shard_bounds, steps_per_epoch, total_steps
from crowdd.job.spec import (
    JobSpec,
    Settings,
    SpecError,
    load_spec,
    parse_spec,
    write_spec,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    arrays = ArraySet(
        rng.integers(0, 255, (40, 4, 4), dtype=np.uint8),
        rng.integers(0, 3, 40),
        rng.integers(0, 255, (10, 4, 4), dtype=np.uint8),
        rng.integers(0, 3, 10),
    )
    prep = convert(arrays, tmp_path / "cache")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.link(prep.data_path, wd / "dataset.bin")
    os.link(prep.manifest_path, wd / "dataset.manifest.json")
    return wd


def good(wd: Path, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "role": "host",
        "index": 0,
        "cluster": {"worker": ["127.0.0.1:4002", "10.0.0.2:4003"], "chief": ["127.0.0.1:4001"]},
        "job": {"epochs": 2, "sharding": "overlap"},
        "dataset": {"data": "dataset.bin", "manifest": "dataset.manifest.json"},
        "workdir": str(wd),
        "output_dir": "out",
        "settings": {"steps_per_function": 20, "sync_every": 5, "nice": 10},
    }
    spec.update(over)
    return spec


def test_good_spec_round_trips(workdir: Path, tmp_path: Path) -> None:
    spec = parse_spec(good(workdir))
    assert isinstance(spec, JobSpec)
    assert spec.role == "host" and spec.cluster.num_workers == 2
    assert spec.settings == Settings(20, 5, 1, 10, 30.0, JobConfig().merge)
    assert spec.job.sharding == "overlap"
    assert spec.cluster.to_dict() == {"worker": ["127.0.0.1:4002", "10.0.0.2:4003"], "chief": ["127.0.0.1:4001"]}
    assert spec.own_ports() == {"worker": 4002, "chief": 4001}
    path = tmp_path / "spec.json"
    write_spec(spec, path)
    assert load_spec(path, role="host") == spec


def test_worker_spec(workdir: Path) -> None:
    spec = parse_spec(good(workdir, role="worker", index=1, output_dir=None))
    assert spec.own_ports() == {"worker": 4003}


def test_a_cluster_of_workers_only(workdir: Path) -> None:
    """No parameter server and no chief: the host binds its worker task's port only."""
    spec = parse_spec(good(workdir, cluster={"worker": ["127.0.0.1:4002", "10.0.0.2:4003"]}))
    assert spec.cluster.chief == () and spec.cluster.to_dict() == {"worker": ["127.0.0.1:4002", "10.0.0.2:4003"]}
    assert spec.own_ports() == {"worker": 4002}


def test_a_parameter_server_is_an_unknown_cluster_job(workdir: Path) -> None:
    with pytest.raises(SpecError, match="unknown cluster job") as info:
        parse_spec(good(workdir, cluster={"ps": ["127.0.0.1:4001"], "worker": ["127.0.0.1:4002", "10.0.0.2:4003"]}))
    assert info.value.field == "cluster.ps"


BAD: list[tuple[str, dict[str, Any]]] = [
    ("role", {"role": "chief"}),
    ("index", {"index": 1}),
    ("index", {"index": 5}),
    ("index", {"index": "0"}),
    ("cluster.ps", {"cluster": {"ps": ["a:1"], "worker": ["c:3"]}}),
    ("cluster.ps", {"cluster": {"ps": [], "worker": ["c:3"]}}),
    ("cluster.chief", {"cluster": {"worker": ["c:3"], "chief": ["a:1", "b:2"]}}),
    ("cluster.chief", {"cluster": {"worker": ["c:3"], "chief": []}}),
    ("cluster.worker", {"cluster": {"worker": []}}),
    ("cluster.worker", {"cluster": {"chief": ["a:1"]}}),
    ("cluster.worker[0]", {"cluster": {"worker": ["nohostport"]}}),
    ("cluster.worker[0]", {"cluster": {"worker": ["a:99999"]}}),
    ("cluster.worker[1]", {"cluster": {"worker": ["a:1", "a:1"]}}),
    ("cluster.chief[0]", {"cluster": {"worker": ["a:1"], "chief": ["a:1"]}}),
    ("cluster.evaluator", {"cluster": {"worker": ["b:2"], "evaluator": ["c:3"]}}),
    ("cluster", {"cluster": "a:1"}),
    ("job.learning_rate", {"job": {"learning_rate": -1}}),
    ("job.epochs", {"job": {"epochs": 0}}),
    ("job.model", {"job": {"model": "transformer"}}),
    ("job.bogus", {"job": {"bogus": 1}}),
    ("dataset", {"dataset": "x.bin"}),
    ("dataset.data", {"dataset": {"manifest": "dataset.manifest.json"}}),
    ("dataset.data", {"dataset": {"data": "missing.bin", "manifest": "dataset.manifest.json"}}),
    ("dataset.manifest", {"dataset": {"data": "dataset.bin", "manifest": "missing.json"}}),
    ("output_dir", {"output_dir": None}),
    ("workdir", {"workdir": "/nonexistent/crowdd-test"}),
    ("settings.sync_every", {"settings": {"steps_per_function": 5, "sync_every": 10}}),
    ("settings.steps_per_function", {"settings": {"steps_per_function": 0}}),
    ("settings.threads", {"settings": {"threads": 0}}),
    ("settings.nice", {"settings": {"nice": 20}}),
    ("settings.checkpoint_secs", {"settings": {"checkpoint_secs": 0}}),
    ("settings.checkpoint_secs", {"settings": {"checkpoint_secs": True}}),
    ("settings.speed", {"settings": {"speed": 11}}),
    ("settings.merge", {"settings": {"merge": "max"}}),
    ("surprise", {"surprise": 1}),
    ("job.model", {"job": {"model": "cnn"}, "dataset": {"data": "flat.bin", "manifest": "flat.json"}}),
]


@pytest.mark.parametrize(("field", "over"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_impossible_values_name_the_field(workdir: Path, field: str, over: dict[str, Any]) -> None:
    if over.get("dataset", {}) == {"data": "flat.bin", "manifest": "flat.json"}:
        rng = np.random.default_rng(2)
        arrays = ArraySet(rng.random((20, 6)), rng.integers(0, 2, 20), rng.random((4, 6)), rng.integers(0, 2, 4))
        prep = convert(arrays, workdir / "flat")
        os.link(prep.data_path, workdir / "flat.bin")
        os.link(prep.manifest_path, workdir / "flat.json")
    with pytest.raises(SpecError) as info:
        parse_spec(good(workdir, **over))
    assert info.value.field == field, info.value


def test_role_on_command_line_must_match(workdir: Path) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(good(workdir), role="worker")
    assert info.value.field == "role"


def test_data_file_size_must_match_manifest(workdir: Path) -> None:
    with open(workdir / "dataset.bin", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(SpecError, match="bytes") as info:
        parse_spec(good(workdir))
    assert info.value.field == "dataset.data"


def test_too_few_records_for_the_shards(workdir: Path) -> None:
    workers = [f"127.0.0.1:{5000 + i}" for i in range(45)]
    with pytest.raises(SpecError) as info:
        parse_spec(good(workdir, cluster={"worker": workers}))
    assert info.value.field == "job.sharding"


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text("{nope")
    with pytest.raises(SpecError, match="not JSON"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "absent.json")


def test_bad_spec_exits_before_tensorflow(workdir: Path, tmp_path: Path) -> None:
    """The job process rejects the spec with an error event and never imports TensorFlow."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(good(workdir, job={"batch_size": -5})))
    code = (
        "import sys\n"
        "from crowdd.job.__main__ import main\n"
        f"rc = main(['host', '--spec', {str(path)!r}])\n"
        "print('TF-LOADED' if 'tensorflow' in sys.modules else 'TF-ABSENT')\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == EXIT_BAD_SPEC, proc.stderr
    lines = proc.stdout.splitlines()
    event = parse_event(lines[0])
    assert event is not None and event["event"] == "error"
    assert event["field"] == "job.batch_size" and "between" in event["message"]
    assert lines[-1] == "TF-ABSENT"


def test_bad_command_line_is_an_error_event(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "crowdd.job", "chief", "--spec", str(tmp_path / "x.json")],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == EXIT_BAD_SPEC
    event = parse_event(proc.stdout.splitlines()[0])
    assert event is not None and event["event"] == "error" and "usage" in event["message"]


def test_missing_spec_file_is_an_error_event(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "crowdd.job", "worker", "--spec", str(tmp_path / "x.json")],
        check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == EXIT_BAD_SPEC
    event = parse_event(proc.stdout.splitlines()[0])
    assert event is not None and event["field"] == "spec"


def test_events_are_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events"
    with open(path, "w") as fh:
        w = EventWriter(fh, clock=lambda: 12.5)
        w.emit("progress", step=np.int64(3), loss=np.float32(0.5))
        w.error("boom", field="job.epochs")
        with pytest.raises(ValueError):
            w.emit("nonsense")
    lines = path.read_text().splitlines()
    assert parse_event(lines[0]) == {"event": "progress", "time": 12.5, "step": 3, "loss": 0.5}
    assert parse_event(lines[1]) == {"event": "error", "time": 12.5, "message": "boom", "field": "job.epochs"}
    assert parse_event("not json") is None
    assert parse_event('{"event": "unknown"}') is None


def test_sharding_modes() -> None:
    n = 100
    assert segments("overlap", 3) == (4, 2)
    # overlap: 4 segments of 25; worker J trains on segments J..J+1
    assert [shard_bounds("overlap", 3, j, n) for j in range(3)] == [(0, 50), (25, 75), (50, 100)]
    assert [shard_bounds("disjoint", 3, j, n) for j in range(3)] == [(0, 33), (33, 66), (66, 100)]
    assert [shard_bounds("full", 3, j, n) for j in range(3)] == [(0, 100)] * 3
    assert shard_bounds("overlap", 1, 0, 7) == (0, 7)
    assert steps_per_epoch("disjoint", 3, 2, n, 10) == 4
    assert total_steps("full", 2, n, 30, 3) == 3 * 2 * 4
    with pytest.raises(ValueError):
        shard_bounds("full", 2, 2, n)
    with pytest.raises(ValueError):
        segments("random", 2)


def test_unwritable_output_dir_is_an_error_event_without_tensorflow(workdir: Path, tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(good(workdir, output_dir="dataset.bin/out")))  # under a file
    code = (
        "import sys\n"
        "from crowdd.job.__main__ import main\n"
        f"rc = main(['host', '--spec', {str(path)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    event = parse_event(proc.stdout.splitlines()[0])
    assert event is not None and event["event"] == "error" and "output directory" in event["message"]
