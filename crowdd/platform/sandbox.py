"""The sandbox every TensorFlow process of a job runs in (Linux Landlock, via ``landlockpy``).

A TF server runs whatever graph a group member sends it, so the job (and with it every TF
server it starts, and the host's coordinator) is restricted before it serves anything:

- **Files** (Landlock, ABI >= 1): read (and execute) only the interpreter, the installed
  packages, the system's libraries, ``/proc``, the CPU topology in ``/sys`` and a few named ``/etc`` files, and the
  job's dataset file; read and write only the job's work directory. The daemon's state (identity
  key, config, control socket, cache, other jobs) and the user's home are out of reach.
- **TCP** (ABI >= 4): bind only the job's own TF ports, connect only to the cluster's ports.
- **Scopes** (ABI >= 6): no abstract Unix sockets or signals outside the job.
- **System calls** (seccomp, :mod:`crowdd.platform.syscalls`): no ``socket(AF_UNIX)`` (the
  pathname Unix sockets Landlock below ABI 9 leaves open: D-Bus, ``systemd --user``,
  ssh-agent), no io_uring.
- **Privileges**: ``no_new_privs`` and an empty capability bounding set (the job runs as the
  mapped root of its user namespace: after ``exec`` it holds no capability there).

:func:`probe` says once whether this kernel has Landlock (status and the TUI show why not);
without it the daemon does not train unless ``[security] allow_unsandboxed = true``.

The policy is built (:func:`job_policy`) and its ruleset made (:func:`prepare`) in the job's
launcher process, which runs the job's own interpreter, so the interpreter's paths are its own;
:meth:`SandboxRules.enforce` then runs in the forked child just before ``exec`` (nothing there but
system calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crowdd.platform.syscalls import Filter, SyscallFilterError, compile_filter

logger = logging.getLogger(__name__)

# System paths a Python + TensorFlow process reads (libraries, its own /proc, and of /sys only the
# CPU and memory topology and its cgroup's limits: not the machine's hardware, devices or firmware).
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/proc", "/sys/devices/system", "/sys/fs/cgroup",
               "/opt/conda")
SYSTEM_READ_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "nsswitch.conf", "passwd", "group",
    "hosts", "host.conf", "gai.conf", "resolv.conf", "os-release", "mime.types", "ssl", "ca-certificates",
    "alternatives",
)
DEVICES_READ = ("/dev/urandom", "/dev/random")
DEVICES_WRITE = ("/dev/null", "/dev/zero", "/dev/full")
_PR_CAPBSET_DROP = 24


class SandboxError(Exception):
    """The sandbox could not be set up; the message is for the user."""


@dataclass(frozen=True)
class SandboxSupport:
    """Whether jobs can be sandboxed here, the kernel's Landlock ABI, and if not, why."""

    available: bool
    abi: int = 0
    reason: str = ""

    @property
    def network_rules(self) -> bool:
        return self.abi >= 4

    @property
    def scopes(self) -> bool:
        return self.abi >= 6


@dataclass(frozen=True)
class SandboxPolicy:
    """What a sandboxed process may touch: ``read`` (and execute), ``write`` (read-write,
    create, remove), TCP ports to ``bind`` and to ``connect`` to."""

    read: tuple[Path, ...]
    write: tuple[Path, ...]
    bind: tuple[int, ...] = ()
    connect: tuple[int, ...] = ()
    skipped: tuple[str, ...] = field(default=(), compare=False)

    def describe(self) -> str:
        return (f"read-only {len(self.read)} paths; read-write {', '.join(map(str, self.write)) or 'nothing'}; "
                f"bind TCP {list(self.bind)}; connect TCP {list(self.connect)}")


def probe_now() -> SandboxSupport:
    """Whether this kernel enforces Landlock (and which ABI), or why not."""
    if not sys.platform.startswith("linux"):
        return SandboxSupport(False, 0, f"Landlock is Linux-only (this is {sys.platform})")
    try:
        import landlockpy
    except ImportError as exc:  # pragma: no cover - a dependency on Linux
        return SandboxSupport(False, 0, f"the landlockpy package is missing ({exc})")
    try:
        abi = landlockpy.abi_version()
    except landlockpy.LandlockError as exc:  # e.g. a seccomp filter answering EPERM
        return SandboxSupport(False, 0, f"Landlock cannot be used here: {exc}")
    if abi < 1:
        return SandboxSupport(False, 0, "this kernel has no Landlock (Linux 5.13 or later, with "
                                        "landlock in the lsm= boot list)")
    return SandboxSupport(True, abi)


