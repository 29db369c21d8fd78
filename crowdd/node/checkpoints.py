"""The host job's checkpoints as its daemon sees them (no TensorFlow): find the newest, and
carry it into a new job's directory so that job resumes from it (:mod:`crowdd.node.resume`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: where a host job keeps its checkpoints, below its working directory
CHECKPOINTS = Path("output") / "checkpoints"


def _step(path: Path) -> int:
    return int(path.stem.split("-")[1])


def latest_checkpoint(workdir: Path) -> Path | None:
    """The newest ``ckpt-STEP.npz`` of a host job's working directory."""
    found = sorted((workdir / CHECKPOINTS).glob("ckpt-*.npz"), key=_step)
    return found[-1] if found else None


def carry_checkpoint(old: Path, new: Path) -> int | None:
    """Copy the newest checkpoint of the job in ``old`` to the job in ``new`` (which resumes
    from it); returns its step, or None when there is none to carry."""
    ckpt = latest_checkpoint(old)
    if ckpt is None:
        return None
    dest = new / CHECKPOINTS
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{ckpt.name}.tmp"
    shutil.copyfile(ckpt, tmp)
    os.replace(tmp, dest / ckpt.name)
    return _step(ckpt)


__all__ = ["CHECKPOINTS", "carry_checkpoint", "latest_checkpoint"]
