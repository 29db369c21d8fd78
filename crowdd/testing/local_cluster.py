"""A whole training cluster on this machine, as real job processes (TF-free; for benchmarks).

Each member gets its own working directory holding the dataset under the same relative name
(as the daemon does), free loopback ports, and its own process group, killed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

from crowdd.job.events import parse_event
from crowdd.node.host import cluster_spec
from crowdd.node.launcher import job_cluster, sandbox_argv
from crowdd.node.ports import free_ports
from crowdd.node.tunnels import RelaySetup
from crowdd.platform.userns import confined
from crowdd.platform.process import SAFE_PATH, group_options, kill_group


@dataclass
class RunResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None

    @property
    def done(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "done"), None)

    @property
    def error(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == "error"), None)


def _place(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def run_cluster(
    root: Path,
    data: Path,
    manifest: Path,
    extra_workers: int,
    job: dict[str, Any],
    settings: dict[str, Any],
    *,
    timeout: float = 1800.0,
    log: Any = None,
    relays: Sequence[RelaySetup] | None = None,
    base: int = 0,
    sandbox: bool = False,
    host_env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run host + ``extra_workers`` workers to the end; return the host's events.

    ``relays`` (one per member, e.g. from :class:`crowdd.testing.tunnel_bridge.TunnelBridge`):
    each job runs behind its relay (in its own network namespace where ``isolated``) and the
    cluster is the group's private one at ports ``base``..; else every TF server is on this
    machine's loopback at free ports. ``sandbox`` (with ``relays``): each job in its Landlock
    sandbox, as the daemon runs it (:mod:`crowdd.platform.sandbox`). ``host_env``: variables
    added to the host job's environment (tests' hooks: :data:`crowdd.job.byzantine.ENV`)."""
    root.mkdir(parents=True, exist_ok=True)
    if relays is not None:
        cluster = cluster_spec(extra_workers, base)
    else:
        ports = free_ports(extra_workers + 1)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(extra_workers + 1):
            _write_spec(root / f"member{i}", i, data, manifest, cluster, job, settings, sandbox)
        for i in [*range(1, extra_workers + 1), 0]:  # the host last: its workers' servers are starting
            fh = open(root / f"member{i}.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(fh)
            argv = [sys.executable, SAFE_PATH, "-m", "crowdd.job", "host" if i == 0 else "worker", "--spec", str(root / f"member{i}" / "spec.json")]
            if relays is not None:
                relay = relays[i]
                jail = sandbox_argv(root / f"member{i}", data, job_cluster(cluster, "host" if i == 0 else "worker")) \
                    if sandbox else []
                argv = [sys.executable, SAFE_PATH, "-m", "crowdd.job.confine", *relay.argv(), *jail, "--", *argv]
                argv = confined(argv, private_view=relay.private_view) if relay.isolated else argv
            procs.append(
                subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                    stderr=fh,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **host_env} if i == 0 and host_env else None,
                    **group_options(),
                )
            )
        return _follow(procs[-1], timeout, log)
    finally:
        for p in procs:
            kill_group(p, grace=0)
        for fh in logs:
            fh.close()


def _write_spec(wd: Path, i: int, data: Path, manifest: Path, cluster: dict[str, list[str]], job: dict[str, Any],
                settings: dict[str, Any], sandbox: bool) -> None:
    """Member ``i``'s job directory: the dataset, its manifest and its spec."""
    wd.mkdir(exist_ok=True)
    if sandbox:  # as the launcher does: a link the sandbox keeps read-only
        (wd / "dataset.bin").unlink(missing_ok=True)
        (wd / "dataset.bin").symlink_to(data.resolve())
    else:
        _place(data, wd / "dataset.bin")
    _place(manifest, wd / "dataset.manifest.json")
    role = "host" if i == 0 else "worker"
    own = job_cluster(cluster, role) if sandbox else None
    spec: dict[str, Any] = {
        "role": role,
        "index": i,
        "cluster": own.to_dict() if own is not None else cluster,
        "job": job,
        "dataset": {"data": "dataset.bin", "manifest": "dataset.manifest.json"},
        "workdir": str(wd),
        "settings": settings,
    }
    if i == 0:
        spec["output_dir"] = "out"
    (wd / "spec.json").write_text(json.dumps(spec))  # inside the job directory: a sandboxed job reads only that


def _follow(host: subprocess.Popen, timeout: float, log: Any) -> RunResult:
    """The host job's events until ``done`` or ``error`` (or ``timeout`` s), and its exit code."""
    result = RunResult()
    assert host.stdout is not None
    deadline = time.monotonic() + timeout
    for line in host.stdout:
        event = parse_event(line)
        if event is None:
            continue
        result.events.append(event)
        if log is not None:
            log(event)
        if event["event"] in ("done", "error") or time.monotonic() > deadline:
            break
    try:
        result.returncode = host.wait(timeout=30)
    except subprocess.TimeoutExpired:
        result.returncode = None
    return result


__all__ = ["RunResult", "free_ports", "run_cluster"]
