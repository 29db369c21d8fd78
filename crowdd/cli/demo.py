"""``crowdd demo``: a whole crowd on this machine.

Starts a matchmaker and 1 host + N worker daemons as real processes, each below its own
directory (state, cache, control socket, log) with its own ports; switches the workers'
donation on, asks the host to host a dataset (Fashion-MNIST when Debian's
``dataset-fashion-mnist`` is installed, else scikit-learn's digits; ``--dataset`` for your
own), shows every node's state, replication and training progress, prints the final test
accuracy and where the model is, and exits 0. Every process it started is ended on the way
out — also on Ctrl-C, SIGTERM and failure (process groups, ``finally``, ``atexit``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from crowdd.config import JobConfig, Paths
from crowdd.trust.identity import Identity
from crowdd.cli.commands import score
from crowdd.client.control import HOST_TIMEOUT, ControlClient
from crowdd.errors import RemoteError, Unavailable
from crowdd.job.card import usage_hint
from crowdd.node.ports import free_port
from crowdd.platform.process import SIGKILL, group_options, kill_group, signal_group

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
START_TIMEOUT = 60.0
RUN_TIMEOUT = 900.0
STOP_GRACE = 10.0

#: The demo's job settings: small enough to finish in a couple of minutes on 2 cores.
DEMO_JOB: dict[str, Any] = {"model": "mlp", "hidden": [100], "learning_rate": 0.5, "batch_size": 100, "sharding": "full",
                            "eval_every_secs": 5.0}
DEFAULT_EPOCHS = 2
SMALL_EPOCHS = 20  # scikit-learn's digits is tiny: 2 passes would not learn much


@dataclass
class Node:
    name: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    state: str = "?"
    replication: tuple[int, int] = (0, 0)
    log: Path = field(default_factory=Path)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "control.sock"


class Processes:
    """Every process the demo starts, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=env, **group_options(death_signal=signal.SIGTERM),
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM every group (the daemons kill their jobs), then SIGKILL what is left."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            signal_group(p.pid, SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs = []


def kill_strays(root: Path) -> int:
    """Kill crowdd processes (daemons, jobs, TF servers) whose command line names a file
    below ``root``: jobs of the demo's daemons that outlived them. Only crowdd's own
    processes under this demo's directory match; never this process or its ancestors."""
    import psutil

    mark = str(root)
    spared = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        spared |= {p.pid for p in psutil.Process().parents()}
    killed = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if p.pid in spared or not any(part.startswith("crowdd") for part in cmd):
            continue
        if any(mark in part for part in cmd):
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed += 1
    return killed


