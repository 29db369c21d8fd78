"""A host daemon that restarts mid-session picks its session up again.

While this node hosts, :class:`HostingRecord` keeps what the session needs to start again in
the state directory (``hosting.json``): the dataset's manifest (the converted file stays in
the cache, by its sha256), its display name, the job and the host's own model file, and, once
training has begun, the job's working directory (its checkpoints). A session that ends — it
finished, failed, or the user stopped it — clears the record; a daemon that is stopped or
killed mid-session leaves it behind. At its next start the daemon reads it back
(:meth:`HostingRecord.load`): it hosts the same dataset and job again, the workers still
donating come back to it through the matchmaker, and the new job starts from the last
checkpoint (:func:`crowdd.node.checkpoints.carry_checkpoint`). When that cannot be done (the dataset left the cache,
the record is damaged) the daemon says why in its status instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.data.cache import DatasetCache
from crowdd.hyperparams import HyperparamError, validate_job
from crowdd.job import MODEL_FILE
from crowdd.data.manifest import Manifest, ManifestError
from crowdd.node.hosted import HostedJob

logger = logging.getLogger(__name__)

RECORD = "hosting.json"


@dataclass(frozen=True)
class Interrupted:
    """A hosted session a restart cut short: what to host again, and the working directory
    of its job (None if training had not begun)."""

    prepared: HostedJob
    workdir: Path | None


class HostingRecord:
    """``hosting.json`` in the state directory: the hosted session in progress, if any."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RECORD
        self._doc: dict[str, Any] | None = None

    def save(self, prepared: HostedJob) -> None:
        """This node now hosts ``prepared`` (written at once, atomically)."""
        self._doc = {
            "manifest": prepared.manifest.to_json().decode("utf-8"),
            "name": prepared.name,
            "job": prepared.job.to_dict(),
            "model_file": str(prepared.model_file) if prepared.model_file is not None else None,
            "workdir": None,
        }
        self._write()

    def training_in(self, workdir: Path) -> None:
        """Training began in ``workdir`` (where the job keeps its checkpoints)."""
        if self._doc is not None:
            self._doc["workdir"] = str(workdir)
            self._write()

    def clear(self) -> None:
        """The session ended (done, failed or stopped): nothing to resume."""
        self._doc = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove %s: %s", self.path, exc)

    def _write(self) -> None:
        tmp = self.path.with_name(f".{RECORD}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self._doc))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.error("cannot record the hosted session in %s (a restart will not resume it): %s", self.path, exc)

    def load(self, cache: DatasetCache) -> tuple[Interrupted | None, str | None]:
        """The session a restart interrupted: ``(Interrupted, None)``; ``(None, why)`` when
        there was one but it cannot be resumed; ``(None, None)`` when there was none."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"cannot read {self.path}: {exc.strerror}"
        try:
            doc = json.loads(raw)
            manifest = Manifest.from_json(doc["manifest"])
            job = validate_job(doc["job"])
            name = doc["name"]
            if not isinstance(name, str):
                raise TypeError("name")
            workdir = Path(doc["workdir"]) if isinstance(doc.get("workdir"), str) else None
            model = Path(doc["model_file"]) if isinstance(doc.get("model_file"), str) else None
        except (ValueError, KeyError, TypeError, ManifestError, HyperparamError) as exc:
            return None, f"its record {self.path} is damaged ({type(exc).__name__}: {exc})"
        data = cache.has(manifest)
        if data is None:
            return None, f"its dataset {name} ({manifest.digest()[:12]}) is no longer in the cache; host it again"
        if model is not None and not model.is_file():
            kept = workdir / MODEL_FILE if workdir is not None else None
            if kept is None or not kept.is_file():
                return None, f"its model file {model} is gone; host it again"
            model = kept
        self._doc = doc
        return Interrupted(HostedJob(data, manifest, name, job, model), workdir), None


__all__ = ["HostingRecord", "Interrupted"]