@functools.cache
def probe() -> SandboxSupport:
    """:func:`probe_now`, once per process."""
    result = probe_now()
    if not result.available:
        logger.warning("TensorFlow cannot be sandboxed on this machine: %s", result.reason)
    return result


def _covers(path: Path, guarded: Iterable[Path]) -> bool:
    """Whether ``path`` is one of ``guarded`` or a directory above one of them."""
    return any(path == g or path in g.parents for g in guarded)


def runtime_paths(guarded: Sequence[Path] = ()) -> tuple[list[Path], list[str]]:
    """The paths this interpreter needs to run crowdd's job: its prefixes, its ``sys.path``,
    the crowdd package, the system's libraries and a few ``/etc`` files. A ``sys.path`` entry
    that would expose one of ``guarded`` (a home directory, the daemon's state) or ``/`` is left
    out and named in the second list."""
    import crowdd

    guarded = [Path(g).resolve() for g in guarded] + [Path("/")]
    candidates: list[Path] = [Path(p) for p in SYSTEM_READ]
    candidates += [Path("/etc") / name for name in SYSTEM_READ_ETC]
    candidates += sorted(Path("/etc").glob("python3*"))
    candidates += [Path(p) for p in DEVICES_READ]
    candidates += [Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix),
                   Path(sys.executable).parent, Path(crowdd.__file__).parent]
    candidates += [Path(p) for p in sys.path if p]
    out: list[Path] = []
    skipped: list[str] = []
    for c in candidates:
        try:
            real = c.resolve()
        except OSError:
            continue
        if not real.exists():
            continue
        if _covers(real, guarded):
            skipped.append(str(c))
            continue
        if real not in out:
            out.append(real)
    return out, skipped


def home_dirs() -> list[Path]:
    """Every home directory this machine names (the running user's, /root, /home)."""
    homes = [Path("/root"), Path("/home")]
    try:
        homes.append(Path.home())
    except (RuntimeError, KeyError):
        pass
    return homes


def job_policy(
    workdir: Path, dataset: Path | None, *, bind: Sequence[int] = (), connect: Sequence[int] = (),
    guarded: Sequence[Path] = (),
) -> SandboxPolicy:
    """The job's policy: the runtime read-only, ``dataset`` read-only, ``workdir`` read-write,
    ``bind``/``connect`` its own and the cluster's TCP ports. ``guarded``: directories that
    must stay out of reach (homes are always guarded)."""
    read, skipped = runtime_paths([*guarded, *home_dirs()])
    if dataset is not None:
        read.append(dataset.resolve())
    write = [workdir.resolve(), *(Path(d) for d in DEVICES_WRITE if Path(d).exists())]
    return SandboxPolicy(tuple(read), tuple(write), tuple(sorted(set(bind))), tuple(sorted(set(connect))),
                         tuple(skipped))


class SandboxRules:
    """A ruleset made from a policy in this process; :meth:`enforce` applies it to the calling
    thread (and everything it execs and forks) — call it in a forked child before ``exec``."""

    def __init__(self, ruleset: Any, abi: int, cap_last: int, syscalls: Filter) -> None:
        self._ruleset = ruleset
        self.abi = abi
        self._cap_last = cap_last
        self._syscalls = syscalls
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def enforce(self) -> None:
        """Drop every capability from the bounding set (a root in a user namespace re-gains
        none at ``exec``), then restrict (which sets ``no_new_privs`` first). Only system
        calls: safe between fork and exec. Then the syscall filter (:mod:`crowdd.platform.syscalls`),
        which needs the ``no_new_privs`` that restricting set."""
        for cap in range(self._cap_last + 1):
            if self._libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                if err != 1:  # EPERM: not ours to drop (no CAP_SETPCAP) — nothing to drop then
                    raise OSError(err, f"cannot drop capability {cap}")
        self._ruleset.restrict()
        self._syscalls.install()

    def close(self) -> None:
        self._ruleset.close()


