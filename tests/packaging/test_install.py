"""The install docs/install.md documents, followed step by step in clean environments.

- build the wheel as documented (a throw-away venv with `build`, `python -m build --wheel`)
  from a copy of this checkout: it carries the docs the units point to and the unit files;
- the system-service layout: `python3 -m venv PREFIX`, `PREFIX/bin/pip install WHEEL` (every
  dependency from the package index, TensorFlow included), then the files the documented
  `install` lines copy exist, the units' Documentation= file is there, and the installed
  `crowdd` runs a daemon and talks to it;
- the user-service layout with pipx: `pipx install WHEEL`, `pipx environment --value
  PIPX_LOCAL_VENVS`, the unit file the docs copy from there, `~/.local/bin/crowdd`.

Every command line run here is also checked to appear in docs/install.md, so the two cannot
drift apart. Slow (a full install with TensorFlow takes a minute or more) and needs the
package index; it skips when that cannot be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "install.md").read_text()
BASE_PYTHON = shutil.which("python3") or sys.executable
WHEEL = "crowdd-0.1.0-py3-none-any.whl"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def documented(line: str) -> None:
    assert line in DOC, f"docs/install.md does not say: {line}"


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def sh(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run one step as a user would: no PYTHONPATH pointing into this checkout."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env if env is not None else CLEAN_ENV,
                          capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _index_reachable() -> bool:
    with_tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d",
                           str(with_tmp / f"crowdd-index-probe-{os.getpid()}"), "six"],
                          capture_output=True, text=True, timeout=120, check=False)
    shutil.rmtree(with_tmp / f"crowdd-index-probe-{os.getpid()}", ignore_errors=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel, built as documented, from a copy of this checkout (the build leaves nothing here)."""
    if not _index_reachable():
        pytest.skip("no package index reachable (pip download six failed)")
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "crowdd"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".*_cache", ".hypothesis"))
    documented("python3 -m venv /tmp/crowdd-build")
    documented("/tmp/crowdd-build/bin/pip install build")
    documented("/tmp/crowdd-build/bin/python -m build --wheel")
    env = tmp / "crowdd-build"
    sh(BASE_PYTHON, "-m", "venv", env)
    sh(env / "bin" / "pip", "install", "--quiet", "build")
    sh(env / "bin" / "python", "-m", "build", "--wheel", cwd=src)
    built = src / "dist" / WHEEL
    assert built.is_file(), list((src / "dist").iterdir())
    yield built


