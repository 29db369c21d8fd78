"""Elastic membership end to end: a host job, real worker servers behind slot proxies (the
daemon's relay and its cut), and the members file the daemon writes.

One run, in order: slot 3 has no server at the start (the job must not wait for it); slot 2
is frozen (SIGSTOP), cut and removed -> training goes on within seconds; it is continued,
un-cut and listed again (the same server) -> it trains again; a fresh server starts behind
slot 3 and is listed as fresh -> it trains; slot 1's job is killed with the file unchanged ->
the failure path retires it, and a fresh server listed again trains; then the stop file ends
the run with a model.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crowdd.data.datasets import ArraySet, Prepared, convert
from crowdd.job import MEMBERS_FILE, STOP_FILE
from crowdd.job.events import parse_event
from crowdd.node.ports import free_ports
from crowdd.testing.slotproxy import ProxyProcess
from crowdd.testing.bounds import at_least

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
START = 240.0  # importing TF in several processes on a loaded 2-core box
# the figures asked of elastic membership (the run prints what it measured)
MAX_STALL = 5.0  # no progress event for longer than this after a slot left
MAX_JOIN = 20.0  # a slot listed again trains within this


class Proc:
    """One ``python -m crowdd.job`` process in its own process group, with its events."""

    def __init__(self, role: str, spec: Path, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crowdd.job", role, "--spec", str(spec)],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
        )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = parse_event(line)
            if event is not None:
                self.events.append((time.monotonic(), event))
                self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, timeout: float, match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event in {timeout:.0f} s; got {[e for _, e in self.events][-8:]}")
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise AssertionError(f"process ended; events: {[e for _, e in self.events][-8:]}")
            if event["event"] == "error":
                raise AssertionError(f"error event: {event}")
            if match(event):
                return event

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return convert(ArraySet(x[:1500], y[:1500], x[1500:], y[1500:]), tmp_path_factory.mktemp("digits"))


def write_members(workdir: Path, version: int, live: list[int], fresh: list[int] | None = None) -> None:
    """As the daemon does: a temporary file, then an atomic rename."""
    obj: dict[str, Any] = {"version": version, "live": live}
    if fresh:
        obj["fresh"] = fresh
    tmp = workdir / (MEMBERS_FILE + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, workdir / MEMBERS_FILE)


def test_slots_leave_come_back_and_join_while_training(tmp_path: Path, digits: Prepared) -> None:
    slots = 4
    ports = free_ports(2 + 2 * (slots - 1))
    w0, chief = ports[0], ports[-1]
    relay = {i: ports[i] for i in range(1, slots)}  # what the host dials (the daemon's relay)
    real = {i: ports[slots - 1 + i] for i in range(1, slots)}  # where slot i's server listens
    assert len({w0, chief, *relay.values(), *real.values()}) == len(ports)
    # as the daemon gives it (a sandboxed job binds only its ports); no parameter server: the
    # host's coordinator (the chief) holds the model
    host_cluster = {"worker": [f"127.0.0.1:{w0}"] + [f"127.0.0.1:{relay[i]}" for i in relay],
                    "chief": [f"127.0.0.1:{chief}"]}
    job = {"epochs": 500, "batch_size": 32, "learning_rate": 0.3, "sharding": "overlap"}
    settings = {"steps_per_function": 10, "sync_every": 5, "threads": 1, "nice": 5, "checkpoint_secs": 600.0,
                "start_timeout": 90.0}

    def member(i: int) -> Path:
        wd = tmp_path / f"member{i}"
        wd.mkdir(exist_ok=True)
        for src, name in ((digits.data_path, "dataset.bin"), (digits.manifest_path, "dataset.manifest.json")):
            if not (wd / name).exists():
                os.link(src, wd / name)
        cluster = json.loads(json.dumps(host_cluster))
        if i:
            cluster["worker"][i] = f"127.0.0.1:{real[i]}"  # a worker binds its own address
            del cluster["chief"]  # as the daemon gives it: a worker's job knows the workers only
        spec: dict[str, Any] = {
            "role": "host" if i == 0 else "worker", "index": i, "cluster": cluster, "job": job,
            "dataset": {"data": "dataset.bin", "manifest": "dataset.manifest.json"}, "workdir": str(wd),
            "settings": settings,
        }
        if i == 0:
            spec["output_dir"] = "out"
        path = tmp_path / f"spec{i}.json"
        path.write_text(json.dumps(spec))
        return path

    procs: list[Proc] = []
    proxy = ProxyProcess({relay[i]: real[i] for i in relay})
    pids: list[int] = []
    try:
        workers = {i: Proc("worker", member(i), tmp_path / f"member{i}.log") for i in (1, 2)}
        procs += workers.values()
        host_dir = tmp_path / "member0"
        host_spec = member(0)
        write_members(host_dir, 1, [0, 1, 2])  # slot 3: nobody yet
        host = Proc("host", host_spec, tmp_path / "member0.log")
        procs.append(host)
        for p in (host, *workers.values()):
            started = p.wait_for(START, lambda e: e["event"] == "started")
            pids += [started["pid"], *started["children"].values()]

        def trained_by(index: int, timeout: float) -> dict[str, Any]:
            return host.wait_for(timeout, lambda e: e["event"] == "progress" and e["worker"] == index)

        trained_by(1, START)
        trained_by(2, 60)

        # slot 2 freezes (a closed lid): the daemon cuts its path and drops it from the file
        workers[2].signal_group(signal.SIGSTOP)
        proxy.cut(relay[2])
        t_cut = time.monotonic()
        write_members(host_dir, 2, [0, 1])
        host.wait_for(10, lambda e: e["event"] == "slot" and e["task"] == 2 and e["state"] == "left")
        time.sleep(6)
        after = [(t, e) for t, e in host.events if t >= t_cut and e["event"] == "progress"]
        assert after, "no progress after slot 2 left"
        times = [t_cut] + [t for t, _ in after]
        stall = max(b - a for a, b in zip(times, times[1:]))
        assert stall < MAX_STALL, f"progress stalled {stall:.1f} s after slot 2 left"
        assert all(e["worker"] != 2 for t, e in after if t > t_cut + 2), "slot 2 still reported as training"

        # it wakes up: the same server, listed again
        workers[2].signal_group(signal.SIGCONT)
        proxy.uncut(relay[2])
        t_back = time.monotonic()
        write_members(host_dir, 3, [0, 1, 2])
        trained_by(2, MAX_JOIN)
        back = time.monotonic() - t_back

        # a newcomer behind slot 3: a fresh server, listed as fresh
        workers[3] = Proc("worker", member(3), tmp_path / "member3.log")
        procs.append(workers[3])
        started = workers[3].wait_for(START, lambda e: e["event"] == "started")
        pids += [started["pid"], *started["children"].values()]
        t_join = time.monotonic()
        write_members(host_dir, 4, [0, 1, 2, 3], fresh=[3])
        trained_by(3, MAX_JOIN)
        joined = time.monotonic() - t_join

        # slot 1's job dies with no word from the daemon: the failure path retires it; the daemon
        # then lists it again with a fresh server behind it, and it trains again
        t_kill = time.monotonic()
        workers[1].kill()
        host.wait_for(30, lambda e: e["event"] == "slot" and e["task"] == 1 and e["state"] == "left")
        retired = time.monotonic() - t_kill
        workers[1] = Proc("worker", member(1), tmp_path / "member1b.log")
        procs.append(workers[1])
        started = workers[1].wait_for(START, lambda e: e["event"] == "started")
        pids += [started["pid"], *started["children"].values()]
        t_again = time.monotonic()
        write_members(host_dir, 5, [0, 1, 2, 3], fresh=[1])
        trained_by(1, MAX_JOIN)
        again = time.monotonic() - t_again
        print(f"\nelastic: stall after a slot left {stall:.2f} s; same server back trains after {back:.2f} s; "
              f"a fresh slot trains after {joined:.2f} s; a dead server retired after {retired:.2f} s, "
              f"its fresh replacement trains after {again:.2f} s")

        (host_dir / STOP_FILE).touch()
        done = host.wait_for(120, lambda e: e["event"] == "done")
        assert done["stopped"] is True, done
        # 0.9832 in a clean-clone run 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py); digits has 360 test images (SE ~0.007)
        at_least(done["test_accuracy"], 0.85)
        kinds = [(e["task"], e["state"]) for _, e in host.events if e["event"] == "slot"]
        assert (2, "left") in kinds and (2, "joined") in kinds and (3, "joined") in kinds, kinds
        assert kinds.count((1, "joined")) == 1 and (1, "left") in kinds, kinds
        members = [e for _, e in host.events if e["event"] == "members"]
        assert members[0]["training"] == [0, 1, 2] and members[-1]["training"] == [0, 1, 2, 3], members
        host.proc.wait(timeout=60)
        assert host.proc.returncode == 0
    finally:
        for p in procs:
            p.kill()
        proxy.close()
    time.sleep(1)
    assert [p for p in pids if alive(p)] == []


class _Queue:
    """What a slot worker and the handler touch of TF's closure queue; records the calls."""

    def __init__(self) -> None:
        class Mgr:
            is_cancelled = False

        self._cancellation_mgr = Mgr()
        self.calls: list[str] = []

    def get(self, timeout: float | None = None, tag: int | None = None) -> None:
        return None

    def put_back(self, closure: Any) -> None:
        self.calls.append("put_back")

    def mark_finished(self) -> None:
        self.calls.append("mark_finished")


