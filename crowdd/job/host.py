"""The host job: worker 0 (a child process) and the coordinator, which holds the model.

There is no parameter server: TF traffic flows one way, from this coordinator to each worker
(``docs/security.md``). Every change a worker returns is validated before any of it touches
the model (:mod:`crowdd.job.validate`), and a member whose changes keep failing is expelled.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crowdd.job import EXIT_FAILED, EXIT_OK, MEMBERS_FILE, STOP_FILE
from crowdd.job.arrivals import Arrivals
from crowdd.job.card import CARD_NAME, build_card, usage, write_card
from crowdd.job.events import EventWriter
from crowdd.job.health import Diverged, all_finite, finite
from crowdd.job.membership import POLL_SECS, Members, MembersWatcher
from crowdd.job.server import cap_threads, reachable, spawn
from crowdd.job.spec import INDEX_FILE, JobSpec
from crowdd.manifest import Layout, Manifest, ManifestError
from crowdd.platform.process import host_pid, lower_priority, watch_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
#: every change's verdict, one JSON object a line, in the host job's output directory
VALIDATION_LOG = "validation.jsonl"
PROGRESS_EVERY = 0.5


class Children:
    """The job's TF server processes; kills them all on :meth:`kill`."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def add(self, name: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self.procs[name] = proc

    def kill(self) -> None:
        with self._lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    try:
                        proc.kill()
                    except OSError:
                        pass
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass


def wait_ready(proc: subprocess.Popen, name: str, timeout: float = READY_TIMEOUT) -> None:
    """Block until the server child prints ``ready``; raise RuntimeError if it dies first."""
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        result.append(proc.stdout.readline())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not result or result[0].strip() != "ready":
        code = proc.poll()
        raise RuntimeError(
            f"{name} server did not start" + (f" (exit code {code}; is its port free?)" if code is not None else "")
        )


#: how much nicer the host's own trainer (worker 0) runs than the rest of its job
TRAINER_NICE_STEP = 10


def server_nice(job_name: str, nice: int) -> int:
    """The niceness of a host-side TF server: the host's own trainer (worker 0) runs
    ``TRAINER_NICE_STEP`` nicer than the job's ``nice`` (at most 19).

    The coordinator (this process: it hands out every round and validates every change) and
    the daemon's tunnels serve every worker: a round that waits behind the host's own training
    steps stalls a remote worker, and the host's trainer is one of N. Measured on 0.4-CPU
    emulated machines (``benchmarks/scaling.py``, when the host also ran a parameter server).
    At nice 19 every job process already runs SCHED_IDLE and there is nothing lower; the
    daemon (nice 0) still comes first.
    """
    return min(19, nice + TRAINER_NICE_STEP) if job_name == "worker" else nice


def start_servers(spec: JobSpec, names: list[tuple[str, str, int]], children: Children) -> None:
    """Start each named TF server; each knows only its own task (nothing else to reach)."""
    for label, job_name, task in names:
        own = {job_name: {task: spec.cluster.worker[task]}}
        children.add(label, spawn(own, job_name, task, threads=spec.settings.threads,
                                  nice=server_nice(job_name, spec.settings.nice)))
    for label, _, _ in names:
        wait_ready(children.procs[label], label)


class Fatal:
    """Reports the job's one fatal error (a watchdog thread and the main loop may both see it)."""

    def __init__(self, events: EventWriter) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._said = False

    def report(self, message: str) -> None:
        with self._lock:
            if not self._said:
                self._said = True
                self._events.error(message)


def abort(fatal: Fatal, children: Children, message: str) -> None:
    """End the job now from any thread: the error event, the children killed, exit code 1.

    The main thread may sit in TF's C++ (a blocking connect or fetch) that no Python
    exception can interrupt, so the watchdogs end the process themselves.
    """
    fatal.report(message)
    children.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


def missing_workers(addresses: list[str], probe: Callable[[str], bool], live: frozenset[int] | None = None) -> list[str]:
    """``index address`` of each (live) worker server that does not accept a connection."""
    return [f"{i} ({addr})" for i, addr in enumerate(addresses) if (live is None or i in live) and not probe(addr)]


