"""A real daemon writes its rotating log file, and ``crowdd logs`` shows it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from crowdd.logs import LOG_FILE
from crowdd.node.ports import free_port
from crowdd.platform.process import kill_group

pytestmark = pytest.mark.timeout(120)


def test_the_daemon_logs_to_its_file_and_crowdd_logs_shows_it(tmp_path: Path) -> None:
    root = tmp_path / "node"
    root.mkdir()
    (root / "crowdd.toml").write_text('[daemon]\nlisten_host = "127.0.0.1"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "crowdd", "daemon", "--root", str(root), "--matchmaker", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    log = root / "log" / LOG_FILE
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and "crowdd.node" in log.read_text()):
            assert proc.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon wrote no log file"
            time.sleep(0.1)
    finally:
        kill_group(proc, 15.0)
    r = subprocess.run([sys.executable, "-m", "crowdd", "logs", "--root", str(root)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert " INFO crowdd.node" in r.stdout
    assert r.stdout.splitlines()[-1] == log.read_text().splitlines()[-1]
