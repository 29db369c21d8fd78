"""Elastic membership under TF's ClusterCoordinator: worker slots that leave and come back.

TF's ``ClusterCoordinator`` has a fixed list of workers and ``ParameterServerStrategy``
connects to every task of its cluster before anything runs. crowdd keeps one strategy for the
whole run and changes who is in it:

* There is no parameter server: the coordinator holds the parameters
  (:mod:`crowdd.job.train`), so TF traffic flows one way, from the coordinator to each worker.
  The eager context's cluster (its ``ServerDef``) holds the coordinator and only the
  worker slots that are *attached*: a sparse worker job whose task index is the slot index
  (``/job:worker/replica:0/task:3`` is slot 3 whatever else is missing). A slot absent at the
  start is simply not in it, so nothing waits for it.
* The coordinator has one :class:`SlotWorker` per slot of the spec (position = slot index).
  A detached slot's thread takes no functions; attaching it again reschedules its per-worker
  resources (the dataset and iterator are rebuilt on its server: TF's own
  ``_on_worker_recovery``) and lets its thread run again.
* A slot that is attached but missing from the ``ServerDef`` (absent at the start, dropped
  while it was away, or a fresh server behind it) is added with ``update_server_def``
  (which creates the remote context on the new or restarted server; it contacts every task in
  the new ``ServerDef``, which is why a slot that left is dropped from it first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf
from tensorflow.core.protobuf import tensorflow_server_pb2
from tensorflow.python.distribute.coordinator import cluster_coordinator as cc
from tensorflow.python.eager import context, remote
from tensorflow.python.framework import errors
from tensorflow.python.training import server_lib

from crowdd.job.faults import RetiringFailureHandler

log = logging.getLogger(__name__)

# after a slot is attached, connection failures on it are retried for this long without
# counting against it (gRPC's channel to it may still be backing off from the cut)
ATTACH_GRACE_SECS = 10.0
GRACE_RETRY_SECS = 0.5


class SlotWorker(cc.Worker):
    """A ``Worker`` whose thread takes functions only while its slot is attached."""

    def __init__(self, worker_index: int, device_name: str, cluster: Any) -> None:
        self.attached = threading.Event()
        self.attached_at = 0.0
        self.current: Any = None
        self._abandoned: set[int] = set()
        self._slot_lock = threading.Lock()
        if worker_index in _STARTING_LIVE:
            self.attached.set()
            self.attached_at = time.monotonic()
        super().__init__(worker_index, device_name, cluster)
        if not self.attached.is_set():
            self._is_dead_with_error = errors.UnavailableError(None, None, "the slot has no member")

    def _process_queue(self) -> None:
        queue = self._cluster.closure_queue
        while self._should_worker_thread_run:
            if not self.attached.wait(0.5):
                continue
            closure = queue.get(tag=self.worker_index)
            if not self._should_worker_thread_run or closure is None:
                if closure is not None:
                    closure.mark_cancelled()
                return
            if not self.attached.is_set():  # detached while waiting: hand it to the others
                if not isinstance(closure, cc.ResourceClosure):
                    queue.put_back(closure)
                continue
            if isinstance(closure, cc.ResourceClosure):
                self._process_resource_closure(closure)
            else:
                self.current = closure
                # which slot ran it: the coordinator's own record, not the worker's word
                rv = closure.maybe_call_with_output_remote_value(lambda r: r)
                if rv is not None:
                    _RAN_ON[id(rv)] = self.worker_index
                try:
                    self._process_closure(closure)
                finally:
                    self.current = None
            del closure

    def remote_value(self) -> Any:
        """The RemoteValue of the function running on this slot now (None if none)."""
        closure = self.current
        if closure is None:
            return None
        return closure.maybe_call_with_output_remote_value(lambda r: r)

    def abandon_current(self) -> Any:
        """Give up on the function running here (the coordinator reschedules its steps);
        returns its RemoteValue. When it fails later, it is dropped, not put back."""
        closure = self.current
        if closure is None:
            return None
        with self._slot_lock:
            self._abandoned.add(id(closure))
        return closure.maybe_call_with_output_remote_value(lambda r: r)

    def _on_closure_failure(self, closure: Any, e: BaseException) -> None:
        with self._slot_lock:
            abandoned = id(closure) in self._abandoned
            self._abandoned.discard(id(closure))
        if not abandoned:
            super()._on_closure_failure(closure, e)
            return
        closure.mark_cancelled()
        self._cluster.closure_queue.mark_finished()  # its steps were scheduled again already
        with self._resource_tracking_lock:
            self._is_dead_with_error = e
            self._set_resources_aborted(e)

    def detach(self, e: BaseException) -> None:
        """Take no more functions; the per-worker resources are marked aborted."""
        self.attached.clear()
        with self._resource_tracking_lock:
            self._is_dead_with_error = e
            self._set_resources_aborted(e)

    def attach(self) -> None:
        """Rebuild the per-worker resources on the slot's server and take functions again."""
        self._on_worker_recovery()
        self.attached_at = time.monotonic()
        self.attached.set()


