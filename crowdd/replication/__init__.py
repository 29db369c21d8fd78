"""Stage 2: the dataset travels peer to peer along the precomputed route (docs/replication.md).

Every node runs a :class:`DataServer` (:mod:`.server`) on its advertised data port and a
:class:`Replicator` (:mod:`.replicator`) that fetches from its source in
:func:`crowdd.route.node_plan`. Both share one :class:`ChunkStore` (:mod:`.store`), so a
chunk verified on arrival can be served onwards at once (cut-through). The frames they
exchange are :mod:`crowdd.protocol.data`, always inside TLS 1.3, mutual and pinned to the
group's identities (:class:`crowdd.trust.group_tls.GroupTLS`), with the token proof as a second factor.
"""

from __future__ import annotations

from crowdd.replication.errors import ReplicationError
from crowdd.replication.replicator import Peer, Progress, ProgressCallback, Replicator, fetch_manifest
from crowdd.replication.server import DataServer
from crowdd.replication.store import ChunkStore

__all__ = [
    "ChunkStore",
    "DataServer",
    "Peer",
    "Progress",
    "ProgressCallback",
    "ReplicationError",
    "Replicator",
    "fetch_manifest",
]
