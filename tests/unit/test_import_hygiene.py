"""Importing crowdd outside crowdd/job/ never loads TensorFlow; headless modules never load Textual.

Each check runs in a fresh interpreter so nothing imported by the test session leaks in.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import crowdd

ROOT = Path(__file__).resolve().parents[2]
#: Modules that run a program when imported.
SKIP = {"crowdd.__main__"}
#: The TF-free entry points of the job package (the daemon imports them).
JOB_TF_FREE = [
    "crowdd.job",
    "crowdd.job.spec",
    "crowdd.job.events",
    "crowdd.job.shards",
    "crowdd.testing.local_cluster",
    "crowdd.job.membership",
    # The job's launchers import TF only when they train: a worker job never loads it itself.
    "crowdd.job.host",
    "crowdd.job.worker",
    "crowdd.job.server",
]


def all_modules() -> list[str]:
    names = [crowdd.__name__]
    for info in pkgutil.walk_packages(crowdd.__path__, prefix="crowdd."):
        names.append(info.name)
    return sorted(n for n in names if n not in SKIP and not n.startswith("crowdd.job"))


def is_tui(name: str) -> bool:
    return name == "crowdd.tui" or name.startswith("crowdd.tui.")


def import_in_fresh_interpreter(modules: list[str]) -> dict[str, list[str]]:
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'textual', 'keras'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.splitlines()[-1])
    return {top: [k for k in loaded if k.split(".")[0] == top] for top in ("tensorflow", "textual", "keras")}


def test_the_walk_finds_the_package() -> None:
    mods = all_modules()
    assert "crowdd.wire" in mods and "crowdd.hyperparams" in mods
    # the platform layer and the idle package are headless too
    for name in ("crowdd.platform.process", "crowdd.platform.systemd", "crowdd.platform.windows_service",
                 "crowdd.platform.threads", "crowdd.idle.policy", "crowdd.idle.schedule", "crowdd.idle.probes"):
        assert name in mods
    assert not any(m.startswith("crowdd.job") for m in mods)


def test_no_module_outside_job_imports_tensorflow() -> None:
    loaded = import_in_fresh_interpreter(all_modules() + JOB_TF_FREE)
    assert loaded["tensorflow"] == []
    assert loaded["keras"] == []


def test_headless_modules_do_not_import_textual() -> None:
    headless = [m for m in all_modules() if not is_tui(m)] + JOB_TF_FREE
    loaded = import_in_fresh_interpreter(headless)
    assert loaded["textual"] == []
    assert loaded["tensorflow"] == []
