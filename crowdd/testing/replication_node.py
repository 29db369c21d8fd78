"""One replication node as a real process: ``python -m crowdd.testing.replication_node --spec FILE``.

Used by the integration tests and ``benchmarks/replication.py`` (inside a network
namespace or on loopback). The spec is a JSON object::

    {"index": 2, "n": 8, "token": "…", "manifest": "m.json", "cache": "dir",
     "route": "binomial", "stall_timeout": 10.0, "listen": "0.0.0.0", "port": 0,
     "identity": {"dir": "ids", "name": "m2"}, "certs": ["-----BEGIN CERTIFICATE-----…", …],
     "serve_file": null, "fetch": true, "late_bound": null}

Every connection is mutual TLS pinned to the group, as between real nodes: ``identity`` is
this node's key and certificate (:meth:`Identity.load_or_create`), ``certs`` the PEM
certificates of members 0..n-1 (this node's own at ``index``); :func:`group_plan` turns them
into the :class:`SessionPlan` a :class:`GroupTLS` is built from.

``serve_file`` is the host's canonical file (copied into the cache, verified, before the
node says it is listening); with ``fetch`` false the node only serves ``serve_file`` as-is,
unchecked (in tests: a deliberately corrupted copy). ``rate_limit`` caps the node's upload
(bytes/s). The process talks JSON lines: it prints
``{"event": "listening", "port": P}``, reads one line ``{"peers": [[index, host, port], …]}``
from stdin, prints ``start``, ``progress`` and ``done`` (or ``error``) events, then keeps
serving until stdin reaches EOF or carries ``exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crowdd.data.cache import DatasetCache
from crowdd.trust.group_tls import GroupTLS
from crowdd.hyperparams import GroupSettings, Job
from crowdd.trust.identity import Identity, fingerprint_of
from crowdd.data.manifest import Manifest
from crowdd.plan import DatasetRef, MemberPorts, PlanMember, SessionPlan
from crowdd.replication.errors import ReplicationError
from crowdd.replication.replicator import Peer, Progress, Replicator
from crowdd.replication.server import DataServer
from crowdd.replication.store import ChunkStore
from crowdd.route import node_plan

logger = logging.getLogger(__name__)


def group_plan(certs: Sequence[bytes], index: int, *, token: str = "t" * 32, route: str = "binomial") -> SessionPlan:
    """The plan of a test group whose member ``i`` holds ``certs[i]`` (PEM), as node ``index``
    sees it; addresses and ports are placeholders (replication takes its peers separately)."""
    members = tuple(
        PlanMember(i, "host" if i == 0 else "worker", f"m{i}", "127.0.0.1", MemberPorts(1, 1, ()),
                   cert=pem, fingerprint=fingerprint_of(pem))
        for i, pem in enumerate(certs)
    )
    return SessionPlan("replication-test", token, index, members, Job(), DatasetRef("0" * 64, 0, "test"),
                       GroupSettings(route=route))


def group_tls(identities: Sequence[Identity]) -> list[GroupTLS]:
    """Each member's :class:`GroupTLS` for a group made of ``identities`` (member i: identities[i])."""
    certs = [ident.cert_pem for ident in identities]
    return [GroupTLS(ident, group_plan(certs, i)) for i, ident in enumerate(identities)]


def make_group_tls(directory: Path, n: int, *, prefix: str = "m") -> list[GroupTLS]:
    """A fresh group of ``n`` identities (``<prefix><i>`` in ``directory``) and each member's TLS."""
    return group_tls([Identity.load_or_create(Path(directory), f"{prefix}{i}") for i in range(n)])


def _tls_from_spec(spec: dict[str, Any], index: int) -> GroupTLS:
    ident = spec["identity"]
    identity = Identity.load_or_create(Path(ident["dir"]), str(ident["name"]))
    certs = [str(pem).encode("ascii") for pem in spec["certs"]]
    return GroupTLS(identity, group_plan(certs, index, token=str(spec["token"])))


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_node(spec: dict[str, Any]) -> int:
    index = int(spec["index"])
    n = int(spec["n"])
    route = str(spec.get("route", "binomial"))
    stall = float(spec.get("stall_timeout", 10.0))
    manifest = Manifest.from_json(Path(spec["manifest"]).read_bytes())
    cache = DatasetCache(Path(spec["cache"]))
    serve_file = spec.get("serve_file")
    fetch = bool(spec.get("fetch", True))
    if serve_file and fetch:  # the host: its file goes into the cache before the session starts
        cache.add_file(Path(serve_file), manifest)
        serve_file = None
    tls = _tls_from_spec(spec, index)
    if len(tls.fingerprints) != n:
        raise SystemExit(f"the spec names {len(tls.fingerprints)} certificates for a group of {n}")
    store = ChunkStore.complete(Path(serve_file), manifest) if serve_file else ChunkStore.open(cache, manifest)
    server = DataServer(
        spec["token"], manifest, store,
        host=str(spec.get("listen", "0.0.0.0")), port=int(spec.get("port", 0)),
        targets=node_plan(n, index, route).targets, group_size=n, stall_timeout=stall,
        late_bound=spec.get("late_bound"), rate_limit=spec.get("rate_limit"), tls=tls,
    )
    port = await server.start()
    _emit(event="listening", port=port)
    stdin = await _stdin_lines()
    try:
        line = await stdin.readline()
        if not line:
            return 0
        peers = [Peer(int(i), str(h), int(p)) for i, h, p in json.loads(line)["peers"]]
        _emit(event="start", t=time.time())
        if fetch:
            last = [0.0]

            def progress(p: Progress) -> None:
                now = time.monotonic()
                if now - last[0] >= 0.05 or p.done_bytes == p.total_bytes:
                    last[0] = now
                    _emit(event="progress", done=p.done_bytes, total=p.total_bytes, source=p.source, t=time.time())

            rep = Replicator(index, peers, spec["token"], manifest, cache, route=route, stall_timeout=stall,
                             on_progress=progress, store=store, tls=tls)
            try:
                path = await rep.run()
            except ReplicationError as exc:
                _emit(event="error", message=str(exc), t=time.time())
                return 1
            ru = resource.getrusage(resource.RUSAGE_SELF)
            _emit(event="done", t=time.time(), path=str(path), sources=rep.sources_used,
                  corrupt=rep.corrupt_chunks, bad=sorted(rep.bad), cpu=round(ru.ru_utime + ru.ru_stime, 3))
        while True:
            line = await stdin.readline()
            if not line or line.strip() == b"exit":
                break
        _emit(event="served", chunks=server.served_chunks)
        return 0
    finally:
        await server.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crowdd.testing.replication_node")
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s node %(name)s %(levelname)s %(message)s")
    try:
        spec = json.loads(args.spec.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run_node(spec))


if __name__ == "__main__":
    sys.exit(main())
