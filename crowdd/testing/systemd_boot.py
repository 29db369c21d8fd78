"""A throw-away systemd, booted as PID 1 for tests (root only).

:class:`Container` boots the machine's own systemd in fresh PID, mount, UTS, IPC and cgroup
namespaces (it shares this machine's root file system and network) in about a second:

- a cgroup made below this process's own becomes the container's whole cgroup hierarchy, and
  is removed (with anything left in it) at the end;
- tmpfs over ``/run``, ``/var/lib``, ``/var/log``, ``/tmp`` and ``/var/tmp`` (but for the
  directories it is told to ``keep``), and an overlay over
  ``/etc`` whose upper layer is a temporary directory: whatever the tests install (units,
  sysusers, config, the users that ``systemd-sysusers`` creates) never reaches the machine;
- systemd logs to a pty read from here (:meth:`Container.console`); it boots into an empty
  ``crowdd-test.target``, so nothing of the machine's own units starts unless asked for;
- commands run inside with ``nsenter`` (:meth:`Container.run`, :meth:`Container.systemctl`).

``with Container(tmp, setup=[...]) as c:`` boots and always tears down: systemd is asked to
exit, then the namespace and its cgroup are killed and removed. :func:`why_not` says why a
machine cannot boot one (not root, no systemd, no cgroup2 or overlayfs), for skips.

:func:`install_venv` installs a checkout into a virtual environment the hardened units can see
(not under /root, /home or /tmp), reusing an existing environment's site-packages for the
dependencies so that no download or TensorFlow install is needed.

Used by ``tests/packaging/test_unit_sandbox.py`` and ``tests/packaging/test_systemd_units.py``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

SYSTEMD = next((p for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd") if os.access(p, os.X_OK)), None)
TEST_TARGET = "crowdd-test.target"
TOOLS = ("unshare", "nsenter", "mount", "systemd-sysusers", "systemctl")


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def why_not() -> str | None:
    """Why a :class:`Container` cannot boot here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (it boots systemd in namespaces)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if SYSTEMD is None:
        missing.append("systemd")
    if missing:
        return "missing: " + ", ".join(missing)
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    return None


class BootError(RuntimeError):
    """systemd did not come up (the message carries its console)."""