def test_the_wheel_carries_the_docs_and_the_units(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "crowdd-0.1.0.data/data/"
    for needed in ("share/doc/crowdd/install.md", "share/doc/crowdd/security.md", "share/doc/crowdd/crowdd.sample.toml",
                   "share/crowdd/systemd/crowdd.service", "share/crowdd/systemd/crowdd-matchmaker.service",
                   "share/crowdd/systemd/user/crowdd.service", "share/crowdd/sysusers.d/crowdd.conf",
                   "share/crowdd/windows/install.ps1", "share/crowdd/windows/service.py"):
        assert data + needed in names, needed
    assert "crowdd/tui/app.tcss" in names
    assert not [n for n in names if n.startswith("tests/")]


def _documentation(unit: Path) -> str:
    found = re.search(r"^Documentation=file://(\S+)$", unit.read_text(), re.M)
    assert found, unit
    return found.group(1)


def test_the_documented_system_install(wheel: Path, tmp_path: Path) -> None:
    """`sudo python3 -m venv /opt/crowdd`, `pip install WHEEL` (here in a temporary prefix):
    the command, the unit files the docs install, and the docs the unit points to."""
    for line in ("sudo python3 -m venv /opt/crowdd", f"sudo /opt/crowdd/bin/pip install ./{WHEEL}",
                 "sudo ln -sf /opt/crowdd/bin/crowdd /usr/local/bin/crowdd",
                 "sudo install -Dm644 /opt/crowdd/share/crowdd/sysusers.d/crowdd.conf /etc/sysusers.d/crowdd.conf",
                 "sudo install -Dm644 /opt/crowdd/share/crowdd/systemd/crowdd.service /etc/systemd/system/crowdd.service"):
        documented(line)
    prefix = tmp_path / "opt-crowdd"
    sh(BASE_PYTHON, "-m", "venv", prefix)
    shutil.copy(wheel, tmp_path / WHEEL)
    t0 = time.monotonic()
    sh(prefix / "bin" / "pip", "install", "--quiet", f"./{WHEEL}", cwd=tmp_path, timeout=900)
    print(f"pip install with every dependency: {time.monotonic() - t0:.0f} s")
    crowdd = prefix / "bin" / "crowdd"
    assert sh(crowdd, "--version").stdout.strip() == "crowdd 0.1.0"
    share = prefix / "share"
    for f in ("crowdd/sysusers.d/crowdd.conf", "crowdd/systemd/crowdd.service", "crowdd/systemd/user/crowdd.service"):
        shipped = ROOT / "packaging" / "systemd" / f.removeprefix("crowdd/systemd/").replace("crowdd/sysusers.d/", "sysusers.d/")
        assert (share / f).read_text() == shipped.read_text(), f
    # Documentation= of the system units names /opt/crowdd/share/doc/crowdd/install.md: here, PREFIX's
    doc = _documentation(share / "crowdd" / "systemd" / "crowdd.service")
    assert doc == "/opt/crowdd/share/doc/crowdd/install.md"
    assert (prefix / Path(doc).relative_to("/opt/crowdd")).read_text() == DOC
    # the installed command runs a daemon and talks to it (TensorFlow is never imported by either)
    node = tmp_path / "node"
    env = CLEAN_ENV
    proc = subprocess.Popen([crowdd, "daemon", "--root", node, "--matchmaker", "127.0.0.1:9"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (node / "run" / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the installed daemon did not start"
            time.sleep(0.1)
        assert "off" in sh(crowdd, "status", "--root", node, env=env).stdout
        assert "crowdd daemon" in sh(crowdd, "logs", "--root", node, env=env).stdout
    finally:
        from crowdd.platform.process import kill_group

        kill_group(proc, 15.0)


def test_the_documented_user_install_with_pipx(wheel: Path, tmp_path: Path) -> None:
    """`pipx install WHEEL`: crowdd in ~/.local/bin, the user unit where the docs copy it from,
    the docs where the user unit's Documentation= points (%h = the home)."""
    documented(f"pipx install ./{WHEEL}")
    documented('venvs="$(pipx environment --value PIPX_LOCAL_VENVS)"')
    documented('install -Dm644 "$venvs/crowdd/share/crowdd/systemd/user/crowdd.service" '
               "~/.config/systemd/user/crowdd.service")
    tools = tmp_path / "pipx-tool"
    sh(BASE_PYTHON, "-m", "venv", tools)
    sh(tools / "bin" / "pip", "install", "--quiet", "pipx")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(wheel, home / WHEEL)
    env = {k: v for k, v in CLEAN_ENV.items() if not k.startswith(("PIPX_", "XDG_"))}
    env["HOME"] = str(home)
    env["PATH"] = f"{home / '.local' / 'bin'}:{env.get('PATH', '')}"
    pipx = tools / "bin" / "pipx"
    sh(pipx, "install", "--python", BASE_PYTHON, f"./{WHEEL}", cwd=home, env=env, timeout=900)
    crowdd = home / ".local" / "bin" / "crowdd"
    assert sh(crowdd, "--version", env=env).stdout.strip() == "crowdd 0.1.0"
    venvs = Path(sh(pipx, "environment", "--value", "PIPX_LOCAL_VENVS", env=env).stdout.strip())
    unit = venvs / "crowdd" / "share" / "crowdd" / "systemd" / "user" / "crowdd.service"
    assert unit.read_text() == (ROOT / "packaging" / "systemd" / "user" / "crowdd.service").read_text()
    doc = _documentation(unit).replace("%h", str(home))
    assert Path(doc).read_text() == DOC
    assert "ExecStart=%h/.local/bin/crowdd daemon" in unit.read_text()
