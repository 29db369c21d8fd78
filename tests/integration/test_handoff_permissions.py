"""Who may host what: the daemon runs as one user, the CLI as another. A user who can read a
file hosts it (the CLI opens it and hands the open file over, SCM_RIGHTS) even where the daemon
itself cannot look; a user who cannot read a file cannot host it, although the daemon could.

Real processes under real uids (setpriv): the daemon as uid 41001, the CLI as ``nobody``.
Needs root."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdd import wire
from crowdd.client.control import ControlClient
from crowdd.node.ports import free_port
from crowdd.platform.process import kill_group

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"),
]

DAEMON_UID = 41001  # no passwd entry needed
OTHER_UID = 41002
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]


def as_uid(uid: int, *cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *cmd]


def _npz(path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((100, 4, 4)).astype("float32"), y_train=rng.integers(0, 10, 100),
             x_test=rng.random((20, 4, 4)).astype("float32"), y_test=rng.integers(0, 10, 20))


@pytest.fixture
def world() -> Iterator[dict[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="crowdd-handoff-", dir="/var/tmp"))
    base.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(base / "home")}
    env.pop("XDG_RUNTIME_DIR", None)
    node = base / "node"
    node.mkdir()
    (node / "crowdd.toml").write_text('[daemon]\nlisten_host = "127.0.0.1"\nretry_min = 5.0\n[security]\nallow_exposed_tensorflow = true\n')  # no training here
    os.chown(node, DAEMON_UID, DAEMON_UID)
    (base / "home").mkdir()
    os.chown(base / "home", DAEMON_UID, DAEMON_UID)
    # nobody's own file, in nobody's private directory: the daemon's uid cannot even look
    mine = base / "mine"
    mine.mkdir(mode=0o700)
    _npz(mine / "digits.npz")
    for p in (mine, mine / "digits.npz"):
        os.chown(p, NOBODY, NOBODY)
    (mine / "digits.npz").chmod(0o600)
    # someone else's file: the daemon (as root would) could read it, nobody cannot
    theirs = base / "theirs.npz"
    _npz(theirs)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    theirs.chmod(0o600)
    log = (base / "daemon.log").open("wb")
    proc = subprocess.Popen(
        as_uid(DAEMON_UID, sys.executable, "-m", "crowdd", "daemon", "--root", str(node),
               "--matchmaker", f"127.0.0.1:{free_port()}"),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        sock = node / "run" / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, (base / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        sock.chmod(0o666)  # stands in for group crowdd of the system socket: nobody may connect
        (node / "run").chmod(0o755)
        yield {"base": base, "sock": sock, "mine": mine / "digits.npz", "theirs": theirs, "env": env}  # type: ignore[dict-item]
    finally:
        kill_group(proc, 15.0)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def cli_as_nobody(world: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_uid(NOBODY, sys.executable, "-m", "crowdd", *args, "--socket", str(world["sock"])),
                          capture_output=True, text=True, timeout=60, check=False, env=world["env"])  # type: ignore[arg-type]


def test_a_user_hosts_a_file_only_they_can_read(world: dict[str, Path]) -> None:
    # the daemon's own uid cannot see it: asked for the path, it says so (no internal error)
    async def by_path() -> None:
        async with ControlClient(world["sock"]) as c:
            with pytest.raises(wire.RemoteError, match="the daemon cannot see it") as err:
                await c.host(str(world["mine"]), {"workers": 1})
            assert err.value.field == "dataset"

    asyncio.run(by_path())
    r = cli_as_nobody(world, "host", str(world["mine"]), "--workers", "1")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while True:
        st = json.loads(cli_as_nobody(world, "status", "--json").stdout)
        if st.get("dataset") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["dataset"]["name"] == "digits" and st["role"] == "host", st
    log = (world["base"] / "daemon.log").read_text()
    assert f"1 file(s) of {world['mine']} handed over by uid {NOBODY}" in log
    # converted into the cache: the handed-over copy is gone
    assert not list((world["base"] / "node" / "cache" / "incoming").glob("*/*"))
    assert cli_as_nobody(world, "stop").returncode == 0


def test_a_user_cannot_host_a_file_they_cannot_read(world: dict[str, Path]) -> None:
    r = cli_as_nobody(world, "host", str(world["theirs"]), "--workers", "1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"crowdd host: {world['theirs']}: permission denied (you cannot read it, so you cannot host it)" in r.stderr
    st = json.loads(cli_as_nobody(world, "status", "--json").stdout)
    assert st["role"] is None and not st.get("dataset"), st
    assert "handed over" not in (world["base"] / "daemon.log").read_text()
