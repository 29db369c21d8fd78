"""TLS 1.3 with pinned identities (crowdd.trust.tls): real handshakes on 127.0.0.1, and the attacks they stop.

Every attacker test asserts that the server's handler never ran for the attacker (the only way
to get a byte of application data) and that the server then still serves a valid client.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crowdd.trust import tls
from crowdd.errors import CrowddError, ErrorCode, InputError
from crowdd.trust.identity import Identity, check_certificate, fingerprint_of

T = 5.0  # generous per-step timeout; nothing here should come near it


class Server:
    """A real TLS server: each accepted client sends one line and is answered ``hello <its fingerprint>``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.served: list[tuple[str | None, bytes]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fp = tls.peer_fingerprint(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), T)
            self.served.append((fp, line))
            if line:
                writer.write(b"hello " + (fp or "anonymous").encode() + b"\n")
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._on, "127.0.0.1", 0, ssl=self.ctx, ssl_handshake_timeout=T)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """a: the server; b: its one allowed client; c: a stranger with a valid identity of its own."""
    return {n: Identity.load_or_create(tmp_path / "ids", n) for n in ("a", "b", "c")}


@pytest.fixture
async def server(ids: dict[str, Identity]) -> AsyncIterator[Server]:
    srv = await Server(tls.server_context(ids["a"], peers=[ids["b"].cert_pem])).start()
    yield srv
    await srv.stop()


async def talk(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect, send a line, return the answer; a refusal returns ``b""`` (EOF or a TLS alert)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), T)
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), T)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def assert_still_serves(server: Server, ids: dict[str, Identity]) -> None:
    answer = await talk(server.port, tls.client_context(ids["b"], pinned=[ids["a"].cert_pem]))
    assert answer == b"hello " + ids["b"].fingerprint.encode() + b"\n"
    assert server.served[-1] == (ids["b"].fingerprint, b"ping\n")


def write_identity(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert_pem: bytes) -> Identity:
    """An Identity for arbitrary (even invalid) material, bypassing load_or_create's checks."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert_pem)
    return Identity(key_path=key_path, cert_path=cert_path, cert_pem=cert_pem, fingerprint=fingerprint_of(cert_pem))


def self_signed(
    key: ec.EllipticCurvePrivateKey, like: x509.Certificate | None = None, *, expired: bool = False
) -> bytes:
    """A self-signed CA certificate for ``key``; ``like`` copies another certificate's name, serial and dates."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = like.subject if like else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(like.serial_number if like else x509.random_serial_number())
        .not_valid_before(like.not_valid_before_utc if like else now - datetime.timedelta(days=10))
        .not_valid_after(
            like.not_valid_after_utc
            if like
            else now - datetime.timedelta(days=1)
            if expired
            else now + datetime.timedelta(days=10)
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- working connections ----------------------------------------------------------------------


async def test_mutual_tls_each_side_sees_the_other(server: Server, ids: dict[str, Identity]) -> None:
    ctx = tls.client_context(ids["b"], pinned=[ids["a"].cert_pem])
    reader, writer = await tls.open_tls("127.0.0.1", server.port, ctx, expect=ids["a"].fingerprint, timeout=T)
    try:
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert tls.peer_fingerprint(writer) == ids["a"].fingerprint
        assert tls.require_peer(writer, {ids["a"].fingerprint}) == ids["a"].fingerprint
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.read(), T) == b"hello " + ids["b"].fingerprint.encode() + b"\n"
    finally:
        writer.close()
    assert server.served == [(ids["b"].fingerprint, b"ping\n")]


async def test_unpinned_client_context_checks_the_fingerprint_after_the_handshake(
    server: Server, ids: dict[str, Identity]
) -> None:
    ctx = tls.client_context(ids["b"])  # CERT_NONE: the fingerprint is the pin
    reader, writer = await tls.open_tls("127.0.0.1", server.port, ctx, expect=ids["a"].fingerprint, timeout=T)
    writer.write(b"ping\n")
    assert (await asyncio.wait_for(reader.read(), T)).startswith(b"hello ")
    writer.close()


async def test_server_without_peers_requests_no_client_certificate(ids: dict[str, Identity]) -> None:
    srv = await Server(tls.server_context(ids["a"])).start()
    try:
        assert await talk(srv.port, tls.client_context(None, pinned=[ids["a"].cert_pem])) == b"hello anonymous\n"
        assert await talk(srv.port, tls.client_context(ids["b"])) == b"hello anonymous\n"  # not requested, not sent
    finally:
        await srv.stop()


async def test_require_peer_refuses_others_and_anonymous(ids: dict[str, Identity]) -> None:
    seen: list[BaseException | str] = []

    async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(tls.require_peer(writer, {ids["c"].fingerprint}))
        except CrowddError as exc:
            seen.append(exc)
        writer.close()

    srv = await asyncio.start_server(on, "127.0.0.1", 0, ssl=tls.server_context(ids["a"]))
    port = srv.sockets[0].getsockname()[1]
    try:
        for ctx in (tls.client_context(None), tls.client_context(ids["b"])):
            _, writer = await tls.open_tls("127.0.0.1", port, ctx, expect=None, timeout=T)
            writer.close()
            while len(seen) < 1:
                await asyncio.sleep(0.01)
            exc = seen.pop()
            assert isinstance(exc, CrowddError) and exc.code is ErrorCode.UNAUTHORIZED
    finally:
        srv.close()
        await srv.wait_closed()


