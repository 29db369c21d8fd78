"""One training run of the host's coordinator, from the model's first weights to the saved model.

The parts, each in its own module:

- the model's only copy, as arrays (:class:`~crowdd.job.params.Params`), and the desk that
  validates every change before any of it is merged (:class:`~crowdd.job.judge.ChangeDesk`);
- which slots train (:class:`~crowdd.job.trainers.Trainers`, from the members file);
- the rounds handed out and their books (:class:`~crowdd.job.rounds.Rounds`);
- evaluations (:class:`~crowdd.job.evaluation.Evaluation`) and checkpoints
  (:class:`CheckpointStore`).

:class:`Training` builds them (:meth:`Training.__init__`), runs the loop (:meth:`Training.run`:
hand out rounds, take each change back, judge it, report) and ends it (:meth:`Training.finish`:
the model, its card and the ``done`` event).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf

from crowdd.job import EXIT_FAILED, EXIT_OK, MEMBERS_FILE, STOP_FILE
from crowdd.job.byzantine import BadWorkers
from crowdd.job.checkpoints import CheckpointStore
from crowdd.job.card import CARD_NAME, build_card, usage, write_card
from crowdd.job.data import holdout_count, holdout_every, read_holdout, read_split, target_stats, train_moments, worker_dataset
from crowdd.job.elastic import ElasticCluster
from crowdd.job.evaluation import Evaluation, scalar
from crowdd.job.events import EventWriter
from crowdd.job.faults import RETRYABLE, RetryBudget, flush_error
from crowdd.job.health import Diverged, all_finite, finite
from crowdd.job.judge import ChangeDesk
from crowdd.job.membership import POLL_SECS, Members, MembersWatcher
from crowdd.job.models import build_model, loss_function
from crowdd.job.outer import effective_merge, lr_factor, push_scale
from crowdd.job.params import Params
from crowdd.job.rounds import Round, Rounds
from crowdd.job.trainers import Trainers
from crowdd.job.shards import total_steps
from crowdd.job.spec import JobSpec
from crowdd.job.train import make_round_fn
from crowdd.job.validate import Validator
from crowdd.data.manifest import Layout, Manifest, ManifestError

log = logging.getLogger(__name__)

#: every change's verdict, one JSON object a line, in the host job's output directory
VALIDATION_LOG = "validation.jsonl"
PROGRESS_EVERY = 0.5


@dataclass
class WorkerStats:
    """One trainer's figures since its last ``progress`` event."""

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


