"""The host's checkpoints: the model's arrays (weights, optimizer slots) and the step, in
``ckpt-STEP.npz`` files; the coordinator saves only finite ones (:mod:`crowdd.job.health`)."""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointStore:
    """``ckpt-STEP.npz`` files (weights, optimizer slots, step) in ``dir``; keeps the last two."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def latest(self) -> Path | None:
        found = sorted(self.dir.glob("ckpt-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
        return found[-1] if found else None

    def save(self, step: int, arrays: list) -> Path:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"ckpt-{step}.npz"
        tmp = self.dir / f".ckpt-{step}.tmp.npz"
        np.savez(tmp, step=np.int64(step), **{f"v{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("ckpt-*.npz"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: Path, count: int) -> tuple[int, list]:
        import numpy as np

        with np.load(path) as z:
            arrays = [z[f"v{i}"] for i in range(count)]
            return int(z["step"]), arrays