def test_contexts_are_tls13_only(ids: dict[str, Identity]) -> None:
    for ctx in (tls.server_context(ids["a"]), tls.client_context(ids["a"], pinned=[ids["b"].cert_pem])):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3 and ctx.maximum_version is ssl.TLSVersion.TLSv1_3
    assert tls.server_context(ids["a"], peers=[ids["b"].cert_pem]).verify_mode is ssl.CERT_REQUIRED
    assert tls.client_context(None, pinned=[ids["a"].cert_pem]).verify_mode is ssl.CERT_REQUIRED
    assert tls.client_context(None).verify_mode is ssl.CERT_NONE
    with pytest.raises(InputError):
        tls.server_context(ids["a"], peers=[b"not a certificate"])


# --- attacks ----------------------------------------------------------------------------------


async def test_stranger_and_anonymous_clients_are_refused(server: Server, ids: dict[str, Identity]) -> None:
    pinned = [ids["a"].cert_pem]
    assert await talk(server.port, tls.client_context(ids["c"], pinned=pinned)) == b""
    assert await talk(server.port, tls.client_context(None, pinned=pinned)) == b""
    assert server.served == []
    await assert_still_serves(server, ids)


async def test_empty_peer_set_refuses_everyone(ids: dict[str, Identity]) -> None:
    srv = await Server(tls.server_context(ids["a"], peers=[])).start()
    try:
        assert await talk(srv.port, tls.client_context(ids["b"], pinned=[ids["a"].cert_pem])) == b""
        assert srv.served == []
    finally:
        await srv.stop()


def test_a_certificate_cannot_be_loaded_without_its_key(ids: dict[str, Identity]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError):
        ctx.load_cert_chain(ids["b"].cert_path, ids["c"].key_path)


async def test_lookalike_of_the_allowed_certificate_is_refused(
    server: Server, ids: dict[str, Identity], tmp_path: Path
) -> None:
    """Same subject, serial and dates as b's certificate, but the attacker's own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    fake = write_identity(
        tmp_path / "evil", "b", key, self_signed(key, x509.load_pem_x509_certificate(ids["b"].cert_pem))
    )
    assert await talk(server.port, tls.client_context(fake, pinned=[ids["a"].cert_pem])) == b""
    assert server.served == []
    await assert_still_serves(server, ids)


async def test_allowed_certificate_appended_to_an_attackers_chain_is_refused(
    server: Server, ids: dict[str, Identity], tmp_path: Path
) -> None:
    """The attacker sends b's real certificate in its chain, behind a leaf it holds the key for."""
    key = ec.generate_private_key(ec.SECP256R1())
    evil = write_identity(tmp_path / "evil", "e", key, self_signed(key) + ids["b"].cert_pem)
    assert await talk(server.port, tls.client_context(evil, pinned=[ids["a"].cert_pem])) == b""
    assert server.served == []
    await assert_still_serves(server, ids)


async def test_open_tls_refuses_a_server_with_the_wrong_fingerprint(server: Server, ids: dict[str, Identity]) -> None:
    ctx = tls.client_context(ids["b"])
    with pytest.raises(CrowddError) as info:
        await tls.open_tls("127.0.0.1", server.port, ctx, expect=ids["c"].fingerprint, timeout=T)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    # A pinned context refuses the impostor in the handshake itself.
    with pytest.raises(CrowddError) as info:
        await tls.open_tls(
            "127.0.0.1", server.port, tls.client_context(ids["b"], pinned=[ids["c"].cert_pem]), expect=None, timeout=T
        )
    assert info.value.code is ErrorCode.UNAUTHORIZED
    for _ in range(100):  # the server saw each connection end without a line
        if len(server.served) == 1:
            break
        await asyncio.sleep(0.02)
    assert server.served == [(ids["b"].fingerprint, b"")]
    await assert_still_serves(server, ids)


