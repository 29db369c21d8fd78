"""Run replication nodes (:mod:`crowdd.testing.replication_node`) as real processes and watch them.

Works on loopback (every node on 127.0.0.1) or inside a :class:`~crowdd.testing.netns.NetnsLab`
(pass ``launch=lab.popen`` and ``address=lambda i: lab.hosts[i].ip``).

Each node gets its own identity (``<workdir>/ids/m<i>.key``/``.crt``, made in :meth:`NodeCluster.
start`) and every member's certificate, so all replication traffic is mutual TLS pinned to the
group, as between real nodes. ``extra={i: {"identity": {"dir": D, "name": N}}}`` makes node i
present another identity than the one its peers pin (an impostor).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crowdd.trust.identity import Identity
from crowdd.platform.process import group_options, kill_group

Launch = Callable[..., "subprocess.Popen[Any]"]


class NodeFailed(Exception):
    pass


def _local_launch(index: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(list(argv), **group_options(), **kw)


class NodeProc:
    def __init__(self, index: int, proc: subprocess.Popen[Any]) -> None:
        self.index = index
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.port: int | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        if self.proc.stdout is None:
            return
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exit"})
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if pred(ev):
                        return ev
                    if ev.get("event") == "exit":
                        raise NodeFailed(f"node {self.index} exited (rc={self.proc.poll()}) before the event")
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeFailed(f"node {self.index}: timed out after {timeout} s; events: {self.events[-3:]}")
                self._cond.wait(left)

    def event(self, name: str) -> dict[str, Any] | None:
        with self._cond:
            for ev in self.events:
                if ev.get("event") == name:
                    return ev
        return None


class NodeCluster:
    """N node processes sharing one manifest and token."""

    def __init__(
        self,
        workdir: Path,
        *,
        n: int,
        token: str,
        manifest_path: Path,
        route: str = "binomial",
        stall_timeout: float = 10.0,
        launch: Launch = _local_launch,
        address: Callable[[int], str] = lambda i: "127.0.0.1",
        listen: Callable[[int], str] | None = None,
        extra: dict[int, dict[str, Any]] | None = None,
        verbose: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.n = n
        self.token = token
        self.manifest_path = manifest_path
        self.route = route
        self.stall_timeout = stall_timeout
        self.launch = launch
        self.address = address
        self.listen = listen or address
        self.extra = extra or {}
        self.verbose = verbose
        self.nodes: list[NodeProc] = []
        self.identities: list[Identity] = []

    def make_identities(self) -> list[Identity]:
        """The members' identities (made once, in ``<workdir>/ids``)."""
        if not self.identities:
            ids = self.workdir / "ids"
            self.identities = [Identity.load_or_create(ids, f"m{i}") for i in range(self.n)]
        return self.identities

    def spec(self, i: int) -> dict[str, Any]:
        identities = self.make_identities()
        spec: dict[str, Any] = {
            "index": i, "n": self.n, "token": self.token, "manifest": str(self.manifest_path),
            "cache": str(self.workdir / f"cache{i}"), "route": self.route,
            "stall_timeout": self.stall_timeout, "listen": self.listen(i), "port": 0,
            "identity": {"dir": str(identities[i].key_path.parent), "name": f"m{i}"},
            "certs": [ident.cert_pem.decode("ascii") for ident in identities],
        }
        spec.update(self.extra.get(i, {}))
        return spec

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            spec_path = self.workdir / f"node{i}.json"
            spec_path.write_text(json.dumps(self.spec(i)))
            argv = [sys.executable, "-m", "crowdd.testing.replication_node", "--spec", str(spec_path)]
            if self.verbose:
                argv.append("-v")
            log = open(self.workdir / f"node{i}.log", "wb")  # noqa: SIM115 - owned by the child
            try:
                proc = self.launch(i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
            finally:
                log.close()
            self.nodes.append(NodeProc(i, proc))
        for node in self.nodes:
            ev = node.wait_for(lambda e: e.get("event") == "listening", timeout)
            node.port = int(ev["port"])

    def go(self) -> float:
        """Send everyone the peer list; returns the time just before the first send."""
        peers = [[nd.index, self.address(nd.index), nd.port] for nd in self.nodes]
        line = (json.dumps({"peers": peers}) + "\n").encode()
        t0 = time.time()
        for node in self.nodes:
            if node.proc.stdin is not None and node.proc.poll() is None:
                node.proc.stdin.write(line)
                node.proc.stdin.flush()
        return t0

    def wait_done(self, indices: Sequence[int] | None = None, timeout: float = 120.0) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = {}
        for i in indices if indices is not None else range(self.n):
            out[i] = self.nodes[i].wait_for(
                lambda e: e.get("event") in ("done", "error"), max(0.1, deadline - time.monotonic())
            )
        return out

    def kill(self, i: int) -> None:
        kill_group(self.nodes[i].proc, grace=0)

    def log(self, i: int) -> str:
        try:
            return (self.workdir / f"node{i}.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        for node in self.nodes:
            stdin = node.proc.stdin
            if stdin is not None and node.proc.poll() is None:
                try:
                    stdin.write(b"exit\n")
                    stdin.flush()
                except OSError:
                    pass
        deadline = time.monotonic() + 3.0
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if node.proc.poll() is None:
                kill_group(node.proc, grace=0)
            for stream in (node.proc.stdin, node.proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        self.nodes.clear()

    def __enter__(self) -> NodeCluster:  # noqa: PYI034 - 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
