"""The environment a job starts with: an allowlist, never the daemon's own.

Every member of a group runs its graphs in the job's processes, and any of them can read the
job's environment (``/proc/self/environ``). The daemon's environment can hold what is none of
the group's business: tokens, cloud credentials, ``SSH_AUTH_SOCK``,
``DBUS_SESSION_BUS_ADDRESS``. A job gets only:

- what finds programs and libraries: ``PATH``, ``PYTHONPATH`` (how the daemon itself found
  crowdd, when it did so), ``LD_LIBRARY_PATH``;
- locale and time: ``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``;
- the thread caps (:func:`crowdd.platform.threads.thread_env`), ``TF_CPP_MIN_LOG_LEVEL``;
- ``HOME`` and ``KERAS_HOME`` pointing into the job's own work directory (libraries look for
  their settings in ``~``), ``TMPDIR`` set by the job itself below it;
- the test suite's hooks (names starting ``CROWDD_TEST_``): they only ever make the *host's*
  own job misbehave toward itself, for tests that play a bad member.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from crowdd.platform.threads import thread_env

KEPT = frozenset({"PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG", "LANGUAGE", "TZ", "TF_CPP_MIN_LOG_LEVEL"})
KEPT_PREFIXES = ("LC_", "CROWDD_TEST_")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def job_env(source: Mapping[str, str], workdir: Path, threads: int) -> dict[str, str]:
    """The environment of a job in ``workdir`` started by a process whose environment is
    ``source``: the allowlisted variables of ``source``, its own home, its thread caps."""
    env = {k: v for k, v in source.items() if k in KEPT or k.startswith(KEPT_PREFIXES)}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(thread_env(threads))
    env["HOME"] = str(workdir)
    env["KERAS_HOME"] = str(workdir / ".keras")
    return env


__all__ = ["job_env"]
