"""Worker faults under TF's ClusterCoordinator: retire a dead worker, retry its work.

Two ways a worker's death used to fail the whole run (TF 2.21):

* TF's own handler (``WorkerPreemptionHandler``) expects a dead worker to come back: it calls
  ``update_server_def``, which waits until *every* worker answers again; when another worker
  dies meanwhile, that call can fail with an error TF files as a parameter-server failure, and
  every remaining function is cancelled.
* A finished function's result stays on its worker until ``RemoteValue.fetch`` copies it; when
  the worker dies in between, ``fetch`` raises ``UnavailableError`` ("Cluster now being
  recovered" in the log).

In crowdd a worker that dies is gone until the host's members file brings its slot back
(:mod:`crowdd.job.elastic`), so :class:`RetiringFailureHandler` replaces TF's handler: the
failed function goes back to the queue for the other workers and the dead worker stops taking
functions; TF's cluster update (which waits for every worker) never runs. :class:`RetryBudget` is the
coordinator loop's second line: an error that still reaches ``fetch`` or ``schedule`` costs one
retry (the function is scheduled again). Only every worker retired, or too many failures in a
row, end the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from tensorflow.python.distribute.coordinator import cluster_coordinator as cc
from tensorflow.python.framework import errors

from crowdd.job.server import reachable

log = logging.getLogger(__name__)

# failures in a row on one reachable worker before it counts as dead
WORKER_STRIKES = 3
# errors reaching the coordinator loop in a row (no function succeeding in between)
RETRY_LIMIT = 8

# What a scheduled function's RemoteValue (or schedule itself) raises when a worker or the
# cluster fails: TF op errors, and the coordinator's wrappers around them.
RETRYABLE: tuple[type[BaseException], ...] = (errors.OpError, cc.ClosureInputError, cc.ClosureAbortedError)


def lost_device(exc: BaseException) -> bool:
    """TF's word for a round sent to a slot whose remote device it no longer knows (seen right
    after a slot came back and its connection was still failing): the slot's failure, not the
    function's. A round's inputs live on the coordinator, so TF resolves them against that
    slot's device when it runs."""
    return isinstance(exc, errors.InvalidArgumentError) and "Primary device is not remote" in str(exc)


def _task_index(device_name: str) -> int:
    """``/job:worker/replica:0/task:3`` -> 3 (-1 if the name has no task)."""
    try:
        return int(device_name.rsplit(":", 1)[-1])
    except ValueError:
        return -1


