"""A malicious group member, for real: during a session, from inside a job's network namespace.

* From the host's job namespace (where its coordinator reaches the group's TF servers), run
  TF ops on every TF server of the group — the host's worker server and coordinator, and each
  worker's server through its tunnel — that try to read the daemons' state (a canary, the
  identity key, the config), a canary in the user's home, list those directories, write
  outside the job's directory, make the server connect to a port outside the cluster, and
  read the environment of the process that runs the op (a secret set in every daemon's
  environment is not in it: a job gets an allowlisted environment, never the daemon's).
  Every attempt fails; a read inside the job's own directory works (so the attack did reach
  the server), but no write does, not even there or in the job's ``TMPDIR``: a TF server
  writes no file at all (the host's coordinator, the job process itself, keeps its directory:
  the control, from the host's own namespace, the only one that reaches it).
* From a worker's job namespace, try every TF address of the group and every port listening
  there: only the worker's own server answers. Nothing reaches the host's coordinator or its
  trainer, or the other worker: no op can assign the model, Abort the run, write in the
  host's work directory or run on another member (TF traffic flows one way).

Every job process runs with no capability and ``no_new_privs``; training finishes with the
usual accuracy and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from crowdd.client.control import ControlClient
from crowdd.cli.demo import Crowd, Node
from crowdd.platform.sandbox import probe
from crowdd.platform.userns import JOB_PASSWD
from crowdd.platform.userns import probe as userns_probe
from crowdd.testing.bounds import at_least

from test_daemon_e2e import ACCURACY_THRESHOLD, TEST_CONFIG, Recorder, digits_npz, donate_all, host_job, job_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

#: a secret in every daemon's environment (a token, say): no job may see it
CANARY_VAR, CANARY = "CLOUD_API_TOKEN", f"canary-{uuid.uuid4().hex}"
LISTEN_PORT = 47999  # outside every cluster (TF ports are 20000..40000)
ATTACK_TIMEOUT = 120.0


@pytest.fixture
async def crowd(tmp_path: Path) -> AsyncIterator[Crowd]:
    if not probe().available:
        pytest.skip(f"no Landlock here: {probe().reason}")
    if not userns_probe().available:
        pytest.skip(f"jobs cannot be confined here: {userns_probe().reason}")
    if not userns_probe().private_view:
        pytest.skip(f"jobs get no private view here: {userns_probe().view_reason}")
    c = Crowd(tmp_path / "crowd", 2, extra_config=TEST_CONFIG, wrap=lambda _node, argv: ["env", f"{CANARY_VAR}={CANARY}", *argv])
    try:
        c.start()
        await c.wait_up()
        yield c
    finally:
        c.close()
        assert not job_processes(c.root), "a job outlived the test"


def relay_of(node: Node) -> psutil.Process:
    """The node's job relay (``crowdd.job.confine``): it lives in the job's namespaces."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        # the relay itself, not the `unshare` that started it (whose arguments name it too)
        if cmd[1:4] in (["-P", "-m", "crowdd.job.confine"], ["-I", "-m", "crowdd.job.confine"]) \
                and any(str(node.root) in a for a in cmd):
            return p
    raise AssertionError(f"{node.name} runs no job")


def job_pid(node: Node) -> int:
    """The node's job process (``python -m crowdd.job ROLE``): its stdout is the daemon's event pipe."""
    for p in job_tree(node):
        cmd = p.cmdline()
        if "crowdd.job" in cmd and "crowdd.job.server" not in cmd:
            return p.pid
    raise AssertionError(f"{node.name}'s job process is not below its relay")


def job_tree(node: Node) -> list[psutil.Process]:
    """The node's job and TF servers (below its relay, which is not sandboxed: no TF in it)."""
    return relay_of(node).children(recursive=True)


async def run(argv: list[str], timeout: float) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[-1]}: no answer within {timeout} s") from None
    return out.decode(), err.decode(errors="replace")


async def listening_ports(netns_pid: int) -> set[int]:
    """The TCP ports listening in that network namespace."""
    out, _ = await run(["nsenter", "-t", str(netns_pid), "-n", "ss", "-Hltn"], 30)
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


async def attack(netns_pid: int, target: str, what: list[str]) -> dict[str, Any]:
    out, err = await run(["nsenter", "-t", str(netns_pid), "-n", sys.executable, "-m",
                          "crowdd.testing.member_attack", "attack", target, *what], ATTACK_TIMEOUT)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"the attack on {target} printed nothing; its stderr ends: {err[-1500:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextlib.asynccontextmanager
