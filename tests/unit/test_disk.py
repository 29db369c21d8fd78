"""[limits] disk_max_gb: the dataset cache and job directories pruned oldest first, on real files."""

from __future__ import annotations

import os
from pathlib import Path

from crowdd.node import disk

SHA = ["a" * 64, "b" * 64, "c" * 64]


def _dataset(cache: Path, sha: str, size: int, age: float) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for suffix, n in ((".data", size), (".manifest.json", 10), (".verified", 5)):
        p = cache / f"{sha}{suffix}"
        p.write_bytes(b"x" * n)
        os.utime(p, (age, age))


def _job(jobs: Path, name: str, size: int, age: float, model: bool = False) -> Path:
    d = jobs / name
    d.mkdir(parents=True)
    (d / "work.bin").write_bytes(b"x" * size)
    if model:
        (d / disk.MODEL_FILE).write_bytes(b"m" * 10)
    for p in d.iterdir():
        os.utime(p, (age, age))
    os.utime(d, (age, age))
    return d


def test_entries_group_a_datasets_files(tmp_path: Path) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    _dataset(cache, SHA[0], 100, 1000)
    (cache / ".convert-x.data").write_bytes(b"temp")  # a conversion in progress is not an entry
    _job(jobs, "g1-0", 50, 2000)
    got = {(e.kind, e.name): e for e in disk.entries(cache, jobs)}
    assert set(got) == {("dataset", SHA[0]), ("job", "g1-0")}
    assert got[("dataset", SHA[0])].size == 115 and len(got[("dataset", SHA[0])].paths) == 3
    assert got[("job", "g1-0")].size == 50
    assert disk.entries(tmp_path / "none", tmp_path / "none") == []


def test_prune_removes_oldest_first_until_it_fits(tmp_path: Path) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    _dataset(cache, SHA[0], 1000, 100)  # oldest
    _job(jobs, "g1-1", 1000, 200)
    _dataset(cache, SHA[1], 1000, 300)
    _job(jobs, "g2-1", 1000, 400)  # newest
    removed = disk.prune(cache, jobs, 2100)
    assert [(e.kind, e.name) for e in removed] == [("dataset", SHA[0]), ("job", "g1-1")]
    assert not (cache / f"{SHA[0]}.data").exists() and not (jobs / "g1-1").exists()
    assert (cache / f"{SHA[1]}.data").exists() and (jobs / "g2-1").exists()
    assert disk.prune(cache, jobs, 10_000) == []  # under the cap: nothing


def test_what_is_in_use_and_the_latest_model_stay(tmp_path: Path) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    _job(jobs, "old-model-0", 1000, 100, model=True)
    latest = _job(jobs, "new-model-0", 1000, 200, model=True)
    _dataset(cache, SHA[0], 1000, 150)  # in use by the running session
    _job(jobs, "g3-1", 1000, 300)
    removed = disk.prune(cache, jobs, 0, keep=[cache / f"{SHA[0]}.data"])
    assert {e.name for e in removed} == {"old-model-0", "g3-1"}
    assert (latest / disk.MODEL_FILE).exists() and (cache / f"{SHA[0]}.data").exists()


def test_reserve_makes_room_for_what_comes(tmp_path: Path) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    _dataset(cache, SHA[0], 1000, 100)
    _dataset(cache, SHA[1], 1000, 200)
    assert disk.prune(cache, jobs, 2100) == []
    removed = disk.prune(cache, jobs, 2100, reserve=500)
    assert [e.name for e in removed] == [SHA[0]]


def test_gb() -> None:
    assert disk.gb_to_bytes(1.5) == 1_500_000_000


def test_a_dataset_linked_into_a_job_counts_once(tmp_path: Path) -> None:
    cache, jobs = tmp_path / "cache", tmp_path / "jobs"
    _dataset(cache, SHA[0], 1000, 100)
    job = _job(jobs, "g1-1", 10, 200)
    os.link(cache / f"{SHA[0]}.data", job / "data.bin")  # as crowdd.node.launcher links it
    assert sum(e.size for e in disk.entries(cache, jobs)) == 1000 + 15 + 10


def test_a_groups_dataset_over_the_cap_or_the_free_space_is_refused_before_a_byte_arrives(tmp_path: Path) -> None:
    import shutil

    free = shutil.disk_usage(tmp_path).free
    cache = tmp_path / "cache"  # not made yet: the free space of where it will be
    why = disk.no_room(2_000_000_001, disk.gb_to_bytes(2), cache)
    assert why is not None and "2,000,000,001 bytes" in why and "disk_max_gb" in why
    why = disk.no_room(free + (1 << 30), None, cache)  # a host's manifest can name any size
    assert why is not None and "does not fit" in why
    # the controls: what fits is taken; a partial download's own blocks count as room
    assert disk.no_room(1_000_000, disk.gb_to_bytes(2), cache) is None
    partial = tmp_path / "x.partial"
    partial.write_bytes(b"\1" * (16 << 20))
    os.fsync(os.open(partial, os.O_RDONLY))
    assert disk.no_room(shutil.disk_usage(tmp_path).free + (8 << 20), None, tmp_path, partial) is None
