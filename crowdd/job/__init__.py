"""The TensorFlow training job (``python -m crowdd.job host|worker --spec FILE``).

This package is the only part of crowdd that imports TensorFlow, and only in
:mod:`crowdd.job.host`, :mod:`crowdd.job.worker`, :mod:`crowdd.job.server`,
:mod:`crowdd.job.data`, :mod:`crowdd.job.models`, :mod:`crowdd.job.faults` and
:mod:`crowdd.job.elastic`. This ``__init__`` and :mod:`crowdd.job.spec` /
:mod:`crowdd.job.events` / :mod:`crowdd.job.membership` stay TF-free so the daemon can use them.
See ``docs/job-spec.md``.
"""

from __future__ import annotations

EVENT_KINDS = ("started", "progress", "eval", "checkpoint", "resumed", "done", "error", "members", "slot", "rejected",
               "expel")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SPEC = 2
#: A file of this name in the host job's working directory asks it to stop early: it
#: evaluates, checkpoints, saves the model trained so far and ends with ``done`` (``stopped``).
STOP_FILE = "crowdd-stop"
#: The host daemon writes this file (atomically) in the host job's working directory:
#: ``{"version": N, "live": [1, 3], "fresh": [3]}``, the worker slots (indices into
#: ``cluster.worker``) with a member behind them now; see ``docs/job-spec.md``.
MEMBERS_FILE = "crowdd-members.json"
#: The host's own Keras model (``job.model`` "file"), copied into the host job's working
#: directory by its daemon.
MODEL_FILE = "host-model.keras"

__all__ = ["EVENT_KINDS", "EXIT_BAD_SPEC", "EXIT_FAILED", "EXIT_OK", "MEMBERS_FILE", "MODEL_FILE", "STOP_FILE"]