async def test_open_tls_times_out_on_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers the ClientHello
        writer.close()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await tls.open_tls("127.0.0.1", port, tls.client_context(None), expect=None, timeout=0.3)
    finally:
        srv.close()
        await srv.wait_closed()


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` over plain TCP; return everything the server sends back until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), T)
    except ConnectionError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize(
    "data",
    [
        b'{"type": "hello", "proto": "crowdd/1"}\n',
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(2048),
        b"\x16\x03\x01\x02\x00" + os.urandom(512),  # a handshake record header, then garbage
    ],
    ids=["frame", "http", "random", "fake-handshake"],
)
async def test_plaintext_and_garbage_get_nothing_readable(
    server: Server, ids: dict[str, Identity], data: bytes
) -> None:
    answer = await raw(server.port, data)
    assert b"hello" not in answer
    assert answer == b"" or answer[0] == 0x15  # at most a TLS alert record
    assert server.served == []
    await assert_still_serves(server, ids)


async def test_garbage_after_a_real_client_hello_is_refused(server: Server, ids: dict[str, Identity]) -> None:
    """A genuine ClientHello, the server's flight, then garbage where the client's Finished belongs."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client_context(ids["b"], pinned=[ids["a"].cert_pem]).wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(outgoing.read())
        await writer.drain()
        flight = await asyncio.wait_for(reader.read(4096), T)
        assert flight[:1] == b"\x16"  # ServerHello
        junk = os.urandom(200)
        writer.write(b"\x17\x03\x03" + struct.pack(">H", len(junk)) + junk)  # looks like an encrypted record
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), T)
    except ConnectionError:
        rest = b""
    finally:
        writer.close()
    assert b"hello" not in flight + rest
    assert server.served == []
    await assert_still_serves(server, ids)


async def test_expired_certificates_are_refused(server: Server, ids: dict[str, Identity], tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    old = write_identity(tmp_path / "old", "old", key, self_signed(key, expired=True))
    with pytest.raises(InputError, match="expired"):
        check_certificate(old.cert_pem)
    # A server pinned to an expired client certificate refuses it ...
    srv = await Server(tls.server_context(ids["a"], peers=[old.cert_pem])).start()
    try:
        assert await talk(srv.port, tls.client_context(old, pinned=[ids["a"].cert_pem])) == b""
        assert srv.served == []
    finally:
        await srv.stop()
    # ... and a client pinned to an expired server certificate refuses the server.
    srv = await Server(tls.server_context(old, peers=[ids["b"].cert_pem])).start()
    try:
        with pytest.raises(CrowddError, match="expired") as info:
            await tls.open_tls(
                "127.0.0.1", srv.port, tls.client_context(ids["b"], pinned=[old.cert_pem]), expect=None, timeout=T
            )
        assert info.value.code is ErrorCode.UNAUTHORIZED
        assert srv.served == []
    finally:
        await srv.stop()


async def test_tls12_client_is_refused(server: Server, ids: dict[str, Identity]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ids["b"].cert_path, ids["b"].key_path)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # an alert, or the server hanging up
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port, ssl=ctx), T)
        writer.close()
    assert server.served == []
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3  # control: the same client, allowed TLS 1.3, is served
    assert await talk(server.port, ctx) == b"hello " + ids["b"].fingerprint.encode() + b"\n"
    await assert_still_serves(server, ids)


async def test_tls12_server_is_refused(ids: dict[str, Identity]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ids["a"].cert_path, ids["a"].key_path)
    srv = await Server(ctx).start()
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls.open_tls(
                "127.0.0.1", srv.port, tls.client_context(ids["b"]), expect=ids["a"].fingerprint, timeout=T
            )
        assert srv.served == []
    finally:
        await srv.stop()


# --- a member minting certificates under its own -------------------------------------------------


def _minted_chain(issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, tmp: Path) -> tuple[Path, Path]:
    """A leaf for a fresh key, signed by ``issuer``'s key, with ``issuer`` after it: the chain
    a member would present to pass as someone its peers never pinned."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    chain, key_file = tmp / "minted.crt", tmp / "minted.key"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + issuer.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_file


async def _handshake_with(chain: Path, key: Path, pinned: bytes) -> str:
    """Serve ``chain`` and connect a client that pins ``pinned``: "ok" or why it failed."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(chain, key)
    srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=sctx)
    try:
        port = srv.sockets[0].getsockname()[1]
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls.client_context(None, pinned=[pinned])), T)
        writer.close()
        return "ok"
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    finally:
        srv.close()


async def test_a_member_cannot_mint_a_certificate_its_peers_accept(tmp_path: Path) -> None:
    """A peer pins a member's certificate as the only trust anchor. The member signs a leaf for
    another key with its own key and presents that chain: with a leaf identity (what crowdd
    makes) the handshake refuses it. The control: under an old CA-form identity the same
    chain passes the handshake (only the fingerprint check after it stops it); and the
    member's own certificate passes."""
    member = Identity.load_or_create(tmp_path / "member", "node")
    member_key = serialization.load_pem_private_key(member.key_path.read_bytes(), None)
    assert isinstance(member_key, ec.EllipticCurvePrivateKey)
    member_cert = x509.load_pem_x509_certificate(member.cert_pem)
    assert await _handshake_with(member.cert_path, member.key_path, member.cert_pem) == "ok"
    chain, key = _minted_chain(member_key, member_cert, tmp_path)
    refused = await _handshake_with(chain, key, member.cert_pem)
    assert "invalid CA certificate" in refused, refused

    old_ca = x509.load_pem_x509_certificate(self_signed(member_key, member_cert))  # the CA form, same key
    chain, key = _minted_chain(member_key, old_ca, tmp_path)
    assert await _handshake_with(chain, key, old_ca.public_bytes(serialization.Encoding.PEM)) == "ok"