async def listener(netns_pid: int, seconds: float) -> AsyncIterator[list[dict[str, Any]]]:
    """A TCP listener on LISTEN_PORT in that namespace; yields the connections it saw (filled in
    on the way out)."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(netns_pid), "-n", sys.executable, "-m", "crowdd.testing.member_attack",
        "listen", str(LISTEN_PORT), str(seconds), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    seen: list[dict[str, Any]] = []
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        yield seen
        out, _ = await asyncio.wait_for(proc.communicate(b""), 30)  # stdin closes: it reports
        seen.extend(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def secrets(crowd: Crowd, home_canary: Path) -> tuple[list[str], list[str], list[str]]:
    """What a member must not read, list, or write: per node its state canary, identity key and
    config; the user's home."""
    reads = [str(home_canary)]
    lists = [str(home_canary.parent)]
    writes = [str(home_canary.parent / f".crowdd-pwned-{uuid.uuid4().hex}"), str(crowd.root / "pwned")]
    for n in crowd.nodes:
        canary = n.root / "state" / "canary.txt"
        canary.write_text(f"state of {n.name}")
        reads += [str(canary), str(n.root / "state" / "identity" / "node.key"), str(n.root / "crowdd.toml")]
        lists += [str(n.root / "state")]
        writes += [str(n.root / "state" / "pwned"), str(n.root / "state" / "jobs" / "pwned")]
    for r in reads:
        assert Path(r).is_file(), r
    return reads, lists, writes


