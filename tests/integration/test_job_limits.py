"""A volunteer's memory cap, through the real daemons: a job over ``[job] max_memory_mb`` ends
with a clear error where the user looks (status), the daemons stay up, and no job process is
left."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from crowdd.client.control import ControlClient
from crowdd.cli.demo import Crowd

from test_daemon_e2e import TEST_CONFIG, Recorder, digits_npz, donate_all, host_job, job_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_a_job_over_the_memory_cap_ends_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    crowd = Crowd(tmp_path / "crowd", 1, extra_config=TEST_CONFIG)
    try:
        crowd.start()
        await crowd.wait_up()
        for n in crowd.nodes[:1]:  # the host's volunteer lowers the cap and reloads
            conf = n.root / "crowdd.toml"
            conf.write_text(conf.read_text().replace("[job]\n", "[job]\nmax_memory_mb = 200\n"))
            async with ControlClient(n.socket) as c:
                assert (await c.reload())["type"] == "ok"
        rec = Recorder(crowd.nodes)
        await rec.start()
        try:
            await donate_all(crowd.workers)
            await host_job(crowd.host, digits_npz(tmp_path / "digits.npz"),
                           {"workers": 1, "min_workers": 1, "epochs": 5, "learning_rate": 0.1})
            await rec.wait("host", lambda e: e["event"] == "state" and e["previous"] == "training", 180)
        finally:
            await rec.close()
        async with ControlClient(crowd.host.socket) as c:
            st = await c.status()  # the daemon is still up and says why
        assert "over this node's cap of 200 MB ([job] max_memory_mb)" in (st["error"] or ""), st["error"]
        assert st["result"] is None
        for _ in range(50):
            if not job_processes(crowd.root):
                break
            await asyncio.sleep(0.2)
        assert not job_processes(crowd.root)
    finally:
        crowd.close()
