"""Registration: the hello a node sends, and registering with a real matchmaker until grouped."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from crowdd.config import Config, MatchmakerConfig
from crowdd.errors import SessionFailed
from crowdd.hyperparams import Job
from crowdd.data.manifest import Manifest
from crowdd.matchmaker.server import Matchmaker
from crowdd.node.backoff import Backoff
from crowdd.node.hosted import HostedJob
from crowdd.node.ports import Reservation
from crowdd.node.registration import group_settings, make_hello, register_until_grouped
from crowdd.node.states import State, StateMachine
from crowdd.node.status import StatusView
from crowdd.plan import SessionPlan
from crowdd.platform.systemd import Notifier
from crowdd.protocol.matchmaker import check_hello
from crowdd.testing.identities import identity, matchmaker_tls

MM_TLS, MM_FP = matchmaker_tls()

pytestmark = pytest.mark.timeout(30)


def prepared(tmp_path: Path, chunk: int = 4096) -> HostedJob:
    data = tmp_path / "d.bin"
    data.write_bytes(b"x" * 10_000)
    return HostedJob(data, Manifest.build(data, chunk_size=chunk), "d", Job(workers=1, min_workers=1, wait=0))


def host_config() -> Config:
    cfg = Config()
    cfg.replication.route = "chain"
    cfg.job.steps_per_function = 8
    cfg.job.sync_every = 50  # more than steps_per_function: clamped
    cfg.job.merge = "sum"
    return cfg


def test_group_settings_are_the_hosts(tmp_path: Path) -> None:
    s = group_settings(host_config(), prepared(tmp_path, chunk=4096))
    assert (s.route, s.steps_per_function, s.sync_every, s.merge, s.chunk_size) == ("chain", 8, 8, "sum", 4096)


def test_hellos_pass_the_matchmakers_check(tmp_path: Path) -> None:
    res = Reservation("127.0.0.1", 0, 0, 2)
    try:
        hello = make_hello(host_config(), "h", "host", res, prepared(tmp_path), identity("h"))
        h = check_hello(hello, "127.0.0.1")
        assert h.settings is not None and h.settings.route == "chain" and h.job is not None
        w = check_hello(make_hello(Config(), "w", "worker", Reservation("127.0.0.1", 0, 0, 1), None, identity("w")), "127.0.0.1")
        assert w.settings is None and w.job is None
    finally:
        res.close()


class Node:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.states = StateMachine(lambda o, n: self.view.on_transition(o, n))
        self.view = StatusView("n", self.states, lambda k, **f: self.events.append((k, f)), Notifier())

    def seen(self) -> list[str]:
        return [f["state"] for k, f in self.events if k == "state"]


async def _register(node: Node, role: str, hello: dict[str, Any], port: int) -> SessionPlan:
    node.view.begin(role)
    return await register_until_grouped(role, hello, node.states, node.view, matchmaker=lambda: ("127.0.0.1", port),
                                        heartbeat=0.5, backoff=lambda: Backoff(0.05, 0.1, random.Random(1)),
                                        fingerprint=lambda: MM_FP)


async def test_a_host_and_a_worker_get_one_plan(tmp_path: Path) -> None:
    mm = Matchmaker(MatchmakerConfig())
    await mm.start("127.0.0.1", 0, MM_TLS)
    res_h, res_w = Reservation("127.0.0.1", 0, 0, 2), Reservation("127.0.0.1", 0, 0, 1)
    try:
        port = mm.address[1]
        h, w = Node(), Node()
        plans = await asyncio.gather(
            _register(h, "host", make_hello(host_config(), "h", "host", res_h, prepared(tmp_path), identity("h")), port),
            _register(w, "worker", make_hello(Config(), "w", "worker", res_w, None, identity("w")), port),
        )
        assert [p.index for p in plans] == [0, 1] and plans[0].group_id == plans[1].group_id
        assert plans[1].settings.route == "chain"  # the worker got the host's settings
        assert w.seen()[:2] == ["registering", "waiting"]
    finally:
        res_h.close()
        res_w.close()
        await mm.close()


async def test_a_refused_host_job_fails_the_session(tmp_path: Path) -> None:
    mm = Matchmaker(MatchmakerConfig())
    await mm.start("127.0.0.1", 0, MM_TLS)
    res = Reservation("127.0.0.1", 0, 0, 2)
    try:
        hello = make_hello(host_config(), "h", "host", res, prepared(tmp_path), identity("h"))
        hello["job"]["learning_rate"] = 0  # what a buggy or hostile host might send
        with pytest.raises(SessionFailed, match="refused this job"):
            await _register(Node(), "host", hello, mm.address[1])
    finally:
        res.close()
        await mm.close()


async def test_no_matchmaker_means_retrying_with_a_warning() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = Node()
    res = Reservation("127.0.0.1", 0, 0, 1)
    try:
        task = asyncio.create_task(_register(node, "worker", make_hello(Config(), "w", "worker", res, None, identity("w")), port))
        for _ in range(100):
            if sum(1 for k, f in node.events if k == "log" and "retrying" in f["message"]) >= 2:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sum(1 for k, f in node.events if k == "log" and "retrying" in f["message"]) >= 2
        assert node.states.state == State.REGISTERING
    finally:
        res.close()


async def test_an_unreachable_host_is_told_how_to_fix_it(tmp_path: Path) -> None:
    """The matchmaker connects back to the host's data port; nothing listens there (a NAT
    dropping it looks the same to the matchmaker), so the host fails at once with the fix."""
    mm = Matchmaker(MatchmakerConfig(reach_timeout=1.0))
    await mm.start("127.0.0.1", 0, MM_TLS)
    res = Reservation("127.0.0.1", 0, 0, 2)
    try:
        hello = make_hello(host_config(), "h", "host", res, prepared(tmp_path), identity("h"))
        res.data_sock.close()  # the data port does not answer
        with pytest.raises(SessionFailed, match="cannot be reached.*[Ff]orward TCP ports.*advertise_host"):
            await asyncio.wait_for(_register(Node(), "host", hello, mm.address[1]), 20)
    finally:
        res.close()
        await mm.close()


async def test_a_natd_worker_is_grouped_as_unreachable(tmp_path: Path) -> None:
    mm = Matchmaker(MatchmakerConfig(reach_timeout=1.0))
    await mm.start("127.0.0.1", 0, MM_TLS)
    res_h, res_w = Reservation("127.0.0.1", 0, 0, 2), Reservation("127.0.0.1", 0, 0, 1)
    try:
        w_hello = make_hello(Config(), "w", "worker", res_w, None, identity("w"))
        res_w.data_sock.close()
        port = mm.address[1]
        plans = await asyncio.wait_for(asyncio.gather(
            _register(Node(), "host", make_hello(host_config(), "h", "host", res_h, prepared(tmp_path), identity("h")), port),
            _register(Node(), "worker", w_hello, port),
        ), 20)
        assert plans[1].reachable == (True, False)
        assert plans[1].route().source == 0 and plans[1].route().targets == ()
    finally:
        res_h.close()
        res_w.close()
        await mm.close()


async def test_a_matchmaker_with_another_certificate_is_not_trusted() -> None:
    """A server on the matchmaker's address that is not it (another certificate) is refused
    with a log line naming the config key, and registration keeps retrying."""
    mm = Matchmaker(MatchmakerConfig())
    await mm.start("127.0.0.1", 0, MM_TLS)
    node = Node()
    res = Reservation("127.0.0.1", 0, 0, 1)
    try:
        node.view.begin("worker")
        task = asyncio.create_task(register_until_grouped(
            "worker", make_hello(Config(), "w", "worker", res, None, identity("w")), node.states, node.view,
            matchmaker=lambda: mm.address, heartbeat=0.5, backoff=lambda: Backoff(0.05, 0.1, random.Random(1)),
            fingerprint=lambda: identity("someone-else").fingerprint,
        ))
        for _ in range(100):
            if any(k == "log" and "matchmaker_fingerprint" in f["message"] for k, f in node.events):
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert any(k == "log" and "is not the matchmaker" in f["message"] for k, f in node.events)
        assert mm.stats()["workers"] == 0
    finally:
        res.close()
        await mm.close()
