"""Group-membership proof (crowdd.trust.auth) over real loopback sockets, plaintext and inside TLS."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crowdd import wire
from crowdd.trust import auth
from crowdd.testing.identities import identity
from crowdd.trust.tls import client_context, server_context

TOKEN = secrets.token_hex(16)


class Server:
    """A real TCP server that runs auth.accept and records what happened."""

    def __init__(self, token: str, purpose: str) -> None:
        self.token = token
        self.purpose = purpose
        self.hellos: list[dict[str, Any]] = []
        self.errors: list[auth.AuthError] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await auth.accept(reader, writer, self.token, self.purpose, timeout=2.0)
        except auth.AuthError as exc:
            self.errors.append(exc)
            return
        self.hellos.append(hello)
        await wire.write_frame(writer, {"type": "pong"})
        await wire.close_writer(writer)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._on, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(TOKEN, "data")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


async def test_both_sides_prove_and_hello_arrives(server: Server) -> None:
    reader, writer, welcome = await auth.connect("127.0.0.1", server.port, TOKEN, "data", {"index": 3}, timeout=2)
    assert welcome["type"] == "welcome"
    frame = await wire.read_frame(reader, timeout=2)
    assert frame["type"] == "pong"
    await wire.close_writer(writer)
    assert server.hellos == [{"index": 3}]


async def test_wrong_token_is_refused_with_unauthorized(server: Server) -> None:
    with pytest.raises(auth.AuthError) as err:
        await auth.connect("127.0.0.1", server.port, "not-the-token", "data", {"index": 1}, timeout=2)
    assert err.value.code == "unauthorized"
    await asyncio.sleep(0.05)
    assert server.hellos == []
    assert server.errors and server.errors[0].code == "unauthorized"


async def test_token_never_crosses_the_wire(server: Server) -> None:
    """Record every byte the client sends; the token must not be among them."""
    sent = bytearray()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    orig = writer.write

    def spy(data: bytes | bytearray | memoryview) -> None:
        sent.extend(data)
        orig(data)

    writer.write = spy  # type: ignore[method-assign]
    await auth.handshake(reader, writer, TOKEN, "data", {"index": 1}, timeout=2)
    await wire.close_writer(writer)
    assert TOKEN.encode() not in sent
    assert b"proof" in sent


async def test_proof_for_one_purpose_is_refused_on_another() -> None:
    srv = Server(TOKEN, "session")
    await srv.start()
    try:
        with pytest.raises(auth.AuthError) as err:
            await auth.connect("127.0.0.1", srv.port, TOKEN, "data", {"index": 1}, timeout=2)
        assert err.value.code == "unauthorized"
    finally:
        await srv.close()


async def test_replayed_proof_is_refused(server: Server) -> None:
    """A proof captured on one connection is useless on the next (fresh server nonce)."""
    nonce = secrets.token_hex(auth.NONCE_BYTES)
    captured = None
    for attempt in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await wire.write_frame(writer, {"type": "hello", "proto": wire.PROTO, "purpose": "data",
                                        "nonce": nonce, "hello": {"index": 1}})
        challenge = await wire.read_frame(reader, timeout=2)
        if captured is None:
            captured = auth.proof(TOKEN, "client", "data", nonce, challenge["nonce"],
                                  auth._hello_digest({"index": 1}))
        await wire.write_frame(writer, {"type": "auth", "proof": captured})
        answer = await wire.read_frame(reader, timeout=2)
        await wire.close_writer(writer)
        if attempt == 0:
            assert answer["type"] == "welcome"
        else:
            assert answer == {"type": "error", "code": "unauthorized", "message": answer["message"]}


async def test_tampered_hello_is_refused(server: Server) -> None:
    """The proof covers the hello: claiming another node index with someone's proof fails."""
    nonce = secrets.token_hex(auth.NONCE_BYTES)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await wire.write_frame(writer, {"type": "hello", "proto": wire.PROTO, "purpose": "data",
                                    "nonce": nonce, "hello": {"index": 5}})
    challenge = await wire.read_frame(reader, timeout=2)
    forged = auth.proof(TOKEN, "client", "data", nonce, challenge["nonce"], auth._hello_digest({"index": 1}))
    await wire.write_frame(writer, {"type": "auth", "proof": forged})
    answer = await wire.read_frame(reader, timeout=2)
    await wire.close_writer(writer)
    assert answer["code"] == "unauthorized"


