"""The host job: parameter server + worker 0 (child processes) and the coordinator loop."""

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
from crowdd.job.card import CARD_NAME, build_card, usage, write_card
from crowdd.job.events import EventWriter
from crowdd.job.health import Diverged, all_finite, finite
from crowdd.job.membership import POLL_SECS, Members, MembersWatcher
from crowdd.job.server import cap_threads, reachable, spawn
from crowdd.job.spec import INDEX_FILE, JobSpec
from crowdd.manifest import Layout, Manifest, ManifestError
from crowdd.platform.process import lower_priority, watch_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
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
    """The niceness of a host-side server: the parameter server at the job's ``nice``, the
    host's own trainer ``TRAINER_NICE_STEP`` nicer (at most 19).

    The parameter server, the coordinator (this process) and the daemon's tunnels serve every
    worker: a pull or a push that waits behind the host's own training steps stalls a remote
    worker, and the host's trainer is one of N. Measured on 0.4-CPU emulated machines
    (``benchmarks/scaling.py``). At nice 19 every job process already runs SCHED_IDLE and
    there is nothing lower; the daemon (nice 0) still comes first.
    """
    return min(19, nice + TRAINER_NICE_STEP) if job_name == "worker" else nice


def start_servers(spec: JobSpec, names: list[tuple[str, str, int]], children: Children) -> None:
    cluster = {"ps": list(spec.cluster.ps), "worker": list(spec.cluster.worker)}
    for label, job_name, task in names:
        children.add(label, spawn(cluster, job_name, task, threads=spec.settings.threads,
                                  nice=server_nice(job_name, spec.settings.nice)))
    for label, _, _ in names:
        wait_ready(children.procs[label], label)


class Fatal:
    """Reports the job's one fatal error (the PS watchdog and the main loop may both see it)."""

    def __init__(self, events: EventWriter) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._said = False

    def report(self, message: str) -> None:
        with self._lock:
            if not self._said:
                self._said = True
                self._events.error(message)


def ps_death(children: Children, wait: float = 0.0) -> str | None:
    """The message for a dead parameter server, or None while it lives."""
    ps = children.procs.get("ps")
    if ps is None:
        return None
    try:
        code = ps.wait(timeout=wait) if wait else ps.poll()
    except subprocess.TimeoutExpired:
        return None
    if code is None:
        return None
    return f"the parameter server died (exit code {code}); training cannot go on"


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