class RetiringFailureHandler:
    """A ``failure_handler`` for TF's ``Cluster``: dead workers are retired, never recovered.

    ``on_retire(index, alive_count, error)`` is called once per retired worker, from that
    worker's thread.
    """

    def __init__(
        self,
        cluster: Any,
        addresses: list[str],
        on_retire: Callable[[int, int, BaseException], None],
        *,
        strikes: int = WORKER_STRIKES,
        probe: Callable[[str], bool] = reachable,
    ) -> None:
        self._cluster = cluster
        self._addresses = addresses
        self._on_retire = on_retire
        self._strikes_max = strikes
        self._probe = probe
        self._lock = threading.Lock()
        self._strikes: dict[int, int] = {}
        self.retired: set[int] = set()

    @classmethod
    def install(
        cls,
        coordinator: Any,
        addresses: list[str],
        on_retire: Callable[[int, int, BaseException], None],
        **kwargs: Any,
    ) -> RetiringFailureHandler:
        """Swap TF's handler for one of these (before anything is scheduled)."""
        cluster = coordinator._cluster
        handler = cls(cluster, addresses, on_retire, **kwargs)
        old = cluster.failure_handler
        cluster.failure_handler = handler
        for worker in cluster.workers:
            worker.failure_handler = handler
        old.stop()
        return handler

    def stop(self) -> None:
        """Called by TF's ``Cluster.stop``; nothing runs in the background here."""

    @property
    def alive(self) -> int:
        with self._lock:
            return len(self._addresses) - len(self.retired)

    def _is_cancelled(self) -> bool:
        return bool(self._cluster.closure_queue._cancellation_mgr.is_cancelled)

    @contextlib.contextmanager
    def wait_on_failure(
        self,
        on_failure_fn: Callable[..., Any] | None = None,
        on_transient_failure_fn: Callable[[], Any] | None = None,
        on_recovery_fn: Callable[[], Any] | None = None,
        worker_device_name: str = "(unknown)",
    ) -> Iterator[None]:
        """Runs one function on a worker; decides what a failure means. Same contract as TF's."""
        del on_recovery_fn  # a retired worker is never recovered
        index = _task_index(worker_device_name)
        try:
            yield
        except (errors.OpError, cc.ClosureInputError, cc.ClosureAbortedError, TypeError) as exc:
            if self._is_cancelled() or not 0 <= index < len(self._addresses):
                raise  # the run is being cancelled (or no such worker): TF reports it to fetch()
            if not self._probe(self._addresses[index]):
                self._retire(index, exc, on_failure_fn, "its server does not answer")
                return
            # there is no parameter server, but TF still files some connection errors as a PS
            # failure: they are this worker's failure too
            if not (cc._is_worker_failure(exc) or cc._is_ps_failure(exc) or isinstance(exc, errors.DeadlineExceededError)
                    or lost_device(exc)):
                raise  # an error in the function itself: let the coordinator loop see it
            with self._lock:
                strikes = self._strikes[index] = self._strikes.get(index, 0) + 1
            if strikes >= self._strikes_max:
                self._retire(index, exc, on_failure_fn, f"{strikes} failures in a row")
                return
            log.warning("worker %d: a function failed (%s); trying it again", index, _first_line(exc))
            if on_transient_failure_fn is not None:
                on_transient_failure_fn()
        else:
            with self._lock:
                self._strikes.pop(index, None)

    def _retire(
        self, index: int, exc: BaseException, on_failure_fn: Callable[..., Any] | None, why: str
    ) -> None:
        if on_failure_fn is not None:
            on_failure_fn(exc)  # puts the function back in the queue, aborts the worker's resources
        worker = self._cluster.workers[index]
        if hasattr(worker, "detach"):  # an elastic slot (crowdd.job.elastic): it may come back
            worker.detach(exc)
        else:
            worker._should_worker_thread_run = False  # its thread ends after this function
        with self._lock:
            first = index not in self.retired
            self.retired.add(index)
            alive = len(self._addresses) - len(self.retired)
        if first:
            log.warning("worker %d (%s) is gone: %s; %d left", index, self._addresses[index], why, alive)
            self._on_retire(index, alive, exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class RetryBudget:
    """Counts failed functions seen by the coordinator loop; raises when the run must end.

    A failure costs one retry unless it is only a cancellation (TF cancels every queued
    function after one error). ``limit`` failures in a row with no success between end the
    run with the last error named.
    """

    def __init__(self, limit: int = RETRY_LIMIT) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def succeeded(self) -> None:
        self.in_a_row = 0

    def failed(self, exc: BaseException) -> None:
        self.total += 1
        if isinstance(exc, errors.CancelledError) and self.total < 50 * self.limit:
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"training failed {self.in_a_row} times in a row; last error: {_first_line(exc)}"
            ) from exc
        log.warning("a training function failed (%s); scheduling it again", _first_line(exc))


def flush_error(coordinator: Any) -> None:
    """Raise-and-clear the coordinator's stored error now (it cancels what is queued)."""
    try:
        coordinator.done()
    except RETRYABLE as exc:
        log.debug("cleared the coordinator's error: %s", _first_line(exc))


__all__ = [
    "RETRYABLE",
    "RetiringFailureHandler",
    "RetryBudget",
    "flush_error",
]