class Training:
    """The coordinator of one run: it builds the run's parts, trains to the end, saves.

    ``connected`` is set once the strategy reached every live server (it disarms the job's
    start timeout); ``all_gone(message)`` ends the job when no worker is left (it does not
    return)."""

    def __init__(self, spec: JobSpec, layout: Layout, events: EventWriter, out: Path, *,
                 connected: threading.Event, all_gone: Callable[[str], None]) -> None:
        self.spec, self.layout, self.events, self.out = spec, layout, events, out
        self.job = job = spec.job
        self.w = w = spec.cluster.num_workers
        self.store = CheckpointStore(out / "checkpoints")
        self.closing: list[Callable[[], None]] = []
        self.t0 = time.monotonic()
        self.started = time.time()
        threads = spec.settings.threads
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        self.watcher = MembersWatcher(Path(MEMBERS_FILE), w)
        self.bad = BadWorkers.from_env()
        if self.bad.modes:
            log.warning("TEST HOOK: bad workers in slots %s", dict(self.bad.modes))
        members = self.watcher.poll() or Members.everyone(w)
        self.trainers = Trainers(members, w, events, all_gone)
        # the strategy's cluster holds only the live slots: one that is absent is not waited for
        self.elastic = ElasticCluster(list(spec.cluster.worker), members.live, self.trainers.on_retire,
                                      list(spec.cluster.chief))
        self.trainers.slots = self.elastic
        self.budget = RetryBudget()
        self.regression = layout.task == "regression"
        self.every = holdout_every(layout.train_count)
        data = Path(spec.data)
        target = target_stats(data, layout) if self.regression else (0.0, 1.0)
        self.loss_fn = loss_function(job, layout, target[1])
        center, variance = train_moments(data, layout)
        # images (uint8) share one scale; measurements (float) are standardized feature by feature
        spread = variance if layout.feature_dtype == "float32" else None
        # the model lives here, in the coordinator's memory, and nowhere else
        self.model = build_model(job, layout, center, target, spread)
        self.merge = effective_merge(spec.settings.merge, w)
        self.params = Params([v.numpy() for v in self.model.trainable_variables], job, self.merge)
        self.round_fn = make_round_fn(self.model, job, self.loss_fn, self.regression, self.bad.flipped,
                                      layout.num_classes)
        connected.set()  # the strategy reached every live server
        self.desk = self._desk()
        self.done = 0
        latest = self.store.latest()
        if latest is not None:
            self.done, arrays = self.store.load(latest, len(self.params.arrays()))
            self.params.load(arrays)
            events.emit("resumed", path=str(latest), step=self.done)
        self.total = total_steps(job.sharding, w, layout.train_count - holdout_count(layout.train_count, self.every),
                                 job.batch_size, job.epochs)
        self.per_epoch = self.total / job.epochs
        self.k_round = min(spec.settings.sync_every, spec.settings.steps_per_function)
        self.rounds = Rounds(self.elastic.coordinator.schedule, self.elastic.forget, self.round_fn,
                             self._iterator(), self.params, self.total, self.k_round, self.budget,
                             self._rate_at, self.done)
        self.trainers.given_back, self.trainers.forgive = self.rounds.drop, self.desk.trust.forgive
        self.tb_dir = out / "tensorboard"
        self.writer = tf.summary.create_file_writer(str(self.tb_dir))
        self.evaluate = Evaluation(self.model, self.params, self.loss_fn, read_split(data, layout, "test"),
                                   self.regression, self.writer, events, job.learning_rate)
        self.stats: dict[int, WorkerStats] = collections.defaultdict(WorkerStats)
        self.evals_done = int(self.done // self.per_epoch) if self.done else 0
        self.last_ckpt = time.monotonic()
        self.stopped = False

    def _desk(self) -> ChangeDesk:
        """The validator, on the held-back records: every change is judged on them before it counts."""
        model, loss_fn = self.model, self.loss_fn
        x_val, y_val = read_holdout(Path(self.spec.data), self.layout, self.every) if self.every else read_split(
            Path(self.spec.data), self.layout, "test")
        self.held_back = len(y_val)
        val_x, val_y = tf.constant(x_val), tf.constant(y_val)
        fixed = [tf.constant(v.numpy()) for v in model.non_trainable_variables]

        @tf.function(reduce_retracing=True)
        def val_loss(weights):
            probs, _ = model.stateless_call(list(weights), fixed, val_x, training=False)
            return loss_fn(val_y, probs)

        @tf.function(reduce_retracing=True)
        def val_grad(weights):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                probs, _ = model.stateless_call(list(weights), fixed, val_x, training=False)
                loss = loss_fn(val_y, probs)
            return tape.gradient(loss, weights)

        def loss_of(weights: list) -> float:
            return float(val_loss([tf.constant(a) for a in weights]))

        def grad_of(weights: list) -> list:
            return [g.numpy() for g in val_grad([tf.constant(a) for a in weights])]

        weight_shapes, slot_shapes = self.params.shapes()
        validator = Validator(weight_shapes, slot_shapes, loss_of, max_lag=4 * max(1, self.w) + 4, grad_of=grad_of,
                              directional=self.job.sharding == "full")
        # every verdict, for the host to audit (the daemon never reads it)
        audit = open(self.out / VALIDATION_LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed by run()
        self.closing.append(audit.close)
        return ChangeDesk(self.params, validator, push_scale(self.merge, self.w), bad=self.bad, audit=audit)

    def _iterator(self) -> Any:
        data_path, layout, job, w, every = self.spec.data, self.layout, self.job, self.w, self.every

        def dataset_fn():
            return worker_dataset(data_path, layout, job.sharding, w, job.batch_size, every)

        return iter(self.elastic.coordinator.create_per_worker_dataset(dataset_fn))

    def _rate_at(self, step: int) -> float:
        """The trainers' step: the user's learning rate times the merge rule's factor, which
        may change as the run goes (:func:`crowdd.job.outer.lr_factor`); handed out with each round."""
        return self.job.learning_rate * lr_factor(self.merge, self.w, step / max(1, self.total))

    def run(self) -> int:
        """Train to the end; a diverged loss ends the run with the advice and the last finite
        checkpoint kept (every checkpoint saved was checked finite first)."""
        try:
            self._loop()
            return self.finish()
        except Diverged as exc:
            latest = self.store.latest()
            log.error("%s (last finite checkpoint: %s)", exc, latest)
            self.events.emit("error", message=str(exc), field="job.learning_rate", step=exc.step,
                             checkpoint=str(latest) if latest is not None else None)
            return EXIT_FAILED
        finally:
            for close in self.closing:
                close()

    def _loop(self) -> None:
        log.info("training %d steps on %d workers (rounds of %d steps; %d records held back to validate changes)",
                 self.total, self.w, self.k_round, self.held_back)
        self.trainers.announce("start")
        next_poll = time.monotonic() + POLL_SECS
        self.evaluate.start_clock()
        try:
            while self.done < self.total:
                if os.path.exists(STOP_FILE):  # the host asked to stop early: keep what is trained
                    log.info("asked to stop at step %d of %d", self.done, self.total)
                    self.stopped = True
                    break
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_SECS
                    new = self.watcher.poll()
                    if new is not None:
                        self.trainers.apply(new)
                self._dispatch()
                back = self.rounds.wait(max(0.0, next_poll - time.monotonic()))
                if back is not None:
                    self._take(back)
        except Diverged:
            # every change merged so far passed validation: the model is still finite; keep it
            # (the host resumes from it with a lower learning rate)
            arrays = self.params.arrays()
            if all_finite(arrays):
                self._checkpoint(arrays)
            raise

    def _dispatch(self) -> None:
        self.rounds.dispatch(len(self.elastic.attached()))

    def _take(self, back: Round) -> None:
        """A round is back: its change judged, merged if it passes, and the run's books."""
        slot = self.elastic.ran_on(back.value)
        try:
            weight_change, slot_change, loss_sum, correct, samples, widx = back.value.fetch()
        except RETRYABLE as exc:
            self.rounds.give_back(back.steps)
            self.budget.failed(exc)
            flush_error(self.elastic.coordinator)
            return
        self.budget.succeeded()
        del widx  # the worker's own word on which shard it read; the slot is ours
        if slot is None or slot in self.trainers.expelled:
            self.rounds.give_back(back.steps)  # nobody we know ran it, or an expelled member: it does not count
            return
        if slot == 0 and not finite(loss_sum):
            raise Diverged(self.done, self.job.learning_rate)
        if not self._judge(slot, back, weight_change, slot_change):
            self.rounds.give_back(back.steps)  # rejected: its steps are done again by someone else
            return
        self.done += back.steps
        self.rounds.set_rate(self.done)
        self._dispatch()  # its trainer idles no longer than the merge: bookkeeping and evaluations come after
        self._progress(slot, loss_sum, correct, samples)
        self._periodic()

    def _judge(self, slot: int, back: Round, weight_change: Any, slot_change: Any) -> bool:
        """Validate one change and merge it if it passes (:class:`ChangeDesk`); False if it was
        rejected. The host's own trainer sending a non-finite change is divergence. A round the
        host made shorter (the run's last steps) is not judged by its direction."""
        ruling = self.desk.take(slot, back.base_version, weight_change, slot_change,
                                full_round=back.steps >= self.k_round)
        verdict = ruling.verdict
        if slot == 0 and not verdict.accepted:
            raise Diverged(self.done, self.job.learning_rate)
        if not verdict.accepted:
            log.info("worker %d: change rejected (%s)", slot, verdict.reason)
            self.events.emit("rejected", task=slot, **verdict.to_event())
        if ruling.expel is not None:
            self.trainers.expel(slot, ruling.expel)
        return verdict.accepted

    def _progress(self, slot: int, loss_sum: Any, correct: Any, samples: Any) -> None:
        """The trainer's figures, in a ``progress`` event every :data:`PROGRESS_EVERY` s."""
        now = time.monotonic()
        ws = self.stats[slot]
        if finite(loss_sum) and finite(correct) and finite(samples):
            ws.add(float(loss_sum), float(correct), float(samples))
        if now - ws.since < PROGRESS_EVERY or ws.samples <= 0:
            return
        job, done, rate = self.job, self.done, self.rounds.rate
        metric = "mae" if self.regression else "accuracy"
        self.events.emit(
            "progress", epoch=min(job.epochs, int(done // self.per_epoch) + 1), epochs=job.epochs, step=done,
            total_steps=self.total, loss=ws.loss / ws.samples, **{metric: ws.correct / ws.samples},
            samples_per_sec=ws.samples / max(now - ws.since, 1e-9), worker=slot, learning_rate=rate,
        )
        with self.writer.as_default(step=done):
            scalar("train/learning_rate", rate)
            scalar(f"train/loss_worker{slot}", ws.loss / ws.samples)
            scalar(f"train/{metric}_worker{slot}", ws.correct / ws.samples)
        ws.reset(now)

    def _periodic(self) -> None:
        """An evaluation at each epoch's end (and every ``eval_every_secs``), a checkpoint every
        ``checkpoint_secs``; the run's end has its own."""
        job, done, now = self.job, self.done, time.monotonic()
        while self.evals_done < job.epochs - 1 and done >= (self.evals_done + 1) * self.per_epoch:
            self.evals_done += 1
            self.evaluate(self.evals_done, done)
        if job.eval_every_secs and now - self.evaluate.last >= job.eval_every_secs and done < self.total:
            self.evaluate(min(job.epochs, int(done // self.per_epoch) + 1), done)
        if now - self.last_ckpt >= self.spec.settings.checkpoint_secs and done < self.total:
            self._checkpoint(self._finite_arrays())
            self.last_ckpt = time.monotonic()

    def _finite_arrays(self) -> list:
        arrays = self.params.arrays()
        if not all_finite(arrays):
            raise Diverged(self.done, self.job.learning_rate)
        return arrays

    def _checkpoint(self, arrays: list) -> Path:
        path = self.store.save(self.done, arrays)
        self.events.emit("checkpoint", path=str(path), step=self.done)
        return path

    def dataset_info(self) -> dict[str, Any]:
        """The dataset's name and digests, from its manifest (for the model card)."""
        try:
            m = Manifest.from_json(Path(self.spec.manifest).read_bytes())
        except (OSError, ManifestError):
            return {}
        return {"name": m.name, "digest": m.digest(), "sha256": m.sha256, "size": m.size}

    def finish(self) -> int:
        """The last evaluation and checkpoint, the model and its card, and the ``done`` event."""
        job, done = self.job, self.done
        epoch = min(job.epochs, int(done // self.per_epoch) + 1) if self.stopped else job.epochs
        last_eval = self.evaluate(epoch, done)
        path = self._checkpoint(self._finite_arrays())
        model_path = self.out / "model.keras"
        self.model.save(model_path)
        card_path = self.out / CARD_NAME
        write_card(card_path, build_card(
            model_path=model_path, layout=self.layout, dataset=self.dataset_info(), job=job.to_dict(),
            settings=asdict(self.spec.settings), workers=self.w, evaluations=self.evaluate.done, started=self.started,
            steps=done, total_steps=self.total, stopped=self.stopped, checkpoint=str(path),
        ))
        self.writer.flush()
        self.events.emit(
            "done", **last_eval, model_path=str(model_path), card_path=str(card_path),
            usage=usage(model_path, self.layout), tensorboard_dir=str(self.tb_dir), steps=done,
            total_steps=self.total, stopped=self.stopped, checkpoint=str(path),
            seconds=round(time.monotonic() - self.t0, 3), validation=self.desk.summary(self.held_back),
        )
        return EXIT_OK