def watch_ps(children: Children, fatal: Fatal, stop: threading.Event) -> None:
    """A dead parameter server ends the job with an error: TF may otherwise retry for long."""

    def loop() -> None:
        while not stop.wait(0.2):
            message = ps_death(children)
            if message is not None and not stop.is_set():
                abort(fatal, children, message)

    threading.Thread(target=loop, name="ps-watch", daemon=True).start()


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
            start_servers(spec, [("ps", "ps", 0), ("worker0", "worker", 0)], children)
        except RuntimeError as exc:
            events.error(str(exc))
            return EXIT_FAILED
        events.emit(
            "started",
            role="host",
            index=0,
            ports=spec.own_ports(),
            pid=os.getpid(),
            children={k: p.pid for k, p in children.procs.items()},
        )
        watch_ps(children, fatal, stop)
        connected = threading.Event()
        watch_start(spec, children, fatal, connected, stop, reachable,
                    starting_members(spec.cluster.num_workers).live)
        lower_priority(spec.settings.nice)
        cap_threads(spec.settings.threads)

        def workers_gone(message: str) -> None:
            abort(fatal, children, message)

        guard = Guard(ps_dead=lambda: ps_death(children), connected=connected, all_workers_gone=workers_gone)
        return Coordinator(spec, layout, events, out, guard).run()
    except Exception as exc:  # the job's last word: an error event, never a traceback only
        dead = ps_death(children, wait=2.0)
        if dead is not None:
            log.error("%s (%s: %s)", dead, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            fatal.report(dead)
        else:
            log.exception("host job failed")
            fatal.report(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        stop.set()
        children.kill()


@dataclass
class Guard:
    """What the coordinator needs to tell a worker fault from a fatal one.

    ``ps_dead()``: a message while the parameter server is dead, else None.
    ``connected``: set once every worker server answered (disarms the start timeout).
    ``all_workers_gone(message)``: ends the job (it does not return).
    """

    ps_dead: Callable[[], str | None] = lambda: None
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

    def total_steps(self) -> int:
        from crowdd.job.shards import total_steps

        job = self.job
        return total_steps(job.sharding, self.num_workers, self.layout.train_count, job.batch_size, job.epochs)

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

        from crowdd.job.data import read_split, target_stats, train_moments, worker_dataset
        from crowdd.job.elastic import ElasticCluster
        from crowdd.job.faults import RETRYABLE, RetryBudget, flush_error
        from crowdd.job.models import build_model, loss_function
        from crowdd.job.outer import effective_merge, lr_factor, push_scale
        from crowdd.job.train import TrainState, make_train_fn

        threads = self.spec.settings.threads
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        t0 = time.monotonic()
        guard = self.guard
        watcher = MembersWatcher(Path(MEMBERS_FILE), self.num_workers)
        members = watcher.poll() or Members.everyone(self.num_workers)
        failed: set[int] = set()  # slots retired by failure; only the file brings them back
        seen: set[int] = set(members.live)  # slots that have trained in this run
        elastic: ElasticCluster | None = None

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
        elastic = ElasticCluster(list(self.spec.cluster.ps), list(self.spec.cluster.worker), members.live,
                                 lambda: guard.ps_dead() is None, on_retire, list(self.spec.cluster.chief))
        strategy, coordinator = elastic.strategy, elastic.coordinator
        budget = RetryBudget(guard.ps_dead)
        regression = self.layout.task == "regression"
        target = target_stats(Path(self.spec.data), self.layout) if regression else (0.0, 1.0)
        loss_fn = loss_function(self.job, self.layout, target[1])
        center, variance = train_moments(Path(self.spec.data), self.layout)
        # images (uint8) share one scale; measurements (float) are standardized feature by feature
        spread = variance if self.layout.feature_dtype == "float32" else None
        with strategy.scope():
            model = build_model(self.job, self.layout, center, target, spread)
            merge = effective_merge(self.spec.settings.merge, self.num_workers)
            state = TrainState(model, self.job, merge)
        scale = push_scale(merge, self.num_workers)
        train_fn = make_train_fn(state, loss_fn, self.spec.settings.sync_every, scale, regression)
        self.guard.connected.set()  # the variables live on the PS: every live server answered
        local = build_model(self.job, self.layout, center, target, spread)
        # a compiled forward pass: Keras' predict() costs several times more per evaluation
        forward = tf.function(lambda x: local(x, training=False), reduce_retracing=True)
        variables = state.variables()

        store = self.store
        lr = self.job.learning_rate

        def finite_variables(step: int) -> list:
            arrays = [v.numpy() for v in variables]
            if not all_finite(arrays):
                raise Diverged(step, lr)
            return arrays
        done = 0
        latest = store.latest()
        if latest is not None:
            done, arrays = store.load(latest, len(variables))
            for var, arr in zip(variables, arrays):
                var.assign(arr)
            self.events.emit("resumed", path=str(latest), step=done)

        data_path = self.spec.data
        layout, job, w = self.layout, self.job, self.num_workers

        def dataset_fn():
            return worker_dataset(data_path, layout, job.sharding, w, job.batch_size)

        per_worker = coordinator.create_per_worker_dataset(dataset_fn)
        iterator = iter(per_worker)
        x_test, y_test = read_split(Path(self.spec.data), self.layout, "test")
        tb_dir = self.out / "tensorboard"
        writer = tf.summary.create_file_writer(str(tb_dir))

        total = self.total_steps()
        per_epoch = total / job.epochs
        # the trainers' step: the user's learning rate times the merge rule's factor, which
        # may change as the run goes (crowdd.job.outer.lr_factor); set on the PS, read per round
        rate = {"now": float(job.learning_rate)}

        def set_rate(step: int) -> None:
            value = job.learning_rate * lr_factor(merge, w, step / max(1, total))
            if abs(value - rate["now"]) > 0.005 * rate["now"]:
                state.learning_rate.assign(value)
                rate["now"] = value

        set_rate(done)
        spf = self.spec.settings.steps_per_function
        next_epoch = min(job.epochs, int(done // per_epoch) + 1)
        stats: dict[int, WorkerStats] = collections.defaultdict(WorkerStats)
        last_ckpt = time.monotonic()
        scheduled = done
        in_flight: list[tuple[Any, int]] = []
        last_eval: dict[str, Any] = {}
        evals_done = int(done // per_epoch) if done else 0

        evaluations: list[dict[str, Any]] = []
        started = time.time()
        clock = {"train_t0": time.monotonic(), "eval_s": 0.0, "last": time.monotonic()}

        def evaluate(epoch: int, step: int) -> dict[str, float]:
            t_eval = time.monotonic()
            # trainable weights only: non-trainable ones (a Normalization's statistics) never change
            for var, value in zip(local.trainable_variables, state.weights):
                var.assign(value.numpy())
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

        def apply(new: Members) -> None:
            """Slots that left: no more functions, their running one given up (its steps go
            back); slots that joined (or came back, or have a fresh server): attached."""
            nonlocal members, scheduled
            assert elastic is not None
            members = new
            for index in sorted(failed - new.live):
                failed.discard(index)  # it left after failing: a later re-add is a real one
            attached = elastic.attached()
            leave = {i for i in attached if i not in new.live or i in new.fresh} - {0}
            for index in sorted(leave):
                rv = elastic.detach(index, f"members file version {new.version}")
                for k, (r, n) in enumerate(in_flight):
                    if rv is not None and r is rv:
                        del in_flight[k]
                        scheduled -= n
                        break
                if index not in new.live:
                    self.events.emit("slot", task=index, state="left", why="not in the members file")
            attached = elastic.attached()
            for index in sorted(new.live - attached):
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

        def wait_any(timeout: float) -> int:
            """The position of a finished function in ``in_flight`` (-1 after ``timeout``)."""
            deadline = time.monotonic() + timeout
            while True:
                for k, (r, _n) in enumerate(in_flight):
                    if r._status_available_event.is_set():
                        return k
                left = deadline - time.monotonic()
                if left <= 0 or not in_flight:
                    return -1
                in_flight[0][0]._status_available_event.wait(min(left, 0.02))

        log.info("training %d steps on %d workers", total, w)
        announce("start")
        next_poll = time.monotonic() + POLL_SECS
        stopped = False
        clock["train_t0"] = clock["last"] = time.monotonic()
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
            # scheduled counts steps done or in flight; a failed function's steps go back
            while scheduled < total and len(in_flight) < 2 * max(1, len(elastic.attached())):
                n = min(spf, total - scheduled)
                try:
                    in_flight.append((coordinator.schedule(train_fn, args=(iterator, n)), n))
                except RETRYABLE as exc:  # an earlier function's error; TF cancelled the queue
                    budget.failed(exc)
                    continue
                scheduled += n
            k = wait_any(max(0.0, next_poll - time.monotonic()))
            if k < 0:
                continue
            rv, n = in_flight.pop(k)
            try:
                loss_sum, correct, samples, widx = rv.fetch()
            except RETRYABLE as exc:
                scheduled -= n
                budget.failed(exc)
                flush_error(coordinator)
                continue
            budget.succeeded()
            done += n
            set_rate(done)
            if not finite(loss_sum):
                raise Diverged(done, lr)
            now = time.monotonic()
            ws = stats[int(widx)]
            ws.add(float(loss_sum), float(correct), float(samples))
            if now - ws.since >= PROGRESS_EVERY and ws.samples:
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
                    worker=int(widx),
                    learning_rate=rate["now"],
                )
                with writer.as_default(step=done):
                    scalar("train/learning_rate", rate["now"])
                    scalar(f"train/loss_worker{int(widx)}", ws.loss / ws.samples)
                    scalar(f"train/{'mae' if regression else 'accuracy'}_worker{int(widx)}", ws.correct / ws.samples)
                ws.reset(now)
            while evals_done < job.epochs - 1 and done >= (evals_done + 1) * per_epoch:
                evals_done += 1
                last_eval = evaluate(evals_done, done)
            if job.eval_every_secs and now - clock["last"] >= job.eval_every_secs and done < total:
                last_eval = evaluate(min(job.epochs, int(done // per_epoch) + 1), done)
            if now - last_ckpt >= self.spec.settings.checkpoint_secs and done < total:
                path = store.save(done, finite_variables(done))
                self.events.emit("checkpoint", path=str(path), step=done)
                last_ckpt = time.monotonic()
        del next_epoch
        last_eval = evaluate(min(job.epochs, int(done // per_epoch) + 1) if stopped else job.epochs, done)
        path = store.save(done, finite_variables(done))
        self.events.emit("checkpoint", path=str(path), step=done)
        model_path = self.out / "model.keras"
        local.save(model_path)
        card_path = self.out / CARD_NAME
        write_card(card_path, build_card(
            model_path=model_path, layout=self.layout, dataset=self.dataset_info(), job=job.to_dict(),
            settings=asdict(self.spec.settings), workers=w, evaluations=evaluations, started=started, steps=done,
            total_steps=total, stopped=stopped, checkpoint=str(path),
        ))
        writer.flush()
        self.events.emit(
            "done",
            **last_eval,
            model_path=str(model_path),
            card_path=str(card_path),
            usage=usage(model_path, self.layout),
            tensorboard_dir=str(tb_dir),
            steps=done,
            total_steps=total,
            stopped=stopped,
            checkpoint=str(path),
            seconds=round(time.monotonic() - t0, 3),
        )
        return EXIT_OK


__all__ = ["TRAINER_NICE_STEP", "CheckpointStore", "Children", "Coordinator", "run_host", "server_nice"]