def starting_members(num_slots: int) -> Members:
    """The members file as the job starts (every slot when there is none, or it is bad)."""
    return MembersWatcher(Path(MEMBERS_FILE), num_slots).poll() or Members.everyone(num_slots)


def watch_start(
    spec: JobSpec, children: Children, fatal: Fatal, connected: threading.Event, stop: threading.Event,
    probe: Callable[[str], bool], live: frozenset[int] | None = None,
) -> None:
    """TF waits for every (live) worker server without end; give up after ``settings.start_timeout``."""
    timeout = spec.settings.start_timeout

    def loop() -> None:
        if connected.wait(timeout) or stop.is_set():
            return
        missing = missing_workers(list(spec.cluster.worker), probe, live)
        which = ", ".join(missing) if missing else "one or more workers (all answer now; too slow)"
        abort(
            fatal, children,
            f"worker server(s) {which} did not come up within {timeout:g} s (settings.start_timeout); "
            "training cannot start",
        )

    threading.Thread(target=loop, name="start-watch", daemon=True).start()


@dataclass
class WorkerStats:
    loss: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    since: float = field(default_factory=time.monotonic)

    def add(self, loss: float, correct: float, samples: float) -> None:
        self.loss += loss
        self.correct += correct
        self.samples += samples

    def reset(self, now: float) -> None:
        self.loss = self.correct = self.samples = 0.0
        self.since = now


class CheckpointStore:
    """``ckpt-STEP.npz`` files (weights, optimizer slots, step) in ``dir``; keeps the last two."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def latest(self) -> Path | None:
        found = sorted(self.dir.glob("ckpt-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
        return found[-1] if found else None

    def save(self, step: int, arrays: list) -> Path:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"ckpt-{step}.npz"
        tmp = self.dir / f".ckpt-{step}.tmp.npz"
        np.savez(tmp, step=np.int64(step), **{f"v{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, path)
        for old in sorted(self.dir.glob("ckpt-*.npz"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: Path, count: int) -> tuple[int, list]:
        import numpy as np

        with np.load(path) as z:
            arrays = [z[f"v{i}"] for i in range(count)]
            return int(z["step"]), arrays


def run_host(spec: JobSpec, layout: Layout, events: EventWriter) -> int:
    out = Path(spec.output_dir or "output").absolute()
    try:
        Path(INDEX_FILE).write_text("0\n")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        events.error(f"cannot write the working or output directory: {exc}")
        return EXIT_FAILED
    children = Children()
    stop = threading.Event()
    fatal = Fatal(events)

    # No SIGTERM handler: the main thread may sit in TF's C++ for long, which would delay a
    # Python handler. The default action ends the job at once and the server children follow
    # (PR_SET_PDEATHSIG, and their own watch on our pid).
    parent = os.getppid()
    def parent_died() -> None:
        children.kill()
        os._exit(EXIT_OK)

    watch_parent(parent, parent_died)
    try:
        try:
            start_servers(spec, [("worker0", "worker", 0)], children)
        except RuntimeError as exc:
            events.error(str(exc))
            return EXIT_FAILED
        events.emit(
            "started",
            role="host",
            index=0,
            ports=spec.own_ports(),
            pid=host_pid(),  # as the daemon, outside the job's PID namespace, knows them
            children={k: host_pid(p.pid) for k, p in children.procs.items()},
        )
        connected = threading.Event()
        watch_start(spec, children, fatal, connected, stop, reachable,
                    starting_members(spec.cluster.num_workers).live)
        lower_priority(spec.settings.nice)
        cap_threads(spec.settings.threads)

        def workers_gone(message: str) -> None:
            abort(fatal, children, message)

        guard = Guard(connected=connected, all_workers_gone=workers_gone)
        return Coordinator(spec, layout, events, out, guard).run()
    except Exception as exc:  # the job's last word: an error event, never a traceback only
        log.exception("host job failed")
        fatal.report(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        stop.set()
        children.kill()


@dataclass
class Guard:
    """What the coordinator needs to tell a worker fault from a fatal one.

    ``connected``: set once every worker server answered (disarms the start timeout).
    ``all_workers_gone(message)``: ends the job (it does not return).
    """

    connected: threading.Event = field(default_factory=threading.Event)
    all_workers_gone: Callable[[str], None] = lambda message: None


def scalar(tag: str, value: float) -> None:
    """A TensorBoard scalar without the tensorboard package (``tf.summary.scalar`` needs it)."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=meta)