_STARTING_LIVE: frozenset[int] = frozenset()
#: id(RemoteValue) -> the slot whose thread last ran its function
_RAN_ON: dict[int, int] = {}


class ElasticHandler(RetiringFailureHandler):
    """The retiring failure handler, aware of attached slots.

    A failure on a slot the coordinator detached (it left the members file) drops the function
    (see :meth:`SlotWorker._on_closure_failure`); connection failures in the first seconds
    after a slot is attached are retried without strikes.
    """

    def wait_on_failure(  # type: ignore[override]
        self,
        on_failure_fn: Callable[..., Any] | None = None,
        on_transient_failure_fn: Callable[[], Any] | None = None,
        on_recovery_fn: Callable[[], Any] | None = None,
        worker_device_name: str = "(unknown)",
    ) -> contextlib.AbstractContextManager[None]:
        return self._elastic(on_failure_fn, on_transient_failure_fn, on_recovery_fn, worker_device_name)

    @contextlib.contextmanager
    def _elastic(
        self,
        on_failure_fn: Callable[..., Any] | None,
        on_transient_failure_fn: Callable[[], Any] | None,
        on_recovery_fn: Callable[[], Any] | None,
        worker_device_name: str,
    ) -> Iterator[None]:
        from crowdd.job.faults import _task_index, lost_device

        index = _task_index(worker_device_name)
        workers = self._cluster.workers
        worker = workers[index] if 0 <= index < len(workers) else None
        try:
            yield
        except (errors.OpError, cc.ClosureInputError, cc.ClosureAbortedError, TypeError) as exc:
            if isinstance(worker, SlotWorker) and not self._is_cancelled():
                if not worker.attached.is_set():
                    if on_failure_fn is not None:
                        on_failure_fn(exc)  # dropped if abandoned, else back in the queue
                    return
                young = time.monotonic() - worker.attached_at < ATTACH_GRACE_SECS
                if young and (isinstance(exc, (errors.UnavailableError, cc.ClosureInputError, cc.ClosureAbortedError))
                              or lost_device(exc)):
                    log.info("worker %d: not reachable yet after it joined; trying again", index)
                    if isinstance(exc, (cc.ClosureInputError, cc.ClosureAbortedError)):
                        # its dataset was not built: build it again, then run the function
                        worker._on_worker_recovery()
                    time.sleep(GRACE_RETRY_SECS)  # before: for a resource it runs it again at once
                    if on_transient_failure_fn is not None:
                        on_transient_failure_fn()
                    return
            with super().wait_on_failure(on_failure_fn, on_transient_failure_fn, on_recovery_fn, worker_device_name):
                raise exc

    def revive(self, index: int) -> None:
        """The slot is back (the members file lists it again): it may be retired again."""
        with self._lock:
            self.retired.discard(index)
            self._strikes.pop(index, None)


class SparseStrategy(tf.distribute.ParameterServerStrategy):
    """A ParameterServerStrategy without a parameter server, whose worker job may be sparse
    (task index = slot index). Nothing is ever placed in its scope: it is only the
    ClusterCoordinator's way to schedule functions on workers."""

    num_slots = 0

    def _verify_args_and_config(self, cluster_resolver: Any) -> None:
        if not cluster_resolver.cluster_spec().task_indices("worker"):
            raise ValueError("There must be at least one worker.")

    def _connect_to_cluster(self, coordinator_name: str) -> None:
        spec = self._cluster_resolver.cluster_spec()
        self._num_workers = len(spec.task_indices("worker"))
        self._num_ps = 0
        os.environ["TF_ENABLE_EAGER_CLIENT_STREAMING_ENQUEUE"] = "False"
        os.environ["TF_PS_DISABLE_ASYNC_EXECUTOR_GLOBALLY"] = "True"
        # no coordination service: it would have every worker heartbeat to a leader
        os.environ.pop("TF_PSS_ENABLE_COORDINATION_SERVICE", None)
        remote.connect_to_cluster(
            spec, job_name=coordinator_name, protocol=self._cluster_resolver.rpc_layer,
            cluster_device_filters=device_filters(self.num_slots),
        )