class _Cluster:
    def __init__(self) -> None:
        self.closure_queue = _Queue()
        self.failure_handler: Any = None
        self.workers: list[Any] = []


class _Closure:
    def __init__(self) -> None:
        self.cancelled = False

    def mark_cancelled(self) -> None:
        self.cancelled = True

    def maybe_call_with_output_remote_value(self, method: Any) -> Any:
        return "rv"


def _slots(n: int, down: set[int] = set()) -> tuple[Any, _Cluster, list[int]]:  # noqa: B006 - read only
    from crowdd.job import elastic

    cluster = _Cluster()
    elastic._STARTING_LIVE = frozenset(range(n))
    try:
        cluster.workers = [elastic.SlotWorker(i, f"/job:worker/replica:0/task:{i}", cluster) for i in range(n)]
    finally:
        elastic._STARTING_LIVE = frozenset()
    retired: list[int] = []
    addresses = [f"127.0.0.1:{1000 + i}" for i in range(n)]
    handler = elastic.ElasticHandler(cluster, addresses, lambda i, _a, _e: retired.append(i),
                                     probe=lambda addr: int(addr.rsplit(":", 1)[1]) - 1000 not in down)
    for w in cluster.workers:
        w.failure_handler = handler
    return handler, cluster, retired


def _fail_on(handler: Any, worker: Any, closure: _Closure, exc: Exception, calls: list[str]) -> None:
    with handler.wait_on_failure(
        on_failure_fn=lambda e: worker._on_closure_failure(closure, e),
        on_transient_failure_fn=lambda: calls.append("transient"),
        worker_device_name=worker.device_name,
    ):
        raise exc


