"""The daemon's state machine and its behaviour without a session (no TensorFlow here)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crowdd import wire
from crowdd.config import Config, MatchmakerConfig, Paths
from crowdd.client.control import ControlClient
from crowdd.protocol.endpoint import Endpoint
from crowdd.node.backoff import Backoff
from crowdd.node.daemon import Daemon
from crowdd.node.entry import make_policy
from crowdd.node.states import TRANSITIONS, InvalidTransition, State, StateMachine, allowed
from crowdd.idle.policy import AlwaysIdle, IdlePolicy, Verdict
from crowdd.idle.probes import CpuReading, Probes, UserIdle
from crowdd.matchmaker.server import Matchmaker
from crowdd.platform.sandbox import SandboxSupport
from crowdd.platform.userns import Confinement
from crowdd.testing.identities import matchmaker_tls
from crowdd.node.ports import free_port

pytestmark = pytest.mark.timeout(60)

S = State


# --------------------------------------------------------------------------- the table


def test_the_happy_path_is_allowed() -> None:
    path = [S.OFF, S.STANDBY, S.REGISTERING, S.WAITING, S.REPLICATING, S.TRAINING, S.FINISHED, S.STANDBY]
    for a, b in itertools.pairwise(path):
        assert allowed(a, b), (a, b)
    assert allowed(S.OFF, S.REGISTERING)  # a host need not donate
    assert allowed(S.WAITING, S.REGISTERING)  # the matchmaker went away


@pytest.mark.parametrize("state", list(State))
def test_stop_from_anywhere(state: State) -> None:
    assert allowed(state, S.OFF) and allowed(state, S.STANDBY)


@pytest.mark.parametrize(
    ("a", "b"),
    [(S.OFF, S.TRAINING), (S.STANDBY, S.WAITING), (S.REGISTERING, S.TRAINING), (S.WAITING, S.FINISHED),
     (S.REPLICATING, S.FINISHED), (S.TRAINING, S.REPLICATING), (S.FINISHED, S.TRAINING)],
)
def test_skips_are_refused(a: State, b: State) -> None:
    assert not allowed(a, b)
    sm = StateMachine(lambda old, new: None, initial=a)
    with pytest.raises(InvalidTransition):
        sm.to(b)
    assert sm.state == a


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)


def test_state_machine_reports_each_change_once() -> None:
    seen: list[tuple[State, State]] = []
    sm = StateMachine(lambda old, new: seen.append((old, new)))
    assert sm.to(S.STANDBY)
    assert not sm.to(S.STANDBY)
    assert sm.to(S.REGISTERING)
    assert seen == [(S.OFF, S.STANDBY), (S.STANDBY, S.REGISTERING)]


def test_backoff_is_jittered_and_capped() -> None:
    b = Backoff(1.0, 8.0, random.Random(1))
    delays = [b.next() for _ in range(20)]
    assert all(1.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 10
    assert max(delays[5:]) > 4.0
    b.reset()
    assert b.next() == 1.0


# --------------------------------------------------------------------------- a live daemon


class Refusing:
    """An idle policy that says no (the user is busy)."""

    on_busy = "suspend"
    tf_threads = 1

    def evaluate(self) -> Verdict:
        return Verdict(False, "user_idle", "the user was active 10 s ago")

    def pause(self, hours: float) -> None:
        pass

    def resume(self) -> None:
        pass

    @property
    def paused_until(self) -> float | None:
        return None


MM_TLS, MM_FP = matchmaker_tls()


def make(tmp_path: Path, mm_port: int, name: str = "node", policy: Any = None, notifier: Any = None,
         confinement: Confinement | None = None, sandbox: SandboxSupport | None = None,
         policy_interval: float = 0.2) -> Daemon:
    cfg = Config()
    cfg.daemon.listen_host = "127.0.0.1"
    cfg.daemon.retry_min = 0.05
    cfg.daemon.retry_max = 0.2
    cfg.daemon.matchmaker_fingerprint = MM_FP
    paths = Paths.under(tmp_path / name)
    return Daemon(cfg, paths, endpoint=Endpoint.for_paths(paths), matchmaker=("127.0.0.1", mm_port),
                  policy=policy or AlwaysIdle(), name=name, policy_interval=policy_interval, notifier=notifier,
                  confinement=confinement, sandbox=sandbox)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, mm_port: int, **kw: Any) -> AsyncIterator[Daemon]:
    """A started daemon (see :func:`make`), closed on the way out."""
    d = make(tmp_path, mm_port, **kw)
    await d.start()
    try:
        yield d
    finally:
        await d.close()


@contextlib.asynccontextmanager
async def matchmaker() -> AsyncIterator[Matchmaker]:
    """A matchmaker on a free loopback port, closed on the way out."""
    mm = Matchmaker(MatchmakerConfig())
    await mm.start("127.0.0.1", 0, MM_TLS)
    try:
        yield mm
    finally:
        await mm.close()


async def states(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e.get("event") == "state"]


async def collect(d: Daemon, out: list[dict[str, Any]]) -> None:
    async for ev in ControlClient(d.paths.control_socket).subscribe():
        out.append(ev)


async def until(pred: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_new_install_starts_off_and_donation_persists(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the matchmaker is down
    d = make(tmp_path, port)
    await d.start()
    try:
        assert d.state == S.OFF
        async with ControlClient(d.paths.control_socket) as c:
            st = await c.status()
            assert st["state"] == "off" and st["donating"] is False and st["role"] is None
            assert (await c.donate(True)) == {"type": "ok", "donating": True}
            await until(lambda: d.state == S.REGISTERING)
    finally:
        await d.close()
    again = make(tmp_path, port)
    await again.start()
    try:
        assert again.donating is True
        await until(lambda: again.state == S.REGISTERING)
        async with ControlClient(again.paths.control_socket) as c:
            await c.donate(False)
        await until(lambda: again.state == S.OFF)
    finally:
        await again.close()
    third = make(tmp_path, port)
    await third.start()
    try:
        assert third.donating is False and third.state == S.OFF
    finally:
        await third.close()


async def test_matchmaker_down_never_kills_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    events: list[dict[str, Any]] = []
    async with running(tmp_path, port) as d:
        watcher = asyncio.create_task(collect(d, events))
        try:
            await until(lambda: d.control.subscriber_count == 1)
            await d.donate(True)
            await until(lambda: sum(1 for e in events if e.get("event") == "log" and "retrying" in e.get("message", "")) >= 3)
            assert d.state == S.REGISTERING
            assert d.status()["error"].startswith(f"cannot reach the matchmaker 127.0.0.1:{port}: ")
            # the matchmaker comes up: the daemon gets in line
            mm = Matchmaker(MatchmakerConfig())
            await mm.start("127.0.0.1", port, MM_TLS)
            try:
                await until(lambda: d.state == S.WAITING)
                st = d.status()
                assert st["queue"]["position"] == 1 and st["role"] == "worker"
                assert st["error"] is None  # reached: the problem cleared
            finally:
                await mm.close()
            await until(lambda: d.state == S.REGISTERING)  # it went away again: back in the retry loop
            assert "waiting" in await states(events)
        finally:
            watcher.cancel()


async def test_idle_policy_holds_a_worker_in_standby(tmp_path: Path) -> None:
    async with running(tmp_path, free_port(), policy=Refusing()) as d:
        await d.donate(True)
        await until(lambda: d.state == S.STANDBY and d.status()["idle"]["rule"] == "user_idle")
        await asyncio.sleep(0.5)  # re-checked, still held back
        st = d.status()
        assert st["state"] == "standby"
        assert st["idle"] == {"allowed": False, "rule": "user_idle", "reason": "the user was active 10 s ago",
                              "paused_until": None}


async def test_stop_returns_to_standby(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    async with matchmaker() as mm, running(tmp_path, mm.address[1]) as d:
        watcher = asyncio.create_task(collect(d, events))
        try:
            await until(lambda: d.control.subscriber_count == 1)
            await d.donate(True)
            await until(lambda: d.state == S.WAITING)
            async with ControlClient(d.paths.control_socket) as c:
                await c.stop()
            await until(lambda: "standby" in [e.get("state") for e in events if e.get("event") == "state"][2:])
            assert any(e.get("event") == "log" and "stopped by the user" in e.get("message", "") for e in events)
            await until(lambda: d.state == S.WAITING)  # donation stays on: it queues again
            await d.donate(False)
            await until(lambda: d.state == S.OFF)
            await until(lambda: mm.stats()["workers"] == 0)  # it left the queue
            seq = await states(events)
            assert seq[:4] == ["standby", "registering", "waiting", "standby"]
            assert seq[-1] == "off"
        finally:
            watcher.cancel()


async def test_host_request_is_checked(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    async with running(tmp_path, free_port()) as d, ControlClient(d.paths.control_socket) as c:
        cases = [
            ({"learning_rate": 0}, str(data), "learning_rate"),
            ({"sharding": "diagonal"}, str(data), "sharding"),
            ({"bogus": 1}, str(data), "bogus"),
            ({}, "relative/d.npz", "dataset"),
            ({}, str(tmp_path / "missing.npz"), "dataset"),
        ]
        for job, path, field in cases:
            with pytest.raises(wire.RemoteError) as err:
                await c.host(path, job)
            assert err.value.code == "bad_field" and err.value.field == field
        with pytest.raises(wire.RemoteError) as err:
            await c.request({"type": "host", "dataset": str(data), "job": {}, "test_fraction": 2})
        assert err.value.field == "test_fraction"
        assert (await c.status())["state"] == "off"  # nothing changed


async def test_bad_dataset_is_refused_at_once_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    async with running(tmp_path, free_port()) as d, ControlClient(d.paths.control_socket) as c:
        with pytest.raises(wire.RemoteError) as err:
            await c.host(str(bad), {"workers": 1})
        assert err.value.field == "dataset" and err.value.code == "bad_field"
        assert "cannot host" in err.value.message and str(bad) in err.value.message
        st = await c.status()
        assert st["role"] is None and st["state"] == "off"  # nothing was started
        good = tmp_path / "good.csv"
        good.write_text("".join(f"{i % 2},{i},{i * 2}\n" for i in range(20)))
        reply = await c.host(str(good), {"workers": 1})  # the refusal left nothing behind
        assert reply["type"] == "ok"
        assert reply["dataset"]["train"] == 16 and reply["dataset"]["test"] == 4 and reply["dataset"]["classes"] == 2
        with pytest.raises(wire.RemoteError) as err:
            await c.host(str(good), {"workers": 1})
        assert err.value.code == "busy"


async def test_a_model_file_that_does_not_fit_the_dataset_is_refused_at_once(tmp_path: Path) -> None:
    import json
    import zipfile

    data = tmp_path / "d.csv"
    data.write_text("".join(f"{i % 3},{i},{i * 2}\n" for i in range(30)))  # 2 features, 3 classes
    model = tmp_path / "m.keras"
    with zipfile.ZipFile(model, "w") as z:
        z.writestr("config.json", json.dumps({"module": "keras", "class_name": "Sequential", "config": {"layers": [
            {"module": "keras.layers", "class_name": "InputLayer", "config": {"batch_shape": [None, 2]}},
            {"module": "keras.layers", "class_name": "Dense", "config": {"units": 10, "activation": "softmax"}}]}}))
    async with running(tmp_path, free_port()) as d, ControlClient(d.paths.control_socket) as c:
        with pytest.raises(wire.RemoteError) as err:
            await c.host(str(data), {}, model_file=str(model))
        assert err.value.field == "model_file"
        assert f"{model}: the model's output layer has 10 units but the dataset has 3 classes" in err.value.message
        with pytest.raises(wire.RemoteError) as err:
            await c.host(str(data), {"model": "file"})
        assert err.value.field == "model_file" and "--model-file" in err.value.message
        with pytest.raises(wire.RemoteError) as err:
            await c.host(str(data), {}, model_file=str(tmp_path / "missing.keras"))
        assert err.value.field == "model_file" and "no such file" in err.value.message
        assert d.status()["role"] is None


async def test_crowdd_host_waits_for_the_verdict_and_exits_non_zero_on_a_bad_dataset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("label,a,b\n0,1,2\n1,3,oops\n0,5,6\n")
    async with running(tmp_path, free_port()) as d:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "crowdd", "host", str(bad), "--socket", str(d.paths.control_socket),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 50)
        assert proc.returncode == 2, (out, err)
        assert f"{bad} line 3, column 3: non-numeric value 'oops'" in err.decode(), err
        assert d.status()["role"] is None


class Switchable(Refusing):
    def __init__(self) -> None:
        self.allow = True

    def evaluate(self) -> Verdict:
        if self.allow:
            return Verdict(True, None, "idle")
        return super().evaluate()


async def test_busy_machine_leaves_the_queue(tmp_path: Path) -> None:
    policy = Switchable()
    async with matchmaker() as mm, running(tmp_path, mm.address[1], policy=policy) as d:
        await d.donate(True)
        await until(lambda: d.state == S.WAITING)
        policy.allow = False
        await until(lambda: d.state == S.STANDBY)
        await until(lambda: mm.stats()["workers"] == 0)
        assert d.status()["idle"]["rule"] == "user_idle"
        policy.allow = True
        await until(lambda: d.state == S.WAITING)  # idle again: back in the queue


async def test_pause_leaves_the_queue_at_once_and_resume_rejoins_at_once(tmp_path: Path) -> None:
    """The same path as the policy turning busy, without waiting for a policy interval (30 s
    here): pause → out of the queue; resume → back in it."""
    async with matchmaker() as mm, running(tmp_path, mm.address[1], policy_interval=30.0) as d, \
            ControlClient(d.paths.control_socket) as c:
        await c.donate(True)
        await until(lambda: d.state == S.WAITING)
        reply = await c.pause(1.5)
        assert reply["type"] == "ok" and reply["paused_until"] == pytest.approx(time.time() + 5400, abs=5)
        st = await c.status()
        assert st["idle"]["rule"] == "paused" and st["idle"]["paused_until"] == reply["paused_until"]
        await until(lambda: d.state == S.STANDBY, timeout=3.0)
        await until(lambda: mm.stats()["workers"] == 0, timeout=3.0)
        await asyncio.sleep(0.5)
        assert d.state == S.STANDBY  # held back
        assert (await c.resume())["was_paused"] is True
        await until(lambda: d.state == S.WAITING, timeout=3.0)
        assert d.status()["idle"] == {**d.status()["idle"], "allowed": True, "paused_until": None}


async def test_a_pause_ends_by_itself_and_the_worker_goes_back_to_work(tmp_path: Path) -> None:
    async with running(tmp_path, free_port(), policy_interval=30.0) as d:
        await d.donate(True)
        await until(lambda: d.state == S.REGISTERING)
        await d.pause(1.5 / 3600)  # 1.5 s
        await until(lambda: d.state == S.STANDBY, timeout=3.0)
        assert d.status()["idle"]["rule"] == "paused"
        # not after the 30 s policy interval: when the pause ends
        await until(lambda: d.state == S.REGISTERING, timeout=4.0)
        assert d.status()["idle"]["paused_until"] is None


async def test_a_bad_pause_changes_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, free_port()) as d, ControlClient(d.paths.control_socket) as c:
        await c.pause(2)
        until_ = d.status()["idle"]["paused_until"]
        for bad in (0, -2, 24 * 366, "1h", None, float("inf")):
            with pytest.raises(wire.RemoteError) as err:
                await c.request({"type": "pause", "hours": bad})
            assert err.value.code == "bad_field" and err.value.field == "hours"
        assert d.status()["idle"]["paused_until"] == until_
        assert (await c.status())["state"] == "off"  # the connection survived every refusal


async def test_a_pause_survives_a_restart_and_an_ended_one_is_ignored(tmp_path: Path) -> None:
    import json

    async with running(tmp_path, free_port()) as d:
        await d.donate(True)
        until_ = (await d.pause(3.0))["paused_until"]
        state_file = d.paths.state_dir / "daemon.json"
        assert json.loads(state_file.read_text()) == {"donating": True, "paused_until": until_}
    async with running(tmp_path, free_port()) as d:
        st = d.status()
        assert st["donating"] is True and st["idle"]["paused_until"] == pytest.approx(until_, abs=1.0)
        await until(lambda: d.status()["idle"]["rule"] == "paused")
        assert d.state == S.STANDBY
        await d.resume()
        assert json.loads(state_file.read_text()) == {"donating": True, "paused_until": None}
    for saved in (time.time() - 60, "soon", float("nan"), True):  # ended, or not a time: no pause
        state_file.write_text(json.dumps({"donating": False, "paused_until": saved}))
        async with running(tmp_path, free_port()) as d:
            assert d.status()["idle"]["paused_until"] is None


class Counting(Refusing):
    """Allows, with a new figure in its reason each time (as the CPU rule's percentage)."""

    def __init__(self) -> None:
        self.n = 0

    def evaluate(self) -> Verdict:
        self.n += 1
        return Verdict(True, None, f"other CPU {self.n % 7}% <= 30%")


async def test_a_new_figure_in_the_same_verdict_is_shown_not_logged(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The policy is asked every second while working: status shows the latest reason, the log
    only says when the verdict changes."""
    policy = Counting()
    caplog.set_level("INFO", logger="crowdd.node.idlewatch")
    async with running(tmp_path, free_port(), policy=policy) as d:
        await d.donate(True)
        await until(lambda: policy.n >= 6)
        assert d.status()["idle"]["reason"].startswith("other CPU")
    said = [r for r in caplog.records if r.getMessage().startswith("idle policy:")]
    assert len(said) == 1, [r.getMessage() for r in said]


async def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    from crowdd.platform.systemd import Notifier

    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.setblocking(False)
    d = make(tmp_path, free_port(), notifier=Notifier(addr, watchdog_interval=0.05))
    try:
        await d.start()
        assert d.paths.control_socket.exists()
        await d.donate(True)
        await until(lambda: d.state == S.REGISTERING)
        await asyncio.sleep(0.2)
        await d.close()
        got = []
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    assert got[0].startswith("READY=1\nSTATUS=off")
    assert any(g == "STATUS=registering (worker), donation on" for g in got)
    assert sum(1 for g in got if g == "WATCHDOG=1") >= 2
    assert got[-1] == "STOPPING=1" or "STOPPING=1" in got


# --------------------------------------------------------------------------- the default idle policy


class FakeProbes:
    """Probe values a test sets: the user's idle time and other processes' CPU counter."""

    def __init__(self, user_idle: float) -> None:
        self.user_idle = user_idle
        self.t = 0.0

    def cpu(self) -> CpuReading:
        self.t += 10.0  # each reading 10 s after the last, other processes using nothing
        return CpuReading(self.t, 0.0, 2)

    def probes(self) -> Probes:
        return Probes(user_idle=lambda: UserIdle(self.user_idle, "fake logind"), cpu=self.cpu, battery=lambda: None)


async def test_default_config_applies_the_idle_policy(tmp_path: Path) -> None:
    """No [idle] table: the real IdlePolicy with its defaults decides, and a busy verdict
    keeps a donating worker in standby until the machine is idle."""
    fake = FakeProbes(user_idle=10.0)  # the user was active 10 s ago; the default wants 5 min
    policy = make_policy(Config(), tmp_path / "crowdd.toml", probes=fake.probes())
    assert isinstance(policy, IdlePolicy)
    async with running(tmp_path, free_port(), policy=policy) as d, ControlClient(d.paths.control_socket) as c:
        await c.donate(True)
        await until(lambda: d.status()["idle"]["rule"] == "user_idle")
        st = await c.status()
        assert st["state"] == "standby" and st["donating"] is True and st["role"] is None
        assert st["idle"]["allowed"] is False and "user active" in st["idle"]["reason"]
        await asyncio.sleep(0.5)  # several policy intervals: still held back
        assert d.state == S.STANDBY
        fake.user_idle = 3600.0  # the user left: the worker gets in line
        await until(lambda: d.state == S.REGISTERING)
        st = await c.status()
        assert st["idle"]["allowed"] is True and st["idle"]["rule"] is None and st["role"] == "worker"


async def test_a_node_that_cannot_confine_tensorflow_neither_trains_nor_hosts(tmp_path: Path) -> None:
    """No user namespaces (say, Ubuntu's AppArmor restriction): status says so and why, donation
    does not register, hosting is refused with the fix; the opt-in flips it (trusted LANs)."""
    no = Confinement(False, "unprivileged user namespaces are not allowed here (test)")
    await _refuses_until_allowed(tmp_path, "allow_exposed_tensorflow", confinement=no, sandbox=SandboxSupport(True, 7))


async def test_a_node_that_cannot_sandbox_tensorflow_neither_trains_nor_hosts(tmp_path: Path) -> None:
    """No Landlock (an old kernel): the same, with its own reason and opt-in."""
    no = SandboxSupport(False, 0, "this kernel has no Landlock (test)")
    await _refuses_until_allowed(tmp_path, "allow_unsandboxed", confinement=Confinement(True), sandbox=no)


async def _refuses_until_allowed(tmp_path: Path, opt_in: str, *, confinement: Confinement,
                                 sandbox: SandboxSupport) -> None:
    from crowdd import wire
    from crowdd.hyperparams import Job
    from crowdd.protocol.control import HostRequest

    async with matchmaker() as mm, running(tmp_path, mm.address[1], confinement=confinement, sandbox=sandbox) as d:
        st = d.status()
        tf = st["tensorflow"]
        assert (tf["confined"], tf["sandboxed"], tf["landlock_abi"], tf["allowed"]) == (
            confinement.available, sandbox.available, sandbox.abi, False)
        assert (confinement.reason or sandbox.reason) in tf["reason"] and opt_in in tf["reason"]
        await d.donate(True)
        await asyncio.sleep(0.5)
        assert d.state == State.STANDBY and mm.stats()["workers"] == 0
        with pytest.raises(wire.WireError, match=opt_in):
            await d.host(HostRequest(tmp_path, Job()))
        setattr(d.cfg.security, opt_in, True)
        d.housing.show(d.cfg, d.view)  # as a reload does
        assert d.status()["tensorflow"]["allowed"] is True
        assert d.can_train


async def test_a_host_stopped_mid_session_hosts_again_at_its_next_start(tmp_path: Path) -> None:
    """The daemon stops (a restart, a crash) while it hosts: at its next start it hosts the
    same dataset and job again, without the user; a session the user stopped is not resumed."""
    csv = tmp_path / "points.csv"
    csv.write_text("label,a,b\n" + "".join(f"{i % 2},{i},{2 * i}\n" for i in range(40)))
    async with matchmaker() as mm:
        async with running(tmp_path, mm.address[1]) as d, ControlClient(d.paths.control_socket) as c:
            await c.host(str(csv), {"epochs": 3, "workers": 2})
            await until(lambda: mm.stats()["hosts"] == 1)
        await until(lambda: mm.stats()["hosts"] == 0)  # it left the queue when it stopped
        async with running(tmp_path, mm.address[1]) as d, ControlClient(d.paths.control_socket) as c:
            await until(lambda: mm.stats()["hosts"] == 1)  # hosting again, on its own
            assert d.view.role == "host" and d.hosting.prepared is not None
            assert d.hosting.prepared.job.epochs == 3 and d.hosting.prepared.name == "points"
            await c.stop()  # the user ends it: nothing to resume any more
            await until(lambda: mm.stats()["hosts"] == 0)
        async with running(tmp_path, mm.address[1]) as d:
            await asyncio.sleep(0.5)
            assert d.view.role is None and mm.stats()["hosts"] == 0


async def test_a_session_that_cannot_resume_says_why_in_status(tmp_path: Path) -> None:
    d = make(tmp_path, free_port())
    d.paths.ensure()
    (d.paths.state_dir / "hosting.json").write_text('{"manifest": "{}", "job": {}, "name": "x"}')
    await d.start()
    try:
        async with ControlClient(d.paths.control_socket) as c:
            st = await c.status()
        assert "cannot be resumed" in (st["error"] or "") and "damaged" in (st["error"] or "")
        assert not (d.paths.state_dir / "hosting.json").exists()
    finally:
        await d.close()


async def test_status_says_how_jobs_memory_is_capped(tmp_path: Path) -> None:
    """Where this daemon may make a cgroup per job, status says so (the kernel's caps); where
    not, it says the cap is a poll, and why."""
    from crowdd.platform.cgroups import CgroupUnavailable, JobCgroups

    async with matchmaker() as mm, running(tmp_path, mm.address[1]) as d:
        caps = d.status()["tensorflow"].get("caps")
        launcher_cgroups = d._jobs.cgroups
    try:
        found = JobCgroups.find()
    except CgroupUnavailable as exc:
        assert caps == f"poll ({exc})" and launcher_cgroups is None
    else:
        assert caps == f"cgroup v{found.version}" and launcher_cgroups is not None
        assert launcher_cgroups.bases == found.bases