class Coordinator:
    """The chief: builds the strategy, schedules training, evaluates, checkpoints, saves."""

    def __init__(
        self, spec: JobSpec, layout: Layout, events: EventWriter, out: Path, guard: Guard | None = None
    ) -> None:
        self.guard = guard if guard is not None else Guard()
        self.spec = spec
        self.layout = layout
        self.events = events
        self.out = out
        self.job = spec.job
        self.num_workers = spec.cluster.num_workers
        self.store = CheckpointStore(out / "checkpoints")
        self.closing: list[Callable[[], None]] = []

    def run(self) -> int:
        """Train to the end; a diverged loss ends the run with the advice and the last finite
        checkpoint kept (every checkpoint saved was checked finite first)."""
        try:
            return self._train()
        except Diverged as exc:
            latest = self.store.latest()
            log.error("%s (last finite checkpoint: %s)", exc, latest)
            self.events.emit("error", message=str(exc), field="job.learning_rate", step=exc.step,
                             checkpoint=str(latest) if latest is not None else None)
            return EXIT_FAILED
        finally:
            for close in self.closing:
                close()

    def total_steps(self, records: int | None = None) -> int:
        """The run's steps over ``records`` training records (default: all of them)."""
        from crowdd.job.shards import total_steps

        job = self.job
        n = self.layout.train_count if records is None else records
        return total_steps(job.sharding, self.num_workers, n, job.batch_size, job.epochs)

    def dataset_info(self) -> dict[str, Any]:
        """The dataset's name and digests, from its manifest (for the model card)."""
        try:
            m = Manifest.from_json(Path(self.spec.manifest).read_bytes())
        except (OSError, ManifestError):
            return {}
        return {"name": m.name, "digest": m.digest(), "sha256": m.sha256, "size": m.size}

    def _train(self) -> int:
        import numpy as np
        import tensorflow as tf

        from crowdd.job.byzantine import BadWorkers
        from crowdd.job.data import holdout_count, holdout_every, read_holdout, read_split, target_stats, train_moments, worker_dataset
        from crowdd.job.elastic import ElasticCluster
        from crowdd.job.faults import RETRYABLE, RetryBudget, flush_error
        from crowdd.job.models import build_model, loss_function
        from crowdd.job.outer import effective_merge, lr_factor, push_scale
        from crowdd.job.judge import ChangeDesk
        from crowdd.job.params import Params
        from crowdd.job.train import make_round_fn, round_inputs
        from crowdd.job.validate import Validator

        threads = self.spec.settings.threads
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        t0 = time.monotonic()
        guard = self.guard
        watcher = MembersWatcher(Path(MEMBERS_FILE), self.num_workers)
        members = watcher.poll() or Members.everyone(self.num_workers)
        failed: set[int] = set()  # slots retired by failure; only the file brings them back
        expelled: dict[int, str] = {}  # slots expelled; only a newcomer ("fresh") takes one again
        seen: set[int] = set(members.live)  # slots that have trained in this run
        elastic: ElasticCluster | None = None
        bad = BadWorkers.from_env()
        if bad.modes:
            log.warning("TEST HOOK: bad workers in slots %s", dict(bad.modes))

        def announce(why: str) -> None:
            assert elastic is not None
            self.events.emit("members", version=members.version, live=sorted(members.live),
                             training=sorted(elastic.attached()), why=why)

        def on_retire(index: int, alive: int, exc: BaseException) -> None:
            del alive  # the slots attached now is what counts
            assert elastic is not None
            failed.add(index)
            left = len(elastic.attached())
            self.events.emit("slot", task=index, state="left", why=f"its server failed ({type(exc).__name__})")
            if left:
                log.warning("worker %d is gone; its functions go to the %d left", index, left)
                announce(f"worker {index} failed")
            else:
                guard.all_workers_gone(f"every worker server is gone (the last, worker {index}: "
                                       f"{type(exc).__name__}); training cannot go on")

        # the strategy's cluster holds only the live slots: one that is absent is not waited for
        elastic = ElasticCluster(list(self.spec.cluster.worker), members.live, on_retire, list(self.spec.cluster.chief))
        coordinator = elastic.coordinator
        budget = RetryBudget()
        regression = self.layout.task == "regression"
        layout, job, w = self.layout, self.job, self.num_workers
        every = holdout_every(layout.train_count)
        target = target_stats(Path(self.spec.data), layout) if regression else (0.0, 1.0)
        loss_fn = loss_function(job, layout, target[1])
        center, variance = train_moments(Path(self.spec.data), layout)
        # images (uint8) share one scale; measurements (float) are standardized feature by feature
        spread = variance if layout.feature_dtype == "float32" else None
        # the model lives here, in the coordinator's memory, and nowhere else
        model = build_model(job, layout, center, target, spread)
        merge = effective_merge(self.spec.settings.merge, w)
        params = Params([v.numpy() for v in model.trainable_variables], job, merge)
        scale = push_scale(merge, w)
        round_fn = make_round_fn(model, job, loss_fn, regression, bad.flipped, layout.num_classes)
        self.guard.connected.set()  # the strategy reached every live server
        # a compiled forward pass: Keras' predict() costs several times more per evaluation
        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        fixed = [tf.constant(v.numpy()) for v in model.non_trainable_variables]

        # the held-back records: every change is judged on them before it counts
        x_val, y_val = read_holdout(Path(self.spec.data), layout, every) if every else read_split(
            Path(self.spec.data), layout, "test")
        val_x = tf.constant(x_val)
        val_y = tf.constant(y_val)

        @tf.function(reduce_retracing=True)
        def val_loss(weights):
            probs, _ = model.stateless_call(list(weights), fixed, val_x, training=False)
            return loss_fn(val_y, probs)

        def loss_of(weights: list) -> float:
            return float(val_loss([tf.constant(a) for a in weights]))

        @tf.function(reduce_retracing=True)
        def val_grad(weights):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                probs, _ = model.stateless_call(list(weights), fixed, val_x, training=False)
                loss = loss_fn(val_y, probs)
            return tape.gradient(loss, weights)

        def grad_of(weights: list) -> list:
            return [g.numpy() for g in val_grad([tf.constant(a) for a in weights])]

        weight_shapes, slot_shapes = params.shapes()
        validator = Validator(weight_shapes, slot_shapes, loss_of, max_lag=4 * max(1, w) + 4, grad_of=grad_of,
                              directional=job.sharding == "full")
        # every verdict, for the host to audit (the daemon never reads it)
        audit = open(self.out / VALIDATION_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        self.closing.append(audit.close)
        desk = ChangeDesk(params, validator, scale, bad=bad, audit=audit)

        store = self.store
        lr = job.learning_rate

        def finite_arrays(step: int) -> list:
            arrays = params.arrays()
            if not all_finite(arrays):
                raise Diverged(step, lr)
            return arrays

        done = 0
        latest = store.latest()
        if latest is not None:
            done, arrays = store.load(latest, len(params.arrays()))
            params.load(arrays)
            self.events.emit("resumed", path=str(latest), step=done)

        data_path = self.spec.data

        def dataset_fn():
            return worker_dataset(data_path, layout, job.sharding, w, job.batch_size, every)

        per_worker = coordinator.create_per_worker_dataset(dataset_fn)
        iterator = iter(per_worker)
        x_test, y_test = read_split(Path(self.spec.data), layout, "test")
        tb_dir = self.out / "tensorboard"
        writer = tf.summary.create_file_writer(str(tb_dir))

        total = self.total_steps(layout.train_count - holdout_count(layout.train_count, every))
        per_epoch = total / job.epochs
        # the trainers' step: the user's learning rate times the merge rule's factor, which
        # may change as the run goes (crowdd.job.outer.lr_factor); handed out with each round
        rate = {"now": float(job.learning_rate)}

        def set_rate(step: int) -> None:
            rate["now"] = job.learning_rate * lr_factor(merge, w, step / max(1, total))

        set_rate(done)
        k_round = min(self.spec.settings.sync_every, self.spec.settings.steps_per_function)
        stats: dict[int, WorkerStats] = collections.defaultdict(WorkerStats)
        last_ckpt = time.monotonic()
        scheduled = done
        # (RemoteValue, steps, the model version its weights were handed out at)
        in_flight: list[tuple[Any, int, int]] = []
        arrivals = Arrivals()
        last_eval: dict[str, Any] = {}
        evals_done = int(done // per_epoch) if done else 0
        inputs: dict[str, Any] = {"version": -1}

        def current_inputs() -> tuple[Any, Any]:
            """The round inputs of the model as it is now (made once per version)."""
            if inputs["version"] != params.version:
                inputs["weights"], inputs["slots"] = round_inputs(params)
                inputs["version"] = params.version
            return inputs["weights"], inputs["slots"]

        evaluations: list[dict[str, Any]] = []
        started = time.time()
        clock = {"train_t0": time.monotonic(), "eval_s": 0.0, "last": time.monotonic()}

        def evaluate(epoch: int, step: int) -> dict[str, float]:
            t_eval = time.monotonic()
            for var, value in zip(model.trainable_variables, params.weights):
                var.assign(value)
            probs = np.concatenate([forward(x_test[i : i + 2500]).numpy() for i in range(0, len(x_test), 2500)])
            test_loss = float(loss_fn(y_test, probs))
            if not finite(test_loss):
                raise Diverged(step, lr)
            metrics: dict[str, Any]
            if regression:
                err = np.asarray(probs, np.float64).reshape(-1) - y_test.astype(np.float64)
                metrics = {"test_mse": float(np.mean(err**2)), "test_mae": float(np.mean(np.abs(err)))}
            else:
                metrics = {"test_accuracy": float(np.mean(np.argmax(probs, axis=-1) == y_test))}
            with writer.as_default(step=step):
                for key, value in metrics.items():
                    scalar(key.replace("_", "/", 1), value)
                scalar("test/loss", test_loss)
            now_eval = time.monotonic()
            clock["eval_s"] += now_eval - t_eval
            clock["last"] = now_eval
            # train_seconds: since the training loop began (evaluations included), for time-to-accuracy
            self.events.emit("eval", epoch=epoch, step=step, test_loss=test_loss, **metrics,
                             train_seconds=round(now_eval - clock["train_t0"], 3),
                             eval_seconds=round(clock["eval_s"], 3))
            evaluations.append({"epoch": epoch, "step": step, "test_loss": test_loss, **metrics,
                                "time": round(time.time(), 3)})
            return {"test_loss": test_loss, **metrics}

        def drop_in_flight(rv: Any) -> None:
            nonlocal scheduled
            for k, (r, n, _v) in enumerate(in_flight):
                if rv is not None and r is rv:
                    del in_flight[k]
                    scheduled -= n
                    elastic.forget(r)
                    break

        def apply(new: Members) -> None:
            """Slots that left: no more functions, their running one given up (its steps go
            back); slots that joined (or came back, or have a fresh server): attached. An
            expelled slot comes back only with a newcomer behind it (``fresh``)."""
            nonlocal members
            assert elastic is not None
            members = new
            for index in sorted(failed - new.live):
                failed.discard(index)  # it left after failing: a later re-add is a real one
            for index in sorted(set(expelled) & (new.fresh | (set(range(w)) - new.live))):
                expelled.pop(index)  # a newcomer, or the slot was freed: a clean record
                desk.trust.forgive(index)
            attached = elastic.attached()
            leave = {i for i in attached if i not in new.live or i in new.fresh} - {0}
            for index in sorted(leave):
                drop_in_flight(elastic.detach(index, f"members file version {new.version}"))
                if index not in new.live:
                    self.events.emit("slot", task=index, state="left", why="not in the members file")
            attached = elastic.attached()
            for index in sorted(new.live - attached):
                if index in expelled:
                    continue
                if index in failed and index not in new.fresh:
                    continue  # it failed and the file has not said it is back
                fresh = index in new.fresh
                try:
                    spent = elastic.attach(index, fresh)
                except Exception as exc:  # noqa: BLE001 - the slot stays out; training goes on
                    log.warning("worker %d could not join: %s", index, exc)
                    self.events.emit("slot", task=index, state="left", why=f"could not join: {type(exc).__name__}")
                    continue
                failed.discard(index)
                why = "a fresh server" if fresh else ("back (same server)" if index in seen else "joined")
                seen.add(index)
                self.events.emit("slot", task=index, state="joined", why=why, update_secs=round(spent, 3))
            announce(f"members file version {new.version}")

        def expel(slot: int, why: str) -> None:
            """Cut ``slot`` from training now; its daemon is told and frees the slot."""
            assert elastic is not None
            expelled[slot] = why
            log.warning("worker %d expelled: %s", slot, why)
            drop_in_flight(elastic.detach(slot, f"expelled: {why}"))
            self.events.emit("expel", task=slot, why=why)
            if not elastic.attached():
                guard.all_workers_gone(f"every worker is gone (the last, worker {slot}, expelled: {why}); "
                                       "training cannot go on")
            announce(f"worker {slot} expelled")

        def dispatch() -> None:
            """A round for every idle trainer, on the model as it is now."""
            nonlocal scheduled
            # scheduled counts steps done or in flight; a failed or rejected round's steps go back
            while scheduled < total and len(in_flight) < max(1, len(elastic.attached())):
                n = min(k_round, total - scheduled)
                weights_in, slots_in = current_inputs()
                try:
                    rv = coordinator.schedule(round_fn, args=(iterator, weights_in, slots_in,
                                                              tf.constant(rate["now"], tf.float32),
                                                              tf.constant(n, tf.int32)))
                except RETRYABLE as exc:  # an earlier function's error; TF cancelled the queue
                    budget.failed(exc)
                    continue
                arrivals.watch(rv)
                in_flight.append((rv, n, params.version))
                scheduled += n

        def judge(slot: int, base_version: int, weight_change: Any, slot_change: Any, steps: int) -> bool:
            """Validate one change of a round of ``steps`` and merge it if it passes
            (:class:`ChangeDesk`); False if it was rejected. The host's own trainer sending a
            non-finite change is divergence."""
            ruling = desk.take(slot, base_version, weight_change, slot_change, full_round=steps >= k_round)
            verdict = ruling.verdict
            if slot == 0 and not verdict.accepted:
                raise Diverged(done, lr)
            if not verdict.accepted:
                log.info("worker %d: change rejected (%s)", slot, verdict.reason)
                self.events.emit("rejected", task=slot, **verdict.to_event())
            if ruling.expel is not None:
                expel(slot, ruling.expel)
            return verdict.accepted

        log.info("training %d steps on %d workers (rounds of %d steps; %d records held back to validate changes)",
                 total, w, k_round, len(y_val))
        announce("start")
        next_poll = time.monotonic() + POLL_SECS
        stopped = False
        clock["train_t0"] = clock["last"] = time.monotonic()
        try:
            while done < total:
                if os.path.exists(STOP_FILE):  # the host asked to stop early: keep what is trained
                    log.info("asked to stop at step %d of %d", done, total)
                    stopped = True
                    break
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_SECS
                    new = watcher.poll()
                    if new is not None:
                        apply(new)
                dispatch()
                k = arrivals.wait([r for r, _n, _v in in_flight], max(0.0, next_poll - time.monotonic()))
                if k < 0:
                    continue
                rv, n, base_version = in_flight.pop(k)
                slot = elastic.ran_on(rv)
                try:
                    weight_change, slot_change, loss_sum, correct, samples, widx = rv.fetch()
                except RETRYABLE as exc:
                    scheduled -= n
                    budget.failed(exc)
                    flush_error(coordinator)
                    continue
                budget.succeeded()
                if slot is None or slot in expelled:
                    scheduled -= n  # nobody we know ran it, or an expelled member: it does not count
                    continue
                if slot == 0 and not finite(loss_sum):
                    raise Diverged(done, lr)
                if not judge(slot, base_version, weight_change, slot_change, n):
                    scheduled -= n  # rejected: its steps are done again by someone else
                    continue
                done += n
                set_rate(done)
                dispatch()  # its trainer idles no longer than the merge: bookkeeping and evaluations come after
                now = time.monotonic()
                ws = stats[slot]
                if finite(loss_sum) and finite(correct) and finite(samples):
                    ws.add(float(loss_sum), float(correct), float(samples))
                del widx  # the worker's own word on which shard it read; the slot is ours
                if now - ws.since >= PROGRESS_EVERY and ws.samples > 0:
                    epoch = min(job.epochs, int(done // per_epoch) + 1)
                    self.events.emit(
                        "progress",
                        epoch=epoch,
                        epochs=job.epochs,
                        step=done,
                        total_steps=total,
                        loss=ws.loss / ws.samples,
                        **({"mae": ws.correct / ws.samples} if regression else {"accuracy": ws.correct / ws.samples}),
                        samples_per_sec=ws.samples / max(now - ws.since, 1e-9),
                        worker=slot,
                        learning_rate=rate["now"],
                    )
                    with writer.as_default(step=done):
                        scalar("train/learning_rate", rate["now"])
                        scalar(f"train/loss_worker{slot}", ws.loss / ws.samples)
                        scalar(f"train/{'mae' if regression else 'accuracy'}_worker{slot}", ws.correct / ws.samples)
                    ws.reset(now)
                while evals_done < job.epochs - 1 and done >= (evals_done + 1) * per_epoch:
                    evals_done += 1
                    last_eval = evaluate(evals_done, done)
                if job.eval_every_secs and now - clock["last"] >= job.eval_every_secs and done < total:
                    last_eval = evaluate(min(job.epochs, int(done // per_epoch) + 1), done)
                if now - last_ckpt >= self.spec.settings.checkpoint_secs and done < total:
                    path = store.save(done, finite_arrays(done))
                    self.events.emit("checkpoint", path=str(path), step=done)
                    last_ckpt = time.monotonic()
        except Diverged:
            # every change merged so far passed validation: the model is still finite; keep it
            # (the host resumes from it with a lower learning rate)
            arrays = params.arrays()
            if all_finite(arrays):
                path = store.save(done, arrays)
                self.events.emit("checkpoint", path=str(path), step=done)
            raise
        last_eval = evaluate(min(job.epochs, int(done // per_epoch) + 1) if stopped else job.epochs, done)
        path = store.save(done, finite_arrays(done))
        self.events.emit("checkpoint", path=str(path), step=done)
        model_path = self.out / "model.keras"
        model.save(model_path)
        validation = desk.summary(int(len(y_val)))
        card_path = self.out / CARD_NAME
        write_card(card_path, build_card(
            model_path=model_path, layout=layout, dataset=self.dataset_info(), job=job.to_dict(),
            settings=asdict(self.spec.settings), workers=w, evaluations=evaluations, started=started, steps=done,
            total_steps=total, stopped=stopped, checkpoint=str(path),
        ))
        writer.flush()
        self.events.emit(
            "done",
            **last_eval,
            model_path=str(model_path),
            card_path=str(card_path),
            usage=usage(model_path, layout),
            tensorboard_dir=str(tb_dir),
            steps=done,
            total_steps=total,
            stopped=stopped,
            checkpoint=str(path),
            seconds=round(time.monotonic() - t0, 3),
            validation=validation,
        )
        return EXIT_OK


__all__ = ["TRAINER_NICE_STEP", "CheckpointStore", "Children", "Coordinator", "run_host", "server_nice"]
