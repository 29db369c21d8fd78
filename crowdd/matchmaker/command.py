"""``crowdd matchmaker``: its TLS identity, and the server run until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
import sys
from pathlib import Path

from crowdd.aio import on_signals
from crowdd.config import MatchmakerConfig, parse_hostport
from crowdd.errors import CrowddError, InputError
from crowdd.trust.identity import Identity, fingerprint_of
from crowdd.matchmaker.server import Matchmaker
from crowdd.platform.process import raise_nofile_limit
from crowdd.trust.tls import server_context

logger = logging.getLogger(__name__)


def server_tls(cert: Path | None, key: Path | None, state_dir: Path) -> tuple[ssl.SSLContext, str]:
    """The matchmaker's TLS 1.3 context and its certificate's fingerprint: the operator's
    certificate and key, or else a self-signed identity kept in ``state_dir`` (made once).
    No client certificate is requested (a volunteer's identity travels in its hello)."""
    if cert is not None and key is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(cert, key)
            fingerprint = fingerprint_of(cert.read_bytes())
        except (OSError, ssl.SSLError, InputError) as exc:
            raise InputError(f"cannot use the certificate {cert} with the key {key}: {exc}", field="cert") from None
    else:
        identity = Identity.load_or_create(state_dir, "matchmaker")
        ctx, fingerprint = server_context(identity), identity.fingerprint
    ctx.num_tickets = 0  # clients never resume a session: no tickets to send or keep
    return ctx, fingerprint


async def serve(
    cfg: MatchmakerConfig, host: str, port: int, stop: asyncio.Event | None = None, *,
    tls: ssl.SSLContext | None = None, fingerprint: str = "",
) -> int:
    """Run until ``stop`` is set or SIGINT/SIGTERM arrives."""
    stop = stop or asyncio.Event()
    mm = Matchmaker(cfg)
    with on_signals({signal.SIGINT: stop.set, signal.SIGTERM: stop.set}):
        try:
            await mm.start(host, port, tls)
            # Everything loaded so far lives for the whole run: keep it out of the collector's
            # full passes, which otherwise stall the loop in proportion to the heap.
            gc.collect()
            gc.freeze()
            bound_host, bound_port = mm.address
            print(f"crowdd matchmaker listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
            if fingerprint:
                print(f"crowdd matchmaker fingerprint {fingerprint}\n"
                      f"  volunteers pin it: [daemon] matchmaker_fingerprint = \"{fingerprint}\"", file=sys.stderr,
                      flush=True)
                logger.info("matchmaker fingerprint %s  put it in [daemon] matchmaker_fingerprint", fingerprint)
            await stop.wait()
            logger.info("matchmaker: stopping")
        finally:
            await mm.close()
    return 0


def main(args: argparse.Namespace) -> int:
    """``crowdd matchmaker [--listen HOST:PORT] [--cert CRT --key KEY] [--state-dir DIR] [--config FILE]``."""
    from crowdd.client.resolve import resolve_config

    cfg, paths = resolve_config(args)
    cert, key = getattr(args, "cert", None), getattr(args, "key", None)
    if (cert is None) != (key is None):
        print("crowdd matchmaker: --cert and --key go together", file=sys.stderr)
        return 2
    try:
        state_dir = getattr(args, "state_dir", None)
        tls, fingerprint = server_tls(cert, key, state_dir if state_dir is not None else paths.identity_dir)
    except CrowddError as exc:
        print(f"crowdd matchmaker: {exc.message}", file=sys.stderr)
        return 2
    mcfg = cfg.matchmaker
    listen = getattr(args, "listen", None) or mcfg.listen
    try:
        host, port = parse_hostport(listen)
    except ValueError as exc:
        print(f"crowdd matchmaker: bad --listen: {exc}", file=sys.stderr)
        return 2
    limit = raise_nofile_limit()
    if limit is not None and limit < mcfg.max_clients + 64:
        logger.warning(
            "open-file limit %d is below max_clients %d: the matchmaker may run out of sockets", limit, mcfg.max_clients
        )
    try:
        return asyncio.run(serve(mcfg, host, port, tls=tls, fingerprint=fingerprint))
    except OSError as exc:
        print(f"crowdd matchmaker: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1


__all__ = ["main", "serve", "server_tls"]