async def test_a_malicious_member_touches_nothing_outside_the_job(crowd: Crowd, tmp_path: Path) -> None:
    home_canary = Path.home() / f".crowdd-canary-{uuid.uuid4().hex}"
    home_canary.write_text("the volunteer's own file")
    data = digits_npz(tmp_path / "digits.npz")
    rec = Recorder(crowd.nodes)
    await rec.start()
    try:
        await donate_all(crowd.workers)
        # long enough to outlast the attacks; stopped (the model kept) once they are done
        await host_job(crowd.host, data, {"workers": 2, "min_workers": 2, "epochs": 5000, "learning_rate": 0.1,
                                          "sharding": "full"})
        for n in crowd.nodes:
            await rec.wait(n.name, lambda e: e["event"] == "state" and e["state"] == "training", 180)
        await rec.wait("host", lambda e: e["event"] == "eval", 120)  # TF is up everywhere
        reads, lists, writes = secrets(crowd, home_canary)  # each node's identity key exists by now
        what = [*(a for r in reads for a in ("--read", r)), *(a for d in lists for a in ("--list", d)),
                *(a for w in writes for a in ("--write", w)), "--connect", str(LISTEN_PORT),
                # the job's own directory: readable (proof that the ops ran on the server), but a
                # server writes no file at all: not there, nor in the job's TMPDIR (autograph's
                # modules, imported by the host's coordinator)
                "--read", "spec.json", "--write", "member-wrote-here", "--write", "tmp/planted.py",
                # the machine as the job sees it: its own PID 1 (the relay) and made-up users
                "--read", "/proc/1/cmdline", "--read", "/etc/passwd",
                # the environment of the process running the op: the job's, never the daemon's
                "--read", "/proc/self/environ", "--find", CANARY]
        host, w1, w2 = crowd.nodes
        for n in crowd.nodes:  # the control: the secret is in each daemon's own environment
            assert n.proc is not None
            assert CANARY.encode() in Path(f"/proc/{n.proc.pid}/environ").read_bytes(), n.name
        spec = json.loads(next((host.root / "state" / "jobs").glob("*/spec.json")).read_text())
        cluster = spec["cluster"]
        targets = {"host worker 0": cluster["worker"][0], "host coordinator": cluster["chief"][0],
                   "worker-1 (tunnel)": cluster["worker"][1], "worker-2 (tunnel)": cluster["worker"][2]}
        relays = {n.name: relay_of(n).pid for n in crowd.nodes}
        victims = {n.name: {p.pid for p in job_tree(n)} for n in crowd.nodes}
        for n in crowd.nodes:
            for p in job_tree(n):
                status = Path(f"/proc/{p.pid}/status").read_text()
                assert "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status, (n.name, p.cmdline())

        machine_init = Path("/proc/1/cmdline").read_bytes()[:64].decode("utf-8", "replace")
        machine_passwd = Path("/etc/passwd").read_text()[:64]
        results: dict[str, dict[str, Any]] = {}
        async with listener(relays["host"], 300) as seen_h, listener(relays["worker-1"], 300) as seen_1, \
                listener(relays["worker-2"], 300) as seen_2:
            gate = asyncio.Semaphore(2)

            # each job's own process: a graph reads its environment or writes its event pipe
            # (/proc/<pid>/fd/1) through /proc; the coordinator is the host's job process itself
            jobs = {n.name: job_pid(n) for n in crowd.nodes}
            siblings: dict[str, list[str]] = {}

            async def one(label: str, netns: int, target: str) -> None:
                pids = [pid for name, pid in jobs.items() if not (label.endswith("host coordinator") and name == "host")]
                siblings[label] = [*(f"/proc/{pid}/environ" for pid in pids), *(f"/proc/{pid}/fd/1" for pid in pids)]
                extra = [*(a for pid in pids for a in ("--read", f"/proc/{pid}/environ")),
                         *(a for pid in pids for a in ("--write", f"/proc/{pid}/fd/1"))]
                async with gate:
                    results[label] = await attack(netns, target, [*what, *extra])

            # a worker tries every address of the group and every port listening in its namespace
            listening = await listening_ports(relays["worker-1"])
            # the matchmaker may give worker-1 either slot: its own spec says which
            w1_spec = json.loads(next((w1.root / "state" / "jobs").glob("*/spec.json")).read_text())
            own = cluster["worker"][w1_spec["index"]]
            tries = sorted({*targets.values(), *(f"127.0.0.1:{p}" for p in listening)} - {own, f"127.0.0.1:{LISTEN_PORT}"})
            await asyncio.gather(
                *(one(f"host netns → {label}", relays["host"], t) for label, t in targets.items()),
                *(one(f"worker-1 netns → {t}", relays["worker-1"], t) for t in tries),
                # the control: its own server answers (sandboxed like every other)
                one("worker-1's own server", relays["worker-1"], own),
            )
        assert crowd.host.name and rec.states("host")[-1] == "training", "training ended before the attacks did"
        from_worker = {label: got for label, got in results.items() if label.startswith("worker-1 netns")}
        assert len(from_worker) >= 3, from_worker  # the host's trainer and coordinator, worker 2 (+ any port listening)
        for label, got in from_worker.items():
            assert not got["reachable"] and not got["ran_op"], f"{label}: a worker reached another member's TF (own {own}, listening {listening}): {got}"
        for label, got in results.items():
            if label in from_worker:
                continue
            assert got["ran_op"], f"{label}: the attack did not reach the server: {got.get('error')}"
            assert got["read"]["spec.json"]["ok"], (label, got["read"]["spec.json"])
            # the control: the machine's own PID 1 and users, read from outside
            assert got["read"]["/proc/1/cmdline"]["content"] != machine_init, (label, got["read"]["/proc/1/cmdline"])
            assert got["read"]["/etc/passwd"]["content"] == JOB_PASSWD[:64] != machine_passwd, (label, got["read"])
            if label.endswith("host coordinator"):
                # the job process itself (it keeps the job's files: checkpoints, the model,
                # TMPDIR); only the host's own namespace reaches it (the worker's tries above)
                assert got["write"]["member-wrote-here"]["ok"], (label, got["write"])
            else:
                for w in ("member-wrote-here", "tmp/planted.py"):  # a TF server: graphs run here
                    assert not got["write"][w]["ok"], (label, w, got["write"][w])
                    assert "Permission denied" in got["write"][w]["error"], (label, w, got["write"][w])
            assert got["read"]["/proc/self/environ"]["ok"], (label, got["read"]["/proc/self/environ"])  # its own: readable
            assert not got["read"]["/proc/self/environ"].get("found"), f"{label} read the daemon's {CANARY_VAR}"
            for path in siblings[label]:  # another process of a job (PR_SET_DUMPABLE 0)
                got_it = got["read"].get(path) or got["write"].get(path)
                assert got_it is not None and not got_it["ok"], f"{label} opened {path}: {got_it}"
            for r in reads:
                assert not got["read"][r]["ok"], f"{label} read {r}: {got['read'][r]}"
                assert "Permission denied" in got["read"][r]["error"], (label, r, got["read"][r])
            for d in lists:
                assert not got["list"][d]["ok"], f"{label} listed {d}: {got['list'][d]}"
            for w in writes:
                assert not got["write"][w]["ok"] and not Path(w).exists(), f"{label} wrote {w}"
        for name, seen in (("host", seen_h), ("worker-1", seen_1), ("worker-2", seen_2)):
            from_victim = [c for c in seen if c.get("pid") in victims[name]]
            assert not from_victim, f"{name}'s TF server connected outside the cluster: {from_victim}"
            unaccounted = [c for c in seen if not c.get("pid")]
            assert not unaccounted, (name, unaccounted, seen)  # every connection is accounted for

        async with ControlClient(crowd.host.socket) as c:
            await c.stop()  # the host keeps what is trained so far
        result = await rec.host_result(crowd.host, 300)
        # 0.9638 and 0.9666 in two clean-clone runs 2026-12-07 (CROWDD_METRICS, crowdd/testing/bounds.py)
        at_least(result["test_accuracy"], ACCURACY_THRESHOLD)
    finally:
        await rec.close()
        home_canary.unlink(missing_ok=True)
        for p in home_canary.parent.glob(".crowdd-pwned-*"):
            p.unlink()
    for _ in range(50):
        if not job_processes(crowd.root):
            break
        await asyncio.sleep(0.2)
    assert not job_processes(crowd.root)