def _unavailable() -> Exception:
    from tensorflow.python.framework import errors

    return errors.UnavailableError(None, None, "Socket closed")


def test_a_function_given_up_on_a_slot_that_left_is_dropped_not_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    handler, cluster, retired = _slots(3)
    worker = cluster.workers[2]
    running, other = _Closure(), _Closure()
    worker.current = running
    assert worker.abandon_current() == "rv"
    worker.detach(_unavailable())
    _fail_on(handler, worker, running, _unavailable(), [])
    assert running.cancelled and cluster.closure_queue.calls == ["mark_finished"]  # its steps ran elsewhere
    _fail_on(handler, worker, other, _unavailable(), [])  # not given up: back to the others
    assert cluster.closure_queue.calls == ["mark_finished", "put_back"] and retired == []
    for w in cluster.workers:
        w.stop()


def test_a_slot_that_just_joined_is_retried_then_the_failure_path_retires_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from crowdd.job import elastic

    monkeypatch.setattr(elastic, "GRACE_RETRY_SECS", 0.0)
    handler, cluster, retired = _slots(3, down={1})
    worker = cluster.workers[1]
    worker.attached_at = time.monotonic()
    calls: list[str] = []
    _fail_on(handler, worker, _Closure(), _unavailable(), calls)
    assert calls == ["transient"] and retired == [] and worker.attached.is_set()
    worker.attached_at -= elastic.ATTACH_GRACE_SECS + 1  # an old member whose server is gone
    _fail_on(handler, worker, _Closure(), _unavailable(), calls)
    assert retired == [1] and not worker.attached.is_set() and worker._should_worker_thread_run  # detached, not ended
    assert cluster.closure_queue.calls == ["put_back"]
    handler.revive(1)
    assert handler.retired == set()
    for w in cluster.workers:
        w.stop()
