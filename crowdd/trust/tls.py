"""TLS 1.3-only contexts with pinned self-signed identities (see :mod:`crowdd.trust.identity`).

There are no certificate authorities and no host names: a side either pins the exact
certificates it accepts (each loaded as its own trust anchor, verified with ``CERT_REQUIRED``,
so OpenSSL checks the signature chain, the validity dates and the peer's proof of its key), or
accepts any certificate in the handshake and compares the :func:`peer_fingerprint` afterwards
(``open_tls(expect=...)``, :func:`require_peer`).

Servers should pass ``ssl_handshake_timeout`` to :func:`asyncio.start_server` as well, so a
client that stalls its handshake does not hold a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Collection, Iterable

from crowdd.errors import CrowddError, ErrorCode
from crowdd.trust.identity import Identity, fingerprint_of

logger = logging.getLogger(__name__)

#: A reasonable default for handshake timeouts (seconds).
HANDSHAKE_TIMEOUT = 10.0


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def pin(ctx: ssl.SSLContext, certs: Iterable[bytes]) -> None:
    """Trust exactly ``certs`` (PEM); each must be a certificate (InputError otherwise)."""
    for pem in certs:
        fingerprint_of(pem)  # refuses anything that is not a certificate, with field "cert"
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED


def server_context(identity: Identity, peers: Iterable[bytes] | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only server context presenting ``identity``.

    ``peers`` given: a client must present one of exactly these certificates (PEM) and prove
    it holds its key, or the handshake fails (an empty ``peers`` refuses every client).
    ``peers`` None: no client certificate is requested. Raises InputError (field ``cert``)
    when a peer entry is not a certificate; validity dates are enforced in each handshake.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    if peers is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        pin(ctx, list(peers))
    return ctx


def client_context(identity: Identity | None, *, pinned: Iterable[bytes] | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only client context presenting ``identity`` (when given).

    ``pinned`` given: the server must present one of exactly these certificates (PEM), verified
    with ``CERT_REQUIRED`` (host names are not checked: the pin is the identity). ``pinned``
    None: the server certificate is not verified in the handshake (``CERT_NONE``), so the
    caller must compare :func:`peer_fingerprint` afterwards, as ``open_tls(expect=...)`` does.
    """
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    if identity is not None:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    if pinned is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        pin(ctx, list(pinned))
    return ctx


def peer_fingerprint(writer: asyncio.StreamWriter) -> str | None:
    """The fingerprint of the certificate the peer presented on this connection, if any.

    None for a plaintext connection or a peer that presented no certificate. The certificate
    is only proven to belong to the peer (TLS 1.3 CertificateVerify) when the handshake
    completed, which is the case for any writer asyncio hands out.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return fingerprint_of(der) if der else None


def require_peer(writer: asyncio.StreamWriter, allowed: Collection[str]) -> str:
    """The peer's fingerprint when it is in ``allowed``; otherwise CrowddError ``unauthorized``.

    Does not close the connection: the caller answers or closes it.
    """
    fingerprint = peer_fingerprint(writer)
    if fingerprint is None:
        raise CrowddError("the peer presented no certificate", code=ErrorCode.UNAUTHORIZED)
    if fingerprint not in allowed:
        raise CrowddError(f"the peer's certificate {fingerprint} is not allowed", code=ErrorCode.UNAUTHORIZED)
    return fingerprint


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def open_tls(
    host: str, port: int, ctx: ssl.SSLContext, *, expect: str | None, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect with TLS; return the streams only once the server is known to be the expected one.

    The connection and handshake must finish within ``timeout`` seconds (TimeoutError). When
    ``expect`` is given the server's certificate fingerprint must equal it, or the connection is
    closed and CrowddError ``unauthorized`` raised; a server refused by a pinned ``ctx`` raises
    ``unauthorized`` too. Other TLS or network failures raise OSError (ssl.SSLError included).
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, ssl_handshake_timeout=timeout), timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise CrowddError(
            f"{host}:{port}: the server's certificate is not pinned: {exc.verify_message}", code=ErrorCode.UNAUTHORIZED
        ) from None
    if expect is not None:
        got = peer_fingerprint(writer)
        if got != expect:
            await _close(writer)
            logger.warning("%s:%s presented certificate %s, expected %s", host, port, got, expect)
            raise CrowddError(f"{host}:{port}: the server is not the expected peer", code=ErrorCode.UNAUTHORIZED)
    return reader, writer
