"""The one error replication raises to its callers."""

from __future__ import annotations

from crowdd.errors import CrowddError


class ReplicationError(CrowddError):
    """The transfer cannot complete (no holder of the data is reachable)."""


__all__ = ["ReplicationError"]
