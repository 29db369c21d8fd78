"""A volunteer's disk cap (``[limits] disk_max_gb``): the dataset cache and the job
directories are pruned, oldest first, until they fit.

What counts: every dataset in the cache (its ``.data``, manifest, marker and ``.partial``
together, as one entry), and every job directory (``jobs/<group>-<index>``: a job's work
files, checkpoints, a host's trained model). What is never removed: whatever the caller says
is in use (the running session's dataset and job directory), and the newest job directory that
holds a trained model (``model.keras``): a host's latest model stays however tight the cap.
Age is the newest modification time inside an entry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
_CACHE_SUFFIXES = (".data", ".manifest.json", ".verified", ".partial")


@dataclass(frozen=True)
class Entry:
    """One thing that may be pruned: its files, their size, its age."""

    kind: str  # "dataset" or "job"
    name: str
    paths: tuple[Path, ...]
    size: int
    mtime: float

    def remove(self) -> None:
        for p in self.paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _walk(path: Path, seen: set[tuple[int, int]]) -> tuple[int, float]:
    """(bytes, newest mtime) of a file or a directory tree; links are not followed, and a file
    counts once however many hard links it has (a job links the cached dataset in): ``seen``
    holds the (device, inode) of every file counted so far."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0, 0.0
    if not path.is_dir() or path.is_symlink():
        return _count(st, seen), st.st_mtime
    size, newest = 0, st.st_mtime
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                s = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if name in files:
                size += _count(s, seen)
            newest = max(newest, s.st_mtime)
    return size, newest


def _count(st: os.stat_result, seen: set[tuple[int, int]]) -> int:
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return 0
    seen.add(key)
    return st.st_size


def entries(dataset_cache: Path, jobs_dir: Path) -> list[Entry]:
    """Every dataset in the cache and every job directory."""
    out: list[Entry] = []
    seen: set[tuple[int, int]] = set()
    groups: dict[str, list[Path]] = {}
    if dataset_cache.is_dir():
        for p in dataset_cache.iterdir():
            for suffix in _CACHE_SUFFIXES:
                if p.name.endswith(suffix) and not p.name.startswith("."):
                    groups.setdefault(p.name[: -len(suffix)], []).append(p)
                    break
    for sha, paths in groups.items():
        sizes = [_walk(p, seen) for p in paths]
        out.append(Entry("dataset", sha, tuple(sorted(paths)), sum(s for s, _ in sizes), max(m for _, m in sizes)))
    if jobs_dir.is_dir():
        for d in jobs_dir.iterdir():
            if d.is_dir() and not d.is_symlink():
                size, mtime = _walk(d, seen)
                out.append(Entry("job", d.name, (d,), size, mtime))
    return out


def prune(dataset_cache: Path, jobs_dir: Path, max_bytes: int, *, keep: Iterable[Path] = (),
          reserve: int = 0) -> list[Entry]:
    """Remove entries, oldest first, until they and ``reserve`` more bytes fit in ``max_bytes``.
    Entries holding any path in ``keep``, and the newest job with a model, stay. Returns what
    was removed (it may not be enough: then what stays is all kept)."""
    found = entries(dataset_cache, jobs_dir)
    kept = {Path(k).resolve() for k in keep}
    models = [e for e in found if e.kind == "job" and (e.paths[0] / MODEL_FILE).exists()]
    latest_model = max(models, key=lambda e: e.mtime, default=None)

    def protected(e: Entry) -> bool:
        if e is latest_model:
            return True
        return any(k == p.resolve() or k.is_relative_to(p.resolve()) for p in e.paths for k in kept)

    total = sum(e.size for e in found) + reserve
    removed: list[Entry] = []
    for e in sorted(found, key=lambda e: e.mtime):
        if total <= max_bytes:
            break
        if protected(e):
            continue
        e.remove()
        total -= e.size
        removed.append(e)
        logger.info("disk cap: removed %s %s (%d bytes)", e.kind, e.name, e.size)
    if total > max_bytes:
        logger.warning("disk cap: %d bytes in use, over the cap of %d; what is left is in use or the latest model",
                       total, max_bytes)
    return removed


def tree_size(path: Path) -> int:
    """Bytes in a file or directory tree (links not followed, each file once)."""
    return _walk(path, set())[0]


def job_allowance(dataset_cache: Path, jobs_dir: Path, max_bytes: int, workdir: Path) -> int:
    """What a running job may hold in ``workdir`` under the node's disk cap: the cap less
    everything else the cap counts (the cached datasets, the other job directories)."""
    others = sum(e.size for e in entries(dataset_cache, jobs_dir) if e.paths != (workdir,))
    return max(0, max_bytes - others)


def gb_to_bytes(gb: float) -> int:
    return int(gb * 1_000_000_000)


def no_room(size: int, cap: int | None, directory: Path, held: Path | None = None) -> str | None:
    """Why a group's dataset of ``size`` bytes cannot be replicated into ``directory`` (None:
    it can): over this node's cap (``cap`` bytes, None for none) or over the free space, less
    what a partial download at ``held`` already takes. Checked before a byte arrives: the size
    comes from the group's manifest, which a host chooses."""
    if cap is not None and size > cap:
        return f"the group's dataset ({size:,} bytes) is larger than this node may keep ([limits] disk_max_gb)"
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        taken = held.stat().st_blocks * 512 if held is not None and held.exists() else 0
    except OSError as exc:
        return f"cannot measure the free space in {directory}: {exc.strerror or exc}"
    if size - taken > free:
        return f"the group's dataset ({size:,} bytes) does not fit in the {free:,} bytes free in {probe}"
    return None


class DiskKeeper:
    """Keeps the dataset cache and the job directories under ``[limits] disk_max_gb``
    (``max_gb()``: a reload may change it; 0 is no cap)."""

    def __init__(self, dataset_cache: Path, jobs_dir: Path, max_gb: Callable[[], float]) -> None:
        self.dataset_cache, self.jobs_dir, self.max_gb = dataset_cache, jobs_dir, max_gb

    def cap(self) -> int | None:
        gb = self.max_gb()
        return gb_to_bytes(gb) if gb > 0 else None

    async def prune(self, *, keep: tuple[Path, ...] = (), reserve: int = 0) -> None:
        """The oldest first, until ``reserve`` more bytes fit; ``keep`` is not touched."""
        cap = self.cap()
        if cap is None:
            return
        try:
            await asyncio.to_thread(prune, self.dataset_cache, self.jobs_dir, cap, keep=keep, reserve=reserve)
        except OSError as exc:
            logger.warning("disk cap: cannot prune: %s", exc)


__all__ = ["MODEL_FILE", "DiskKeeper", "Entry", "entries", "gb_to_bytes", "job_allowance", "no_room", "prune", "tree_size"]
