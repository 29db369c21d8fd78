"""Group-membership proof: mutual HMAC-SHA256 challenge/response keyed by the group token.

Used by replication (purpose ``"data"``) and the daemon's session channel (purpose
``"session"``). The token the matchmaker hands out never crosses the wire; both sides
prove they hold it, and every proof is bound to the purpose, both nonces, the role
(client/server) and the client's hello, so a proof made for one channel or one
connection cannot be replayed on another. Between members this runs inside mutual TLS
pinned to the group's identities (:mod:`crowdd.trust.group_tls`; ``connect(ssl=...)`` on the client,
``ssl=`` on the server's listener): the certificate is the first factor, the token the second.

Handshake (all frames via :mod:`crowdd.wire`)::

    client → {"type": "hello", "proto": "crowdd/1", "purpose": P, "nonce": Nc, "hello": {...}}
    server → {"type": "challenge", "nonce": Ns}
    client → {"type": "auth", "proof": HMAC(token, client|P|Nc|Ns|H)}
    server → {"type": "welcome", "proof": HMAC(token, server|P|Nc|Ns|H)}
             (or an ``unauthorized`` error frame, then close)

The client checks the server's proof before it trusts the connection, so an impostor
server that does not hold the token is refused too.

where H is the sha256 of the hello's canonical JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import ssl as ssl_module
from collections.abc import Mapping
from typing import Any

from crowdd import wire
from crowdd.errors import CrowddError, ErrorCode

logger = logging.getLogger(__name__)

_DOMAIN = b"crowdd-auth/1"
NONCE_BYTES = 32


class AuthError(CrowddError):
    """The peer could not prove group membership (or we could not). ``unreachable``: the
    connection itself failed (worth retrying), as opposed to a refusal."""

    default_code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str, code: ErrorCode | None = None, *, unreachable: bool = False) -> None:
        super().__init__(message, code=code)
        self.args = (message,)
        self.unreachable = unreachable


def _key(token: str) -> bytes:
    if not isinstance(token, str) or not token:
        raise ValueError("the group token must be a non-empty string")
    return token.encode("utf-8")


def _hello_digest(hello: Mapping[str, Any]) -> str:
    raw = json.dumps(dict(hello), sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(raw).hexdigest()


def proof(token: str, role: str, purpose: str, client_nonce: str, server_nonce: str, hello_digest: str) -> str:
    """The HMAC a side sends; exposed for tests."""
    msg = b"|".join(
        x.encode("utf-8") if isinstance(x, str) else x
        for x in (_DOMAIN, role, purpose, client_nonce, server_nonce, hello_digest)
    )
    return hmac.new(_key(token), msg, hashlib.sha256).hexdigest()


def _nonce_ok(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token: str,
    purpose: str,
    *,
    timeout: float = wire.DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Server side. Returns the client's hello dict once it has proved membership.

    On failure sends an ``unauthorized`` (or ``version``/``bad_frame``) error frame,
    closes the connection and raises :class:`AuthError`.
    """
    try:
        first = await wire.read_frame(reader, timeout=timeout)
        wire.check_proto(first)
        if first.get("type") != "hello":
            raise wire.WireError(wire.ErrorCode.BAD_FRAME, "expected a hello frame")
        client_nonce = str(first.get("nonce"))
        if not _nonce_ok(first.get("nonce")):
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, "nonce must be 64 hex digits", field="nonce")
        hello = first.get("hello", {})
        if not isinstance(hello, dict):
            raise wire.WireError(wire.ErrorCode.BAD_FIELD, "hello must be an object", field="hello")
        if first.get("purpose") != purpose:
            raise wire.WireError(wire.ErrorCode.UNAUTHORIZED, "wrong purpose for this port")
        server_nonce = secrets.token_hex(NONCE_BYTES)
        digest = _hello_digest(hello)
        await wire.write_frame(writer, {"type": "challenge", "nonce": server_nonce}, timeout=timeout)
        answer = await wire.read_frame(reader, timeout=timeout)
        got = answer.get("proof")
        want = proof(token, "client", purpose, client_nonce, server_nonce, digest)
        if answer.get("type") != "auth" or not isinstance(got, str) or not hmac.compare_digest(got, want):
            raise wire.WireError(wire.ErrorCode.UNAUTHORIZED, "group membership not proved")
        await wire.write_frame(
            writer,
            {"type": "welcome", "proof": proof(token, "server", purpose, client_nonce, server_nonce, digest)},
            timeout=timeout,
        )
        return hello
    except wire.WireError as exc:
        logger.info("refused %s connection: %s", purpose, exc.message)
        await wire.send_error_and_close(writer, exc)
        raise AuthError(exc.message, exc.code) from None
    except (wire.ConnectionClosed, wire.FrameTimeout, OSError) as exc:
        await wire.close_writer(writer)
        raise AuthError(f"handshake failed: {exc}") from None


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token: str,
    purpose: str,
    hello: Mapping[str, Any],
    *,
    timeout: float = wire.DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Client side on an open connection. Returns the server's welcome frame.

    Raises :class:`AuthError` (and closes) when the server refuses us or cannot prove it
    holds the token itself.
    """
    client_nonce = secrets.token_hex(NONCE_BYTES)
    digest = _hello_digest(hello)
    try:
        await wire.write_frame(
            writer,
            {"type": "hello", "proto": wire.PROTO, "purpose": purpose, "nonce": client_nonce, "hello": dict(hello)},
            timeout=timeout,
        )
        challenge = await wire.read_frame(reader, timeout=timeout)
        wire.raise_if_error(challenge)
        server_nonce = str(challenge.get("nonce"))
        if challenge.get("type") != "challenge" or not _nonce_ok(challenge.get("nonce")):
            raise AuthError("malformed challenge from server")
        await wire.write_frame(
            writer,
            {"type": "auth", "proof": proof(token, "client", purpose, client_nonce, server_nonce, digest)},
            timeout=timeout,
        )
        welcome = await wire.read_frame(reader, timeout=timeout)
        wire.raise_if_error(welcome)
        if welcome.get("type") != "welcome":
            raise AuthError(f"unexpected {welcome.get('type')!r} frame after auth")
        got = welcome.get("proof")
        want = proof(token, "server", purpose, client_nonce, server_nonce, digest)
        if not isinstance(got, str) or not hmac.compare_digest(got, want):
            raise AuthError("server could not prove group membership")
        return welcome
    except wire.RemoteError as exc:
        await wire.close_writer(writer)
        raise AuthError(exc.message, exc.code) from None
    except AuthError:
        await wire.close_writer(writer)
        raise
    except (wire.WireError, wire.ConnectionClosed, wire.FrameTimeout, OSError) as exc:
        await wire.close_writer(writer)
        raise AuthError(f"handshake failed: {exc}", unreachable=True) from None


async def connect(
    host: str,
    port: int,
    token: str,
    purpose: str,
    hello: Mapping[str, Any],
    *,
    timeout: float = wire.DEFAULT_TIMEOUT,
    limit: int = 1 << 20,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    """Open a connection and prove membership; returns (reader, writer, welcome).

    With ``ssl`` the connection is TLS before the first frame (the context says who the server
    must be and which certificate we present), and the token proof runs inside it as a second
    factor. ``ssl_handshake_timeout`` (default ``timeout``) bounds the TLS handshake; the whole
    connect, handshake included, is bounded by ``timeout`` too. A server whose certificate the
    context does not accept raises AuthError (not ``unreachable``); a server that refuses our
    certificate closes the connection with an alert, which surfaces as an ``unreachable``
    AuthError from the token handshake (TLS 1.3 reports it after the client's handshake).
    """
    _key(token)
    if ssl is None and ssl_handshake_timeout is not None:
        raise ValueError("ssl_handshake_timeout needs ssl")
    tls_timeout = (ssl_handshake_timeout if ssl_handshake_timeout is not None else timeout) if ssl else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=limit, ssl=ssl, ssl_handshake_timeout=tls_timeout),
            timeout,
        )
    except ssl_module.SSLCertVerificationError as exc:
        raise AuthError(f"{host}:{port} is not the expected member: {exc.verify_message}") from None
    except asyncio.TimeoutError:
        raise AuthError(f"connect to {host}:{port} timed out", unreachable=True) from None
    except OSError as exc:
        raise AuthError(f"cannot connect to {host}:{port}: {exc}", unreachable=True) from None
    welcome = await handshake(reader, writer, token, purpose, hello, timeout=timeout)
    return reader, writer, welcome
