"""A host that restarts mid-session: the record it keeps, and the checkpoint it carries over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crowdd.data.cache import DatasetCache
from crowdd.hyperparams import Job
from crowdd.job import MODEL_FILE
from crowdd.node.checkpoints import CHECKPOINTS, carry_checkpoint, latest_checkpoint
from crowdd.node.hosting import convert_dataset
from crowdd.node.hosted import HostedJob
from crowdd.node.resume import RECORD, HostingRecord
from crowdd.protocol.control import HostRequest


@pytest.fixture
def hosted(tmp_path: Path) -> tuple[DatasetCache, HostedJob]:
    rows = ["label,a,b"] + [f"{i % 2},{i},{i * 2}" for i in range(40)]
    csv = tmp_path / "points.csv"
    csv.write_text("\n".join(rows) + "\n")
    cache = DatasetCache(tmp_path / "cache")
    cache.ensure()
    prepared = convert_dataset(cache, 4096, HostRequest(dataset=csv, job=Job(epochs=3, workers=2)))
    return cache, prepared


def test_a_recorded_session_comes_back_with_its_job_and_workdir(tmp_path: Path, hosted: tuple[DatasetCache, HostedJob]) -> None:
    cache, prepared = hosted
    state = tmp_path / "state"
    state.mkdir()
    HostingRecord(state).save(prepared)
    got, why = HostingRecord(state).load(cache)
    assert why is None and got is not None
    assert got.prepared.manifest == prepared.manifest and got.prepared.job == prepared.job
    assert got.prepared.data_path == prepared.data_path and got.workdir is None
    rec = HostingRecord(state)
    rec.save(prepared)
    rec.training_in(tmp_path / "jobs" / "g-0")
    got, _ = HostingRecord(state).load(cache)
    assert got is not None and got.workdir == tmp_path / "jobs" / "g-0"
    rec.clear()
    assert HostingRecord(state).load(cache) == (None, None)
    assert not (state / RECORD).exists()


def test_a_session_that_cannot_resume_says_why(tmp_path: Path, hosted: tuple[DatasetCache, HostedJob]) -> None:
    cache, prepared = hosted
    state = tmp_path / "state"
    state.mkdir()
    (state / RECORD).write_text("{not json")
    got, why = HostingRecord(state).load(cache)
    assert got is None and why is not None and "damaged" in why
    doc = {"manifest": prepared.manifest.to_json().decode(), "name": "points", "job": {"epochs": -1}, "workdir": None}
    (state / RECORD).write_text(json.dumps(doc))
    got, why = HostingRecord(state).load(cache)
    assert got is None and why is not None and "damaged" in why
    HostingRecord(state).save(prepared)
    prepared.data_path.unlink()  # the dataset left the cache (pruned)
    got, why = HostingRecord(state).load(cache)
    assert got is None and why is not None and "no longer in the cache" in why


def test_a_gone_model_file_is_taken_from_the_interrupted_jobs_copy(tmp_path: Path, hosted: tuple[DatasetCache, HostedJob]) -> None:
    cache, prepared = hosted
    state = tmp_path / "state"
    state.mkdir()
    model = tmp_path / "mine.keras"
    model.write_bytes(b"model")
    workdir = tmp_path / "jobs" / "g-0"
    workdir.mkdir(parents=True)
    rec = HostingRecord(state)
    rec.save(HostedJob(prepared.data_path, prepared.manifest, prepared.name, prepared.job, model))
    rec.training_in(workdir)
    model.unlink()
    got, why = HostingRecord(state).load(cache)
    assert got is None and why is not None and "model file" in why
    (workdir / MODEL_FILE).write_bytes(b"model")
    got, why = HostingRecord(state).load(cache)
    assert why is None and got is not None and got.prepared.model_file == workdir / MODEL_FILE


def test_the_newest_checkpoint_is_carried_to_the_new_job(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    assert carry_checkpoint(old, new) is None  # nothing to carry: the new job starts afresh
    (old / CHECKPOINTS).mkdir(parents=True)
    for step in (90, 120, 100):
        np.savez(old / CHECKPOINTS / f"ckpt-{step}.npz", step=np.int64(step))
    assert latest_checkpoint(old) == old / CHECKPOINTS / "ckpt-120.npz"
    assert carry_checkpoint(old, new) == 120
    assert [p.name for p in (new / CHECKPOINTS).iterdir()] == ["ckpt-120.npz"]
    with np.load(new / CHECKPOINTS / "ckpt-120.npz") as z:
        assert int(z["step"]) == 120