class Crowd:
    """A matchmaker and 1 host + N worker daemons as real processes below ``root``.

    Used by ``crowdd demo`` and by the integration tests. Every process leads its own
    process group; :meth:`close` ends them all (and any job that outlived its daemon).
    """

    def __init__(self, root: Path, workers: int, *, nice: int = 10, extra_config: str = "",
                 python: str = sys.executable, verbose: bool = True, steps_per_function: int = 20,
                 sync_every: int = 10, wrap: Callable[[Node, list[str]], list[str]] | None = None) -> None:
        self.root = root
        self.wrap = wrap  # how a node's daemon is started (a benchmark puts it in its own cgroup)
        self.python = python
        self.procs = Processes()
        self.matchmaker_addr = f"127.0.0.1:{free_port()}"
        self.matchmaker: subprocess.Popen[bytes] | None = None
        self.nice = nice
        self.extra_config = extra_config
        self.verbose = verbose
        self.job_settings = (steps_per_function, sync_every)
        self.nodes = [Node("host", root / "host")] + [Node(f"worker-{i}", root / f"worker-{i}") for i in range(1, workers + 1)]
        self._matchmaker_fingerprint = ""

    @property
    def matchmaker_fingerprint(self) -> str:
        """The matchmaker's certificate fingerprint, which every node pins. Its identity is
        made here, before it starts, in the state directory ``crowdd matchmaker`` uses."""
        if not self._matchmaker_fingerprint:
            identity_dir = Paths.under(self.root / "matchmaker").identity_dir
            self._matchmaker_fingerprint = Identity.load_or_create(identity_dir, "matchmaker").fingerprint
        return self._matchmaker_fingerprint

    @property
    def host(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    def start_matchmaker(self) -> None:
        self.matchmaker_fingerprint  # noqa: B018 - made before the matchmaker starts (it reuses it)
        self.matchmaker = self.procs.start(
            # --root names the demo's directory on its command line, so kill_strays finds it too.
            [self.python, "-m", "crowdd", "matchmaker", "--listen", self.matchmaker_addr, "--root", str(self.root / "matchmaker")],
            self.root / "matchmaker.log",
        )

    def stop_matchmaker(self, sig: int = signal.SIGTERM) -> None:
        if self.matchmaker is not None:
            kill_group(self.matchmaker, 10.0, sig)
            self.matchmaker = None

    def start_node(self, node: Node) -> None:
        node.root.mkdir(parents=True, exist_ok=True)
        (node.root / "crowdd.toml").write_text(node_config(
            self.matchmaker_addr, node.name, self.nice, *self.job_settings, fingerprint=self.matchmaker_fingerprint,
        ) + self.extra_config)
        node.log = node.root / "daemon.log"
        argv = [self.python, "-m", "crowdd", "daemon", "--root", str(node.root), "--matchmaker", self.matchmaker_addr]
        argv += ["-v"] if self.verbose else []
        node.proc = self.procs.start(self.wrap(node, argv) if self.wrap is not None else argv, node.log)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_matchmaker()
        for node in self.nodes:
            self.start_node(node)

    async def wait_up(self, timeout: float = START_TIMEOUT) -> None:
        await asyncio.gather(*(_wait_up(n, timeout) for n in self.nodes))

    def kill_node(self, node: Node, sig: int = signal.SIGKILL) -> None:
        if node.proc is not None:
            signal_group(node.proc.pid, sig)
            node.proc.wait(timeout=30)

    def close(self) -> None:
        self.procs.stop_all()
        kill_strays(self.root)


# --------------------------------------------------------------------------- dataset


def default_dataset(root: Path, out: TextIO) -> Path:
    if FASHION_MNIST.is_dir():
        return FASHION_MNIST
    import numpy as np

    from crowdd.data.datasets import load_digits

    arrays = load_digits()
    path = root / "digits.npz"
    np.savez(path, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    out.write(f"(no {FASHION_MNIST}: using scikit-learn's digits, written to {path})\n")
    return path


def permissive_idle_table() -> str:
    """An ``[idle]`` table under which the idle policy always allows: the demo (and tests)
    must run whatever the machine's load, user or power source (the default policy holds
    donation back while the user or other processes are busy)."""
    return (
        "[idle]\n"
        "# a demo runs regardless of load: every idle rule off\n"
        "user_idle_minutes = 0\n"
        "max_other_cpu_percent = 100\n"
        "allow_on_battery = true\n"
    )


def node_config(matchmaker: str, name: str, nice: int, steps_per_function: int = 20, sync_every: int = 10, *,
                fingerprint: str = "") -> str:
    return (
        "# written by `crowdd demo`\n"
        "[daemon]\n"
        f'matchmaker = "{matchmaker}"\n'
        f'matchmaker_fingerprint = "{fingerprint}"\n'
        f'name = "{name}"\n'
        'listen_host = "127.0.0.1"\n'
        "retry_min = 0.5\n"
        "retry_max = 5.0\n"
        "[job]\n"
        "# below normal priority, but not SCHED_IDLE: the demo should not starve behind other work\n"
        f"nice = {nice}\n"
        f"steps_per_function = {steps_per_function}\n"
        f"sync_every = {sync_every}\n"
        + permissive_idle_table()
    )


# --------------------------------------------------------------------------- display


class Display:
    """Plain terminal output: one line per state change; a refreshing progress line on a TTY."""

    def __init__(self, out: TextIO, t0: float) -> None:
        self.out = out
        self.t0 = t0
        self.tty = out.isatty()
        self._bar_shown = False
        self._last_bar = 0.0

    def line(self, who: str, text: str) -> None:
        self._clear_bar()
        self.out.write(f"{time.monotonic() - self.t0:7.1f}s  {who:<10} {text}\n")
        self.out.flush()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False

    def bar(self, who: str, text: str, frac: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_bar < (0.2 if self.tty else 5.0):
            return
        self._last_bar = now
        width = 24
        fill = round(max(0.0, min(1.0, frac)) * width)
        bar = "#" * fill + "-" * (width - fill)
        msg = f"{now - self.t0:7.1f}s  {who:<10} [{bar}] {100 * frac:5.1f}%  {text}"
        if self.tty:
            self.out.write("\r\033[K" + msg)
            self._bar_shown = True
        else:
            self.out.write(msg + "\n")
        self.out.flush()


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


# --------------------------------------------------------------------------- the run


async def _wait_up(node: Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited early (code {node.proc.returncode}); see {node.log}")
        client = ControlClient(node.socket)
        try:
            await client.status()
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not open its control socket within {timeout:.0f} s; see {node.log}") from None
            await asyncio.sleep(0.2)
        finally:
            await client.close()


async def _watch(node: Node, display: Display, result: asyncio.Future[dict[str, Any]], is_host: bool) -> None:
    client = ControlClient(node.socket)
    errors: list[str] = []
    async for ev in client.subscribe():
        kind = ev.get("event")
        if kind == "state":
            node.state = str(ev.get("state"))
            display.line(node.name, f"{ev.get('previous')} -> {node.state}")
            if is_host and node.state == "training":
                display.line("demo", "starting the TensorFlow cluster (loading TensorFlow takes a while)...")
        elif kind == "replication" and ev.get("index") is not None:
            done, total = int(ev.get("done") or 0), int(ev.get("total") or 0)
            if not is_host and total and (done, total) != node.replication:
                node.replication = (done, total)
                if done < total:
                    display.bar(node.name, f"dataset {done / 1e6:6.1f} / {total / 1e6:.1f} MB", done / total)
                else:
                    display.line(node.name, f"dataset verified ({total:,} bytes)")
        elif kind == "progress" and is_host:
            epochs = ev.get("epochs") or 1
            step, total_steps = ev.get("step") or 0, ev.get("total_steps") or 0
            frac = step / total_steps if total_steps else (ev.get("epoch") or 0) / epochs
            display.bar(
                "training",
                f"epoch {ev.get('epoch')}/{epochs} step {step}/{total_steps or '?'} loss {_fmt(ev.get('loss'))} "
                f"acc {_fmt(ev.get('accuracy'))} {_fmt(ev.get('samples_per_sec'), '.0f')} samples/s",
                frac,
            )
        elif kind == "eval" and is_host:
            display.line("eval", f"epoch {ev.get('epoch')}: {score(ev)}")
        elif kind == "log" and ev.get("level") in ("warning", "error"):
            display.line(node.name, f"{ev.get('level')}: {ev.get('message')}")
        if not is_host or result.done():
            continue
        if kind == "log" and ev.get("level") == "error":
            errors.append(str(ev.get("message")))
        elif kind == "result":
            result.set_result(ev)
        elif kind == "state" and ev.get("state") in ("off", "standby") and ev.get("previous") != "finished":
            result.set_exception(RuntimeError(f"the host gave up: {errors[-1] if errors else 'see its log'}"))


async def _run(args: argparse.Namespace, crowd: Crowd, out: TextIO) -> int:
    t0 = time.monotonic()
    root = crowd.root
    dataset = Path(args.dataset).expanduser().absolute() if args.dataset else default_dataset(root, out)
    small = dataset.suffix == ".npz" and dataset.stat().st_size < 2 << 20  # digits-sized: a few more passes
    epochs = int(args.epochs) if args.epochs else (SMALL_EPOCHS if small else DEFAULT_EPOCHS)
    out.write(f"crowdd demo: matchmaker + 1 host + {len(crowd.workers)} workers below {root}\n")
    out.write(f"dataset: {dataset}\n")
    out.flush()
    crowd.start()
    await crowd.wait_up()
    nodes = crowd.nodes
    display = Display(out, t0)
    display.line("demo", f"{len(nodes)} daemons up; matchmaker on {crowd.matchmaker_addr}")
    result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    watchers = [asyncio.create_task(_watch(n, display, result, i == 0)) for i, n in enumerate(nodes)]
    try:
        await asyncio.sleep(0.2)  # let the subscriptions open before things move
        for node in crowd.workers:
            async with ControlClient(node.socket) as c:
                await c.donate(True)
        job = {**DEMO_JOB, "epochs": epochs, "workers": len(crowd.workers), "min_workers": len(crowd.workers)}
        if getattr(args, "learning_rate", None) is not None:
            job["learning_rate"] = args.learning_rate
        request: dict[str, Any] = {"type": "host", "dataset": str(dataset), "job": job}
        if getattr(args, "model_file", None) is not None:
            request["model_file"] = str(Path(args.model_file).expanduser().absolute())
            job["model"] = "file"
        for key in ("task", "label"):
            if getattr(args, key, None) is not None:
                request[key] = getattr(args, key)
        async with ControlClient(crowd.host.socket) as c:
            try:
                await c.request(request, timeout=HOST_TIMEOUT)
            except RemoteError as exc:
                raise RuntimeError(f"the host refused the dataset: {exc.message}") from None
        display.line("demo", f"workers donating; host asked to train {job['model']} {job['hidden']} for {epochs} epoch(s)")
        res = await asyncio.wait_for(result, RUN_TIMEOUT)
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    display.line("demo", "done")
    if isinstance(res.get("test_mae"), (int, float)):
        out.write(f"\nfinal test MAE: {_fmt(res.get('test_mae'), '.4f')} (MSE {_fmt(res.get('test_mse'), '.4f')})\n")
    else:
        out.write(f"\nfinal test accuracy: {_fmt(res.get('test_accuracy'), '.4f')}\n")
    out.write(f"model: {res.get('model_path')}\n")
    if res.get("model_path"):
        out.write("".join(f"  {line}\n" for line in usage_hint(str(res["model_path"]))))
    out.write(f"logs and state: {root}\n")
    out.write(f"total time: {time.monotonic() - t0:.1f} s\n")
    out.flush()
    return 0


def main(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.workers > 16:
        print("crowdd demo: --workers must be between 1 and 16", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print("crowdd demo: --epochs must be >= 1", file=sys.stderr)
        return 2
    if args.dataset is not None and not Path(args.dataset).exists():
        print(f"crowdd demo: {args.dataset}: no such file or directory", file=sys.stderr)
        return 2
    root = Path(args.root).absolute() if args.root else Path(tempfile.mkdtemp(prefix="crowdd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    cfg = JobConfig()  # the shipped group settings (the tests' crowds use smaller ones)
    crowd = Crowd(root, int(args.workers), steps_per_function=cfg.steps_per_function, sync_every=cfg.sync_every)

    def cleanup() -> None:
        crowd.close()

    atexit.register(cleanup)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        return asyncio.run(_run(args, crowd, sys.stdout))
    except KeyboardInterrupt:
        print("\ncrowdd demo: interrupted; stopping every node", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
        print(f"\ncrowdd demo failed: {exc or type(exc).__name__}; logs in {root}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
        cleanup()
        atexit.unregister(cleanup)


__all__ = ["default_dataset", "free_port", "kill_strays", "main", "node_config", "permissive_idle_table"]
