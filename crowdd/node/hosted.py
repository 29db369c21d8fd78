"""What a host brings to its session, made ready: the dataset in its canonical form, the job,
and the host's own model file (``crowdd host``, converted by :func:`crowdd.node.hosting.convert_dataset`;
recorded for a restart by :mod:`crowdd.node.resume`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crowdd.hyperparams import Job
from crowdd.data.manifest import Manifest


@dataclass
class HostedJob:
    """The host's dataset, ready to serve: the canonical file, its manifest, a display name,
    and the job it is hosted for."""

    data_path: Path
    manifest: Manifest
    name: str
    job: Job
    model_file: Path | None = None  # the host's own Keras model, checked against the dataset


__all__ = ["HostedJob"]
