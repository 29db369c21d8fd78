"""The daemon's reads and writes in a job's work directory, against what a graph can plant there.

Each attack is what a group member's graph can do in the work directory (it has the write
right there); each has its control: the same call on an honest directory works.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from crowdd.platform import jobfiles
from crowdd.platform.jobfiles import JobFileError


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of the volunteer's outside the job (its identity key, say)."""
    p = tmp_path / "identity.key"
    p.write_bytes(b"the volunteer's key")
    return p


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "jobs" / "0123456789abcdef-0"
    (d / "output").mkdir(parents=True)
    return d


def test_honest_reads_and_writes(workdir: Path) -> None:
    jobfiles.write(workdir, "members.json", b'{"version": 1}')
    assert (workdir / "members.json").read_bytes() == b'{"version": 1}'
    jobfiles.write(workdir, "members.json", b'{"version": 2}')  # over an existing file
    assert jobfiles.read(workdir, "members.json", 100) == b'{"version": 2}'
    jobfiles.write(workdir, "output/model_card.json", b"{}")
    assert jobfiles.read(workdir, str(workdir / "output" / "model_card.json"), 100) == b"{}"  # absolute, inside
    assert [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")] == []


def test_a_link_planted_at_the_daemons_temp_or_target_name_is_replaced_never_followed(workdir: Path, victim: Path) -> None:
    # the names the daemon used to write through (a fixed temp name, then the target)
    (workdir / ".members.json.tmp").symlink_to(victim)
    (workdir / "members.json").symlink_to(victim)
    jobfiles.write(workdir, "members.json", b'{"version": 1}')
    assert victim.read_bytes() == b"the volunteer's key"
    assert not (workdir / "members.json").is_symlink() and (workdir / "members.json").read_bytes() == b'{"version": 1}'


def test_a_directory_swapped_for_a_link_is_not_walked_through(workdir: Path, victim: Path) -> None:
    out = workdir / "output"
    out.rename(workdir / "was-output")
    out.symlink_to(victim.parent)  # output/ now points at the volunteer's directory
    with pytest.raises(JobFileError, match="not a directory"):
        jobfiles.write(workdir, "output/identity.key", b"pwned")
    with pytest.raises(JobFileError, match="not a directory"):
        jobfiles.read(workdir, "output/identity.key", 1 << 20)
    assert victim.read_bytes() == b"the volunteer's key"


def test_a_read_of_a_link_a_device_a_fifo_or_a_huge_file_is_refused_without_hanging(workdir: Path, victim: Path) -> None:
    (workdir / "card-link.json").symlink_to(victim)
    (workdir / "zero.json").symlink_to("/dev/zero")
    os.mkfifo(workdir / "fifo.json")
    (workdir / "big.json").write_bytes(b"x" * 2000)
    for name, why in (("card-link.json", "cannot open"), ("zero.json", "cannot open"), ("fifo.json", "not a regular file"),
                      ("big.json", "2,000 bytes")):
        done: list[BaseException] = []

        def attempt(name: str = name, done: list[BaseException] = done) -> None:
            try:
                jobfiles.read(workdir, name, 1000)
            except BaseException as exc:  # noqa: BLE001
                done.append(exc)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), f"reading {name} hung the daemon"
        assert isinstance(done[0], JobFileError) and why in str(done[0]), (name, done)
    with pytest.raises(JobFileError, match="not a regular file"):
        jobfiles.is_file(workdir, "zero.json")


@pytest.mark.parametrize("reported", ["/dev/zero", "/etc/passwd", "../identity.key", "output/../../identity.key", "",
                                      None, 7, "/"])
def test_a_path_a_job_reports_outside_its_directory_is_refused(workdir: Path, reported: object) -> None:
    with pytest.raises(JobFileError):
        jobfiles.is_file(workdir, reported)


def test_a_model_the_job_reports_inside_its_directory_is_taken(workdir: Path) -> None:
    (workdir / "output" / "model.keras").write_bytes(b"zip")
    assert jobfiles.is_file(workdir, "output/model.keras").as_posix() == "output/model.keras"
    assert jobfiles.is_file(workdir, str(workdir / "output" / "model.keras")).as_posix() == "output/model.keras"


def test_the_model_s_digest_is_of_the_regular_file_only(workdir: Path, victim: Path) -> None:
    import hashlib

    (workdir / "output" / "model.keras").write_bytes(b"zip" * 1000)
    assert jobfiles.sha256(workdir, "output/model.keras") == hashlib.sha256(b"zip" * 1000).hexdigest()
    (workdir / "output" / "link.keras").symlink_to(victim)
    with pytest.raises(JobFileError, match="cannot open"):
        jobfiles.sha256(workdir, "output/link.keras")  # never the file a link points at
    with pytest.raises(JobFileError):
        jobfiles.sha256(workdir, "/etc/passwd")


def test_the_dataset_link_replaces_whatever_a_job_left_there(workdir: Path, victim: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.data"
    cache.write_bytes(b"the dataset")
    jobfiles.link(workdir, "dataset.bin", cache)  # the honest path: nothing there yet
    assert os.readlink(workdir / "dataset.bin") == str(cache)
    jobfiles.link(workdir, "dataset.bin", cache)  # a resumed job: its old link replaced
    # a graph made it a directory, with a link to the volunteer's file inside
    (workdir / "dataset.bin").unlink()
    (workdir / "dataset.bin").mkdir()
    (workdir / "dataset.bin" / "key").symlink_to(victim)
    jobfiles.link(workdir, "dataset.bin", cache)
    assert (workdir / "dataset.bin").read_bytes() == b"the dataset"
    assert victim.read_bytes() == b"the volunteer's key"  # removed around, never through


def test_a_write_over_a_directory_says_so(workdir: Path) -> None:
    (workdir / "spec.json").mkdir()
    with pytest.raises(JobFileError, match="cannot write spec.json"):
        jobfiles.write(workdir, "spec.json", b"{}")
    assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]  # nothing left behind
