"""Real node identities for tests, made once per process (P-256 keys are cheap, not free)."""

from __future__ import annotations

import functools
import ssl
import tempfile
from pathlib import Path
from typing import Any

from crowdd.trust.identity import Identity
from crowdd.trust.tls import server_context

_DIR = tempfile.TemporaryDirectory(prefix="crowdd-test-ids-")


@functools.cache
def identity(name: str) -> Identity:
    """The identity called ``name`` (the same object for the whole test run)."""
    return Identity.load_or_create(Path(_DIR.name), name)


def hello_identity(name: str) -> dict[str, Any]:
    """The ``cert`` and ``fingerprint`` fields of a hello from ``name``."""
    ident = identity(name)
    return {"cert": ident.cert_pem.decode("ascii"), "fingerprint": ident.fingerprint}


__all__ = ["hello_identity", "identity", "matchmaker_tls"]


def matchmaker_tls() -> tuple[ssl.SSLContext, str]:
    """A matchmaker's server context and the fingerprint its clients pin."""
    ident = identity("matchmaker")
    return server_context(ident), ident.fingerprint