def device_filters(num_slots: int) -> Any:
    """Each worker sees only its own devices: no other member's task exists for it."""
    f = server_lib.ClusterDeviceFilters()
    for i in range(num_slots):
        f.set_device_filters("worker", i, [f"/job:worker/replica:0/task:{i}"])
    return f


class ElasticCluster:
    """One strategy and coordinator over every slot of ``workers``; slots attach and detach.

    ``live`` is the set attached at the start (slot 0 always). Call from the coordinator's
    main thread.
    """

    def __init__(
        self,
        workers: list[str],
        live: frozenset[int],
        on_retire: Callable[[int, int, BaseException], None],
        chief: list[str] | None = None,
    ) -> None:
        global _STARTING_LIVE
        self.addresses = list(workers)
        # the coordinator's own address; without one TF picks a free port (a sandboxed job may
        # bind only its listed ports)
        self.chief = list(chief or [])
        self.in_server_def = set(live) | {0}
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(self._spec(self.in_server_def), rpc_layer="grpc")
        SparseStrategy.num_slots = len(workers)
        self.strategy = SparseStrategy(resolver)
        # the coordinator's Cluster makes one Worker per task 0..W-1: every slot, by index
        self.strategy._num_workers = len(workers)
        _STARTING_LIVE = frozenset(self.in_server_def)
        original = cc.Worker
        cc.Worker = SlotWorker  # Cluster() looks the class up here
        try:
            self.coordinator = tf.distribute.coordinator.ClusterCoordinator(self.strategy)
        finally:
            cc.Worker = original
            _STARTING_LIVE = frozenset()
        handler = ElasticHandler.install(self.coordinator, self.addresses, on_retire)
        assert isinstance(handler, ElasticHandler)
        self.handler = handler

    def _spec(self, slots: set[int]) -> Any:
        jobs: dict[str, Any] = {"worker": {i: self.addresses[i] for i in sorted(slots)}}
        if self.chief:
            jobs["chief"] = self.chief
        return tf.train.ClusterSpec(jobs)

    @property
    def workers(self) -> list[SlotWorker]:
        return self.coordinator._cluster.workers  # type: ignore[no-any-return]

    @staticmethod
    def ran_on(remote_value: Any) -> int | None:
        """The slot whose server ran the function behind ``remote_value`` (forgets it)."""
        return _RAN_ON.pop(id(remote_value), None)

    @staticmethod
    def forget(remote_value: Any) -> None:
        _RAN_ON.pop(id(remote_value), None)

    def attached(self) -> set[int]:
        return {w.worker_index for w in self.workers if w.attached.is_set()}

    def detach(self, index: int, why: str) -> Any:
        """Stop scheduling on ``index``; returns the RemoteValue it was running (abandoned)."""
        worker = self.workers[index]
        worker.detach(errors.UnavailableError(None, None, f"worker {index} left: {why}"))
        return worker.abandon_current()

    def attach(self, index: int, fresh: bool) -> float:
        """Bring ``index`` (back) in; returns the seconds the ServerDef update took (0 if none)."""
        # Always a ServerDef update, even for the same server: it creates the context on a new
        # or restarted server, drops the slots that left, and opens new gRPC channels (the old
        # channel to a slot that was cut keeps failing fast while it backs off).
        del fresh  # a fresh server and the same one take the same path
        t = time.monotonic()
        self._update(self.attached() | {0, index})
        spent = time.monotonic() - t
        self.handler.revive(index)
        self.workers[index].attach()
        return spent

    def _update(self, slots: set[int]) -> None:
        current = context.get_server_def()
        new = tensorflow_server_pb2.ServerDef()
        new.CopyFrom(current)
        for job in new.cluster.job:
            if job.name == "worker":
                job.tasks.clear()
                for i in sorted(slots):
                    job.tasks[i] = self.addresses[i]
        context.context().update_server_def(new)
        self.in_server_def = set(slots)


__all__ = ["ElasticCluster", "ElasticHandler", "SlotWorker", "SparseStrategy", "device_filters"]
