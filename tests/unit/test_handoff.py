"""crowdd.data.handoff and the control socket's ``host`` with handed-over files (SCM_RIGHTS), on
real Unix sockets: what the client opens, what the daemon accepts, and every bad input."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.data import handoff
from crowdd.client.control import ControlClient
from crowdd.node.control import ControlServer
from crowdd.protocol.endpoint import Endpoint
from crowdd.errors import InputError
from crowdd.protocol.control import HostRequest, check_host, make_host

pytestmark = pytest.mark.timeout(60)

IDX = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
       "train-labels-idx1-ubyte.gz"]


# --------------------------------------------------------------------------- the client side


def test_open_a_file(tmp_path: Path) -> None:
    f = tmp_path / "data.npz"
    f.write_bytes(b"x" * 1000)
    opened = handoff.open_dataset(f)
    try:
        assert not opened.is_dir and opened.describe() == [{"name": "data.npz", "size": 1000}]
        assert os.read(opened.fds[0], 3) == b"xxx"
    finally:
        opened.close()
    assert opened.files == []


def test_an_odd_file_name_is_sent_plainly(tmp_path: Path) -> None:
    f = tmp_path / "my data (v2).csv.gz"
    f.write_bytes(b"1,2\n")
    opened = handoff.open_dataset(f)
    try:
        assert opened.describe()[0]["name"] == "dataset.csv.gz"
    finally:
        opened.close()


def test_open_a_directory_takes_only_its_idx_files(tmp_path: Path) -> None:
    for name in IDX:
        (tmp_path / name).write_bytes(b"i")
    (tmp_path / "README").write_text("not sent")
    opened = handoff.open_dataset(tmp_path)
    try:
        assert opened.is_dir and [f["name"] for f in opened.describe()] == IDX
    finally:
        opened.close()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.npz", "no such file or directory"),
    (lambda p: p, "no IDX files in this directory"),
    (lambda p: (os.mkfifo(p / "fifo.csv"), p / "fifo.csv")[1], "not a regular file"),
])
def test_what_cannot_be_handed_over(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(InputError, match=message) as err:
        handoff.open_dataset(make(tmp_path))
    assert err.value.field == "dataset"


# --------------------------------------------------------------------------- the request


def _frame(files: Any) -> dict[str, Any]:
    return {**make_host("/home/a/x.npz", {}), "files": files}


def test_check_host_with_files_needs_no_path_the_daemon_can_see() -> None:
    req = check_host(_frame([{"name": "x.npz", "size": 5}]))
    assert req.files == (("x.npz", 5),) and str(req.dataset) == "/home/a/x.npz"
    req = check_host(_frame([{"name": n, "size": 1} for n in IDX]))
    assert len(req.files) == 4


@pytest.mark.parametrize("files, field, message", [
    ([], "files", "a list of 1 to 16 files"),
    ("x", "files", "a list of 1 to 16 files"),
    ([{"name": "x", "size": 1}] * 17, "files", "a list of 1 to 16 files"),
    (["x.npz"], "files[0]", "must be an object"),
    ([{"name": "../x.npz", "size": 1}], "files[0].name", "plain file name"),
    ([{"name": ".hidden", "size": 1}], "files[0].name", "plain file name"),
    ([{"name": 3, "size": 1}], "files[0].name", "plain file name"),
    ([{"name": "x.npz", "size": -1}], "files[0].size", "integer >= 0"),
    ([{"name": "x.npz", "size": True}], "files[0].size", "integer >= 0"),
    ([{"name": "x.npz", "size": 1}, {"name": "x.npz", "size": 1}], "files", "same name"),
    ([{"name": "a.npz", "size": 1}, {"name": "b.npz", "size": 1}], "files", "IDX files"),
])
def test_bad_files_fields(files: Any, field: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        check_host(_frame(files))
    assert err.value.field == field


# --------------------------------------------------------------------------- the daemon side


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    return a, b


def test_receive_takes_exactly_the_announced_regular_files(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    a, b = _pair()
    with a, b:
        fd = os.open(f, os.O_RDONLY)
        handoff.send(a, [fd])
        os.close(fd)
        got = handoff.receive(b, 1)
        assert os.read(got[0], 4) == b"data"
        handoff.close_all(got)


@pytest.mark.parametrize("case, message", [
    ("none", "expected 1 open file"),
    ("two", "expected 1 open file"),
    ("pipe", "not a regular file"),
    ("write-only", "not open for reading"),
    ("bad byte", "sent no files"),
])
def test_receive_refuses(tmp_path: Path, case: str, message: str) -> None:
    f = tmp_path / "f"
    f.write_text("data")
    a, b = _pair()
    opened: list[int] = []
    with a, b:
        if case == "none":
            a.sendall(handoff.MARK)
        elif case == "bad byte":
            opened.append(os.open(f, os.O_RDONLY))
            socket.send_fds(a, [b"X"], opened)
        else:
            if case == "two":
                opened += [os.open(f, os.O_RDONLY), os.open(f, os.O_RDONLY)]
            elif case == "pipe":
                r, w = os.pipe()
                opened += [r, w]
                opened.remove(w)
                os.close(w)
            else:
                opened.append(os.open(f, os.O_WRONLY))
            handoff.send(a, opened)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(InputError, match=message):
            handoff.receive(b, 1)
        assert set(os.listdir("/proc/self/fd")) <= before  # whatever came is closed again
    handoff.close_all(opened)


def test_copy_into_checks_size_and_limit(tmp_path: Path) -> None:
    f = tmp_path / "x.npz"
    f.write_bytes(b"a" * 3000)
    fd = os.open(f, os.O_RDONLY)
    os.lseek(fd, 100, os.SEEK_SET)  # copied from the start whatever the client read
    up = handoff.Upload(["x.npz"], [fd], [3000])
    try:
        assert not up.is_dir
        out = up.copy_into(tmp_path / "in")
        assert out == tmp_path / "in" / "x.npz" and out.read_bytes() == b"a" * 3000
        with pytest.raises(InputError, match="larger than this node may keep"):
            up.copy_into(tmp_path / "in2", max_bytes=1000)
        changed = handoff.Upload(["x.npz"], [os.dup(fd)], [2000])
        with pytest.raises(InputError, match="changed while it was handed over"):
            changed.copy_into(tmp_path / "in3")
        changed.close()
    finally:
        up.close()


# --------------------------------------------------------------------------- over the control socket


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, list[str], bytes]] = []

    def status(self) -> dict[str, Any]:
        return {}

    async def donate(self, on: bool) -> dict[str, Any]:
        return {"type": "ok"}

    async def host(self, request: HostRequest) -> dict[str, Any]:
        up = request.upload
        data = b""
        if up is not None:
            path = up.copy_into(Path(os.environ["HANDOFF_TMP"]) / "copy")
            data = path.read_bytes() if path.is_file() else b""
        self.got.append((str(request.dataset), [n for n, _ in request.files], data))
        return {"type": "ok"}

    async def stop(self) -> dict[str, Any]:
        return {"type": "ok"}

    async def reload(self) -> dict[str, Any]:
        return {"type": "ok"}


async def _serve(tmp_path: Path, system: bool) -> tuple[Recorder, ControlServer, Endpoint]:
    rec = Recorder()
    ep = Endpoint(path=tmp_path / "run" / "control.sock", system=system)
    server = ControlServer(rec, ep, body_timeout=1.0)
    await server.start()
    return rec, server, ep


async def test_host_files_over_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANDOFF_TMP", str(tmp_path))
    f = tmp_path / "secret.npz"
    f.write_bytes(b"payload")
    rec, server, ep = await _serve(tmp_path, system=True)
    try:
        opened = handoff.open_dataset(f)
        async with ControlClient(ep.path) as c:
            try:
                assert (await c.host_files(opened, {"epochs": 1}))["type"] == "ok"
            finally:
                opened.close()
            # the connection goes on serving requests after the hand-over
            assert (await c.status())["type"] == "status"
            # the system service takes no paths
            with pytest.raises(wire.RemoteError, match="opens no paths for you") as err:
                await c.host(str(f), {})
            assert err.value.field == "dataset"
        assert rec.got == [(str(f), ["secret.npz"], b"payload")]
    finally:
        await server.close()


async def test_announced_files_that_never_come(tmp_path: Path) -> None:
    rec, server, ep = await _serve(tmp_path, system=False)
    try:
        assert ep.path is not None
        r, w = await asyncio.open_unix_connection(str(ep.path))
        frame = {**make_host("/x.npz", {}, files=[{"name": "x.npz", "size": 1}]), "proto": wire.PROTO}
        await wire.write_frame(w, frame)
        assert (await wire.read_frame(r))["type"] == "send_files"
        w.write(handoff.MARK)  # no descriptors
        reply = await wire.read_frame(r)
        assert reply["type"] == "error" and reply["field"] == "files" and "expected 1 open file" in reply["message"]
        # a client that announces files and then says nothing is dropped after the body timeout
        await wire.write_frame(w, make_host("/x.npz", {}, files=[{"name": "x.npz", "size": 1}]))
        assert (await wire.read_frame(r))["type"] == "send_files"
        reply = await wire.read_frame(r, timeout=10)
        assert reply["type"] == "error" and "did not come" in reply["message"]
        w.close()
        assert rec.got == []
    finally:
        await server.close()


async def test_the_tuis_client_hands_files_to_the_system_service(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from crowdd.client.daemon_client import ControlDaemonClient
    from crowdd.errors import RemoteError

    monkeypatch.setenv("HANDOFF_TMP", str(tmp_path))
    f = tmp_path / "d.npz"
    f.write_bytes(b"tui")
    rec, server, ep = await _serve(tmp_path, system=True)
    client = ControlDaemonClient(ep)
    try:
        assert (await client.host(str(f), {}))["type"] == "ok"
        with pytest.raises(RemoteError, match="no such file or directory") as err:
            await client.host(str(tmp_path / "missing.npz"), {})
        assert err.value.field == "dataset"
        assert rec.got == [(str(f), ["d.npz"], b"tui")]
    finally:
        await client.close()
        await server.close()
