"""Suite-wide guards."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from crowdd.node.states import InvalidTransition

# A shell that starts the suite in the background (`scripts/test &`) starts it with SIGINT
# ignored, and an ignored signal stays ignored through exec in every child: the tests that
# press Ctrl-C on a demo or on `crowdd logs -f` would then wait on a process that cannot hear
# it. A handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class _InvalidTransitions(logging.Handler):
    """Collects every logged InvalidTransition: a daemon bug the daemon survives (its cycle
    fails and it retries), so it would otherwise pass unnoticed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InvalidTransition):
            self.seen.append(f"{record.name}: {exc}")


@pytest.fixture(autouse=True)
def no_invalid_state_transitions() -> Iterator[None]:
    """Fail any test during which an in-process daemon tried an invalid state transition."""
    handler = _InvalidTransitions()
    log = logging.getLogger("crowdd")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
    if handler.seen:
        pytest.fail(f"invalid state transition(s): {handler.seen}")


# On CI (`.ci/run` sets CROWDD_CI=1: root on Linux, with everything scripts/setup installs) every
# test must run: a skip there is a failure that names what was missing. Elsewhere a test may
# skip with its reason (`scripts/test` prints every reason: -rs).
REQUIRE_ALL = os.environ.get("CROWDD_CI") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped on CI, where everything it needs must be present: {reason}"


@pytest.fixture(autouse=True, scope="session")
def no_job_cgroup_left() -> Iterator[None]:
    """Nothing left behind: at the end, no job cgroup of a live process may remain. One left by
    a daemon a test killed (SIGKILL) is what the next daemon's start removes
    (:meth:`crowdd.platform.cgroups.JobCgroups.sweep`): done here, as no daemon starts after."""
    from crowdd.platform.cgroups import PREFIX, CgroupUnavailable, JobCgroups

    yield
    try:
        cgroups = JobCgroups.find()
    except CgroupUnavailable:
        return
    cgroups.sweep()
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}  # not a run next door's
    left = [str(d) for base in cgroups.bases for d in base.glob(f"{PREFIX}*")
            if d.name[len(PREFIX):].split("-", 1)[0] in {str(p) for p in ours}]
    assert not left, f"job cgroups left behind: {left}"