async def test_impostor_server_is_refused_by_client() -> None:
    """A server without the token cannot fake its welcome proof (mutual auth)."""

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wire.read_frame(reader, timeout=2)
        await wire.write_frame(writer, {"type": "challenge", "nonce": secrets.token_hex(auth.NONCE_BYTES)})
        await wire.read_frame(reader, timeout=2)
        await wire.write_frame(writer, {"type": "welcome", "proof": "0" * 64})
        await asyncio.sleep(0.5)
        await wire.close_writer(writer)

    srv = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with pytest.raises(auth.AuthError, match="server could not prove"):
            await auth.connect("127.0.0.1", port, TOKEN, "data", {"index": 1}, timeout=2)
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "hello", "proto": "crowdd/0", "purpose": "data", "nonce": "a" * 64, "hello": {}}, "version"),
        ({"type": "hello", "proto": wire.PROTO, "purpose": "data", "nonce": "xyz", "hello": {}}, "bad_field"),
        ({"type": "hello", "proto": wire.PROTO, "purpose": "data", "nonce": "a" * 64, "hello": [1]}, "bad_field"),
        ({"type": "get", "proto": wire.PROTO}, "bad_frame"),
    ],
)
async def test_bad_hello_gets_an_error_frame(server: Server, first: dict[str, Any], code: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await wire.write_frame(writer, first)
    answer = await wire.read_frame(reader, timeout=2)
    assert answer["type"] == "error" and answer["code"] == code
    with pytest.raises(wire.ConnectionClosed):
        await wire.read_frame(reader, timeout=2)
    await wire.close_writer(writer)


async def test_silent_client_times_out(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    with pytest.raises(wire.ConnectionClosed):
        await wire.read_frame(reader, timeout=5)
    await wire.close_writer(writer)
    assert server.errors and "handshake failed" in str(server.errors[0])


async def test_nobody_listening_is_a_connection_error() -> None:
    sock_srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = sock_srv.sockets[0].getsockname()[1]
    sock_srv.close()
    await sock_srv.wait_closed()
    with pytest.raises(auth.AuthError) as err:
        await auth.connect("127.0.0.1", port, TOKEN, "data", {}, timeout=2)
    assert err.value.unreachable


def test_empty_token_is_rejected() -> None:
    with pytest.raises(ValueError, match="token"):
        auth.proof("", "client", "data", "a" * 64, "b" * 64, "c" * 64)


def test_proof_binds_role_and_purpose() -> None:
    args = ("a" * 64, "b" * 64, "c" * 64)
    proofs = {auth.proof(TOKEN, r, p, *args) for r in ("client", "server") for p in ("data", "session")}
    assert len(proofs) == 4


# --------------------------------------------------------------------------- inside TLS


@pytest.fixture
async def tls_server() -> AsyncIterator[Server]:
    """The same server behind TLS 1.3 presenting "auth-a" and accepting only "auth-b"."""
    srv = Server(TOKEN, "data")
    await srv.start(server_context(identity("auth-a"), peers=[identity("auth-b").cert_pem]))
    try:
        yield srv
    finally:
        await srv.close()


def _client(name: str | None = "auth-b", pinned: str = "auth-a") -> ssl.SSLContext:
    return client_context(identity(name) if name else None, pinned=[identity(pinned).cert_pem])


async def test_token_proof_runs_inside_tls_1_3(tls_server: Server) -> None:
    reader, writer, welcome = await auth.connect("127.0.0.1", tls_server.port, TOKEN, "data", {"index": 3},
                                                 timeout=2, ssl=_client(), ssl_handshake_timeout=2)
    try:
        assert welcome["type"] == "welcome"
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert (await wire.read_frame(reader, timeout=2))["type"] == "pong"
    finally:
        await wire.close_writer(writer)
    assert tls_server.hellos == [{"index": 3}]


async def test_token_is_still_required_inside_tls(tls_server: Server) -> None:
    with pytest.raises(auth.AuthError) as err:
        await auth.connect("127.0.0.1", tls_server.port, "wrong", "data", {}, timeout=2, ssl=_client())
    assert err.value.code == "unauthorized" and not err.value.unreachable


async def test_a_server_that_is_not_the_pinned_one_is_refused(tls_server: Server) -> None:
    with pytest.raises(auth.AuthError, match="not the expected member") as err:
        await auth.connect("127.0.0.1", tls_server.port, TOKEN, "data", {}, timeout=2,
                           ssl=_client(pinned="auth-c"))
    assert not err.value.unreachable
    assert tls_server.hellos == [] and tls_server.errors == []


@pytest.mark.parametrize("name", ["auth-c", None], ids=["foreign-cert", "no-cert"])
async def test_a_client_the_server_does_not_accept_never_reaches_the_token_handshake(
    tls_server: Server, name: str | None
) -> None:
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", tls_server.port, TOKEN, "data", {}, timeout=2, ssl=_client(name))
    assert tls_server.hellos == [] and tls_server.errors == []


async def test_plaintext_client_on_a_tls_server_is_refused(tls_server: Server) -> None:
    with pytest.raises(auth.AuthError):
        await auth.connect("127.0.0.1", tls_server.port, TOKEN, "data", {}, timeout=2)
    assert tls_server.hellos == [] and tls_server.errors == []


async def test_ssl_handshake_timeout_bounds_a_server_that_never_answers_tls() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    srv = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        with pytest.raises(auth.AuthError) as err:
            await auth.connect("127.0.0.1", port, TOKEN, "data", {}, timeout=10, ssl=_client(),
                               ssl_handshake_timeout=0.3)
        assert err.value.unreachable
        assert loop.time() - start < 3
    finally:
        srv.close()
        await srv.wait_closed()


async def test_ssl_handshake_timeout_needs_ssl() -> None:
    with pytest.raises(ValueError, match="needs ssl"):
        await auth.connect("127.0.0.1", 1, TOKEN, "data", {}, ssl_handshake_timeout=1.0)