class Container:
    """systemd as PID 1 in new namespaces; see the module docstring."""

    def __init__(self, tmp: Path, *, setup: Sequence[str] = (), unit: str = TEST_TARGET,
                 boot_timeout: float = 60.0, exit_on_unit_end: bool = False, keep: Sequence[Path] = ()) -> None:
        """``setup``: shell commands run inside, as root, after the mounts and before systemd
        starts (install units, run systemd-sysusers, write config). ``unit``: what systemd
        starts (the empty test target by default). ``exit_on_unit_end``: the caller's unit
        ends the boot itself (``SuccessAction=exit-force``): :meth:`wait` for it. ``keep``:
        directories of this machine under /tmp or /var/tmp that stay visible inside."""
        self.tmp = Path(tmp)
        self.setup = list(setup)
        self.unit = unit
        self.boot_timeout = boot_timeout
        self.exit_on_unit_end = exit_on_unit_end
        self.keep = [Path(p) for p in keep]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self._console: list[bytes] = []
        self._master = self._slave = -1
        self._reader: threading.Thread | None = None
        self._cgroup: Path | None = None

    # ------------------------------------------------------------------ boot and teardown

    def _inner(self) -> str:
        q = shlex.quote
        upper, work = self.tmp / "etc-upper", self.tmp / "etc-work"
        target = "\n".join(["[Unit]", "Description=crowdd test boot (nothing else)", "DefaultDependencies=no", ""])
        steps = [
            "set -e",
            # this namespace's cgroup root (the cgroup made for it) becomes systemd's whole hierarchy
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/systemd/system",
            "mount -t tmpfs -o mode=0755 tmpfs /var/lib",
            "mount -t tmpfs -o mode=0755 tmpfs /var/log",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={q(str(upper))},workdir={q(str(work))} /etc",
            *self.setup,
            # (after the setup, which may read from this machine's /tmp); ``keep`` stays visible
            *(f"mkdir -p /run/crowdd-test-keep/{i} && mount --bind {q(str(p))} /run/crowdd-test-keep/{i}"
              for i, p in enumerate(self.keep)),
            "mount -t tmpfs -o mode=1777 tmpfs /tmp",
            "mount -t tmpfs -o mode=1777 tmpfs /var/tmp",
            *(f"mkdir -p {q(str(p))} && mount --move /run/crowdd-test-keep/{i} {q(str(p))}"
              for i, p in enumerate(self.keep)),
            f"printf %s {q(target)} > /etc/systemd/system/{TEST_TARGET}",
            # the machine's network-online.target would pull its own wait-online services in
            "ln -sf /dev/null /etc/systemd/system/network-online.target",
            f"mount --bind {q(os.ttyname(self._slave))} /dev/console",
            f"exec env -i container=crowdd-test {q(str(SYSTEMD))} --system --unit={q(self.unit)}"
            " --log-target=console --log-level=info --show-status=no",
        ]
        return "\n".join(steps)

    def boot(self) -> Container:
        if SYSTEMD is None:
            raise BootError("no systemd on this machine")
        for d in ("etc-upper", "etc-work"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        # systemd as PID 1 logs to /dev/console, which must be a terminal: a pty read from here
        self._master, self._slave = os.openpty()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        mount = cgroup2_mount()
        if mount is None:
            raise BootError("no cgroup2 hierarchy")
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        self._cgroup = mount / own.lstrip("/") / f"crowdd-test-{uuid.uuid4().hex[:12]}"
        self._cgroup.mkdir()
        script = self.tmp / "boot.sh"
        script.write_text(self._inner() + "\n")
        q = shlex.quote
        outer = (
            f"echo $$ > {q(str(self._cgroup / 'cgroup.procs'))} && exec unshare --pid --mount --uts --ipc --cgroup"
            f" --fork --kill-child --propagation private --mount-proc -- sh {q(str(script))}"
        )
        self.proc = subprocess.Popen(["sh", "-c", outer], stdin=subprocess.DEVNULL, stdout=self._slave,
                                     stderr=self._slave, start_new_session=True)
        try:
            self.pid1 = self._find_pid1()
            if not self.exit_on_unit_end:
                self._wait_running()
        except BaseException:
            self.close()
            raise
        return self

    def _find_pid1(self) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + self.boot_timeout
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(f"the container ended at once (status {self.proc.returncode}):\n{self.console()}")
            try:
                kids = children.read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise BootError("no PID 1 appeared")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BootError(f"systemd exited (status {self.proc.returncode}):\n{self.console()}")
            try:
                state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            except subprocess.TimeoutExpired:
                state = ""
            if state in ("running", "degraded"):
                return
            time.sleep(0.05)
        raise BootError(f"systemd did not finish booting in {self.boot_timeout:.0f} s:\n{self.console()}")

    def wait(self, timeout: float) -> int:
        """Wait for the container to end by itself (``exit_on_unit_end``); its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Ask systemd to exit (it stops every unit), then kill whatever is left; remove the
        cgroup; close the console."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None and self.pid1:
                with _suppress():
                    self.run("systemctl", "exit", check=False, timeout=10, _pid1=self.pid1)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                with _suppress():
                    proc.wait(10)
        if self._cgroup is not None:
            _remove_cgroup(self._cgroup)
            self._cgroup = None
        if self._slave >= 0:
            os.close(self._slave)
            self._slave = -1
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        self.pid1 = 0

    def __enter__(self) -> Container:
        return self.boot()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    # ------------------------------------------------------------------ inside

    def run(self, *cmd: str, check: bool = True, timeout: float = 60.0, input: str | None = None,
            env: Mapping[str, str] | None = None, _pid1: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside (all of PID 1's namespaces, its root and working directory)."""
        pid = _pid1 or self.pid1
        if not pid:
            raise BootError("not booted")
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                       "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}
        args = ["nsenter", "-t", str(pid), "-a", "--", "env", "-i",
                *(f"{k}={v}" for k, v in environment.items()), *cmd]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def host_pid(self, pid: int) -> int:
        """This machine's PID of the container's process ``pid`` (to read its /proc/PID/status).
        A process in a PID namespace of its own inside the container (a confined job) has more
        ids: the container's is the one at PID 1's depth."""
        depth = len(_nspid(self.pid1)) - 1
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if len(ids) > depth and ids[depth] == str(pid) and _in_container(int(entry.name), self.pid1):
                        return int(entry.name)
        raise LookupError(f"no process {pid} in the container (its PID 1: NSpid {_nspid(self.pid1)})")

    def console(self) -> str:
        return b"".join(self._console).decode(errors="replace")

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the last holder of the other end has gone
                return
            if not data:
                return
            self._console.append(data)


def _nspid(pid: int) -> list[str]:
    """The ``NSpid:`` ids of process ``pid`` (outermost first)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return [str(pid)]


def _in_container(host_pid: int, pid1: int) -> bool:
    """Whether ``host_pid`` is in the container: in its PID namespace, or below its PID 1 (a
    confined job has a PID namespace of its own inside the container's)."""
    try:
        if os.readlink(f"/proc/{host_pid}/ns/pid") == os.readlink(f"/proc/{pid1}/ns/pid"):
            return True
        p = host_pid
        for _ in range(64):
            p = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if p == pid1:
                return True
            if p <= 1:
                return False
    except (OSError, ValueError, IndexError):
        return False
    return False


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, (OSError, subprocess.SubprocessError))


def _remove_cgroup(cgroup: Path) -> None:
    if not cgroup.exists():
        return
    kill = cgroup / "cgroup.kill"
    if kill.exists():
        with _suppress():
            kill.write_text("1")
    for _ in range(100):
        try:
            for child in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                child.rmdir()
            cgroup.rmdir()
            return
        except OSError:
            time.sleep(0.1)


# --------------------------------------------------------------------------- a venv the units can see


def site_packages(python: str = sys.executable) -> Path:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    return Path(out)


def install_venv(target: Path, checkout: Path, *, base_python: str = "/usr/bin/python3",
                 deps_from: Path | None = None, pip_python: str = sys.executable) -> Path:
    """A venv at ``target`` (made with ``base_python``, which must be visible to the unit: not
    under /root or /home) with ``checkout`` pip-installed into it (no dependencies: a ``.pth``
    file adds ``deps_from``, by default this interpreter's site-packages, of the same Python
    minor version). The checkout is copied first, so the build leaves nothing in it. Returns
    the venv's ``bin/crowdd``."""
    deps = deps_from or site_packages()
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
    own = site_packages(str(target / "bin" / "python"))
    # Inside a container the dependencies may be hidden (a checkout under /tmp, covered by a
    # tmpfs; under /root, which ProtectHome hides): :func:`deps_steps` binds them at
    # ``target/deps`` there. Python adds each line's directory that exists.
    (target / DEPS_DIR).mkdir()
    (target / DEPS_SOURCE).write_text(f"{deps}\n")
    (own / "crowdd-test-deps.pth").write_text(f"{deps}\n{target / DEPS_DIR}\n")
    with tempfile.TemporaryDirectory(prefix="crowdd-src-") as src:
        copy = Path(src) / "crowdd"
        shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "tests", "benchmarks"))
        subprocess.run([pip_python, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "--quiet",
                        "--no-deps", "--no-compile", str(copy)], check=True, timeout=300,
                       capture_output=True, text=True)
    return target / "bin" / "crowdd"


DEPS_DIR = "deps"
DEPS_SOURCE = "crowdd-test-deps-source"


def deps_steps(crowdd_bin: Path) -> list[str]:
    """Setup steps (first in a :class:`Container`'s ``setup``) that make the dependencies of
    the venv :func:`install_venv` made for ``crowdd_bin`` visible inside, wherever they are."""
    venv = crowdd_bin.parent.parent
    source = (venv / DEPS_SOURCE).read_text().strip()
    return [f"mount --bind {shlex.quote(source)} {shlex.quote(str(venv / DEPS_DIR))}"]


__all__ = ["SYSTEMD", "TEST_TARGET", "BootError", "Container", "cgroup2_mount", "deps_steps", "install_venv",
           "site_packages", "why_not"]