def prepare(policy: SandboxPolicy) -> SandboxRules:
    """Build the Landlock ruleset of ``policy`` (raises :class:`SandboxError`)."""
    import landlockpy
    from landlockpy import AccessFS, AccessNet, Scope

    support = probe_now()
    if not support.available:
        raise SandboxError(support.reason)
    abi = support.abi
    handled_fs = landlockpy.fs_for_abi(abi)
    file_rights = AccessFS.EXECUTE | AccessFS.WRITE_FILE | AccessFS.READ_FILE | AccessFS.TRUNCATE | AccessFS.IOCTL_DEV
    read_rights = AccessFS.EXECUTE | AccessFS.READ_FILE | AccessFS.READ_DIR
    try:
        ruleset = landlockpy.Ruleset(handled_fs=handled_fs, handled_net=AccessNet.BIND_TCP | AccessNet.CONNECT_TCP,
                                     scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL)
    except landlockpy.LandlockError as exc:
        raise SandboxError(f"cannot make a Landlock ruleset: {exc}") from None
    try:
        for paths, rights in ((policy.read, read_rights), (policy.write, handled_fs)):
            for p in paths:
                want = rights if p.is_dir() else rights & file_rights
                try:
                    ruleset.allow_path(p, want)
                except (OSError, landlockpy.LandlockError) as exc:
                    raise SandboxError(f"cannot allow {p} in the sandbox: {exc}") from None
        for port in policy.bind:
            ruleset.allow_port(port, AccessNet.BIND_TCP)
        for port in policy.connect:
            ruleset.allow_port(port, AccessNet.CONNECT_TCP)
    except BaseException:
        ruleset.close()
        raise
    try:
        syscalls = compile_filter()
        cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text().strip())
    except SyscallFilterError as exc:
        ruleset.close()
        raise SandboxError(str(exc)) from None
    return SandboxRules(ruleset, abi, cap_last, syscalls)


def forbid_writes(allow: Sequence[str] = DEVICES_WRITE) -> str | None:
    """A further Landlock layer on this thread (and all it starts): no file may be written,
    created, removed or truncated, except the devices in ``allow``. Each TF server applies it
    first thing, before TensorFlow starts a thread: the graphs it runs come from the group, and
    nothing a server does needs to write (the job process itself keeps its own directory: its
    checkpoints, the model, ``TMPDIR`` with autograph's modules). Returns why not where the
    kernel has no Landlock (the job is then not sandboxed either)."""
    support = probe_now()
    if not support.available:
        return support.reason
    import landlockpy
    from landlockpy import AccessFS, AccessNet

    reads = AccessFS.EXECUTE | AccessFS.READ_FILE | AccessFS.READ_DIR
    handled = landlockpy.fs_for_abi(support.abi) & ~reads
    file_rights = AccessFS.WRITE_FILE | AccessFS.TRUNCATE | AccessFS.IOCTL_DEV
    # only writes: the network stays as the job's own layer has it (None would handle it all)
    with landlockpy.Ruleset(handled_fs=handled, handled_net=AccessNet.NONE) as ruleset:
        for dev in allow:
            if Path(dev).exists():
                ruleset.allow_path(Path(dev), handled & file_rights)
        ruleset.restrict()
    return None


def close_nested_user_namespaces() -> str | None:
    """In a fresh user namespace (as its root): allow no user namespace below it. Returns why
    not where it cannot (e.g. /proc/sys is read-only), else None. The sandboxed job cannot
    undo it: it has no capability and may not write /proc."""
    try:
        Path("/proc/sys/user/max_user_namespaces").write_text("0\n")
    except OSError as exc:
        return f"cannot forbid nested user namespaces: {exc.strerror or exc}"
    return None


__all__ = [
    "SandboxRules", "SandboxError", "SandboxPolicy", "SandboxSupport", "close_nested_user_namespaces", "forbid_writes",
    "home_dirs", "job_policy", "prepare", "probe", "probe_now", "runtime_paths",
]
