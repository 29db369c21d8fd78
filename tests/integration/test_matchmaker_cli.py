"""`crowdd matchmaker` as a real process: it serves TLS 1.3 with a kept (or the operator's)
certificate and prints its fingerprint, groups, and exits cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from crowdd.trust.identity import Identity
from crowdd.matchmaker.client import MatchmakerUntrusted, register
from crowdd.testing.identities import hello_identity

pytestmark = pytest.mark.timeout(60)

DIGEST = "cd" * 32


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crowdd", "matchmaker", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


Running = tuple[asyncio.subprocess.Process, tuple[str, int], str]


async def _start(*args: str) -> Running:
    """Spawn the matchmaker; return it once it listens, with its address and printed fingerprint."""
    proc = await _spawn("--listen", "127.0.0.1:0", "-v", *args)
    assert proc.stderr is not None
    address, fingerprint = None, None
    try:
        async with asyncio.timeout(30):
            while address is None or fingerprint is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "the matchmaker exited before listening"
                m = re.search(r"crowdd matchmaker listening on (\S+):(\d+)$", line.strip())
                if m:
                    address = (m.group(1), int(m.group(2)))
                m = re.search(r"crowdd matchmaker fingerprint (sha256:[0-9a-f]{64})$", line.strip())
                if m:
                    fingerprint = m.group(1)
    except BaseException:
        await _kill(proc)
        raise
    return proc, address, fingerprint


@pytest.fixture
async def matchmaker(tmp_path: Path) -> AsyncIterator[Running]:
    running = await _start("--root", str(tmp_path))
    try:
        yield running
    finally:
        await _kill(running[0])


@pytest.fixture
def ports() -> Iterator[dict[str, Any]]:
    """Real data and session listeners, so the matchmaker's connect-back finds them."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        yield {"data": socks[0].getsockname()[1], "session": socks[1].getsockname()[1]}
    finally:
        for s in socks:
            s.close()


def _hellos(ports: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    worker = {"role": "worker", "name": "w", "ports": {**ports, "tf": [3]}, **hello_identity("w")}
    host = {
        "role": "host", "name": "h", "ports": {**ports, "tf": [6, 7]}, **hello_identity("h"),
        "job": {"workers": 1}, "dataset": {"digest": DIGEST, "size": 1, "name": "d"},
    }
    return worker, host


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serves_and_exits_cleanly(matchmaker: Running, ports: dict[str, Any], sig: signal.Signals) -> None:
    proc, address, fingerprint = matchmaker
    assert address[1] > 0
    hello_w, hello_h = _hellos(ports)
    w = asyncio.create_task(register(address, hello_w, timeout=20, fingerprint=fingerprint))
    h = asyncio.create_task(register(address, hello_h, timeout=20, fingerprint=fingerprint))
    gw, gh = await w, await h
    assert gw.group_id == gh.group_id and {gw.index, gh.index} == {0, 1}
    assert gw.reachable == (True, True)  # the connect-back found the listeners
    proc.send_signal(sig)
    async with asyncio.timeout(20):
        rc = await proc.wait()
    assert rc == 0
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "Traceback" not in err
    assert "formed" in err  # the group was logged (-v)


async def test_the_self_signed_identity_is_made_once_and_kept(tmp_path: Path, ports: dict[str, Any]) -> None:
    state = tmp_path / "mm-state"
    fingerprints = []
    for _ in range(2):
        proc, address, fingerprint = await _start("--root", str(tmp_path), "--state-dir", str(state))
        try:
            fingerprints.append(fingerprint)
            with pytest.raises(MatchmakerUntrusted):  # the system does not trust a self-signed one
                await register(address, _hellos(ports)[0], timeout=20, fingerprint="")
        finally:
            await _kill(proc)
    assert fingerprints[0] == fingerprints[1] == Identity.load_or_create(state, "matchmaker").fingerprint
    key = next(p for p in state.iterdir() if p.name.startswith("matchmaker") and "key" in p.name)
    assert key.stat().st_mode & 0o077 == 0


async def test_the_operators_certificate_is_served(tmp_path: Path, ports: dict[str, Any]) -> None:
    op = Identity.load_or_create(tmp_path / "operator", "mm.example.org")
    proc, address, fingerprint = await _start("--root", str(tmp_path), "--cert", str(op.cert_path), "--key", str(op.key_path))
    try:
        assert fingerprint == op.fingerprint
        hello_w, hello_h = _hellos(ports)
        plans = await asyncio.gather(register(address, hello_w, timeout=20, fingerprint=fingerprint),
                                     register(address, hello_h, timeout=20, fingerprint=fingerprint))
        assert {p.index for p in plans} == {0, 1}
    finally:
        await _kill(proc)


@pytest.mark.parametrize("which", ["cert-only", "not-a-cert", "wrong-key"])
async def test_a_bad_certificate_is_an_error(tmp_path: Path, which: str) -> None:
    a = Identity.load_or_create(tmp_path / "a", "a")
    b = Identity.load_or_create(tmp_path / "b", "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    args = {
        "cert-only": ["--cert", str(a.cert_path)],
        "not-a-cert": ["--cert", str(junk), "--key", str(a.key_path)],
        "wrong-key": ["--cert", str(a.cert_path), "--key", str(b.key_path)],
    }[which]
    proc = await _spawn("--listen", "127.0.0.1:0", "--root", str(tmp_path), *args)
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 2
        assert (b"--cert and --key go together" if which == "cert-only" else b"cannot use the certificate") in err
        assert b"Traceback" not in err
    finally:
        await _kill(proc)


async def test_bad_listen_is_an_error(tmp_path: Path) -> None:
    proc = await _spawn("--listen", "127.0.0.1:notaport", "--root", str(tmp_path))
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 2
        assert b"HOST:PORT" in err and b"Traceback" not in err
    finally:
        await _kill(proc)


async def test_bad_config_names_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "mm.toml"
    cfg.write_text("[matchmaker]\nmax_clients = \"lots\"\n")
    proc = await _spawn("--config", str(cfg), "--root", str(tmp_path))
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 2
        assert str(cfg).encode() in err and b"matchmaker.max_clients" in err
    finally:
        await _kill(proc)


async def test_port_in_use_is_an_error(tmp_path: Path) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    proc = await _spawn("--listen", f"127.0.0.1:{port}", "--root", str(tmp_path))
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 1
        assert b"cannot listen" in err and b"Traceback" not in err
    finally:
        await _kill(proc)
        busy.close()
