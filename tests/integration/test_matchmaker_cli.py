"""`crowdd matchmaker` as a real process: it serves, groups, and exits cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crowdd.matchmaker_client import register

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


@pytest.fixture
async def matchmaker(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, tuple[str, int]]]:
    proc = await _spawn("--listen", "127.0.0.1:0", "--root", str(tmp_path), "-v")
    try:
        assert proc.stderr is not None
        address = None
        async with asyncio.timeout(30):
            while address is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "the matchmaker exited before listening"
                m = re.search(r"listening on (\S+):(\d+)$", line.strip())
                if m and "crowdd matchmaker" in line:
                    address = (m.group(1), int(m.group(2)))
        yield proc, address
    finally:
        await _kill(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serves_and_exits_cleanly(
    matchmaker: tuple[asyncio.subprocess.Process, tuple[str, int]], sig: signal.Signals
) -> None:
    proc, address = matchmaker
    assert address[1] > 0
    hello_w = {"role": "worker", "name": "w", "ports": {"data": 1, "session": 2, "tf": [3]}}
    hello_h = {
        "role": "host", "name": "h", "ports": {"data": 4, "session": 5, "tf": [6, 7]},
        "job": {"workers": 1}, "dataset": {"digest": DIGEST, "size": 1, "name": "d"},
    }
    w = asyncio.create_task(register(address, hello_w, timeout=20))
    h = asyncio.create_task(register(address, hello_h, timeout=20))
    gw, gh = await w, await h
    assert gw.group_id == gh.group_id and {gw.index, gh.index} == {0, 1}
    proc.send_signal(sig)
    async with asyncio.timeout(20):
        rc = await proc.wait()
    assert rc == 0
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    assert "Traceback" not in err
    assert "formed" in err  # the group was logged (-v)


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
