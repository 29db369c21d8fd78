"""Starting this node's job child: its work directory, data links, spec and supervisor.

Holds the one job that runs (``current``) so the daemon can suspend, resume and stop it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crowdd.hyperparams import validate_job
from crowdd.idle import thread_env
from crowdd.job.spec import (
    Cluster,
    JobSpec,
    Settings,
    SpecError,
    parse_spec,
    write_spec,
)
from crowdd.manifest import Manifest
from crowdd.node.ports import Reservation
from crowdd.supervisor import JobError, JobSupervisor, job_command


class LaunchError(Exception):
    """The job could not be started; the message is for the user."""


class JobLauncher:
    """Starts job children below ``jobs_dir``. ``settings()`` gives the job settings at start."""

    def __init__(self, jobs_dir: Path, python: str, env: Mapping[str, str], settings: Callable[[], Settings]) -> None:
        self._jobs_dir = jobs_dir
        self._python = python
        self._env = dict(env)
        self._settings = settings
        self.current: JobSupervisor | None = None

    def job_dir(self, group: dict[str, Any], index: int) -> Path:
        d = self._jobs_dir / f"{group['group_id']}-{index}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    async def start(
        self, role: str, index: int, cluster: dict[str, list[str]], workdir: Path, data: Path, manifest: Manifest,
        job: dict[str, Any], on_event: Callable[[dict[str, Any]], None], res: Reservation,
    ) -> JobSupervisor:
        """Write the spec, free the reserved TF ports and start the job (raises :class:`LaunchError`)."""
        _link(data, workdir / "dataset.bin")
        (workdir / "dataset.manifest.json").write_bytes(manifest.to_json())
        spec_obj = JobSpec(
            role=role, index=index,
            cluster=Cluster(tuple(cluster["ps"]), tuple(cluster["worker"])),
            job=validate_job(job),
            data="dataset.bin", manifest="dataset.manifest.json",
            output_dir="output" if role == "host" else None,
            workdir=str(workdir),
            settings=self._settings(),
        )
        try:
            spec = parse_spec(spec_obj.to_dict(), role=role)
        except SpecError as exc:
            raise LaunchError(f"bad job spec ({exc.field}): {exc.message}") from None
        spec_path = workdir / "spec.json"
        write_spec(spec, spec_path)
        res.release_tf()
        env = {**self._env, **thread_env(spec.settings.threads)}
        sup = JobSupervisor(
            job_command(role, spec_path, self._python), on_event=on_event, cwd=workdir,
            log_path=workdir / "job.log", env=env, nice=spec.settings.nice,
        )
        try:
            await sup.start()
        except JobError as exc:
            raise LaunchError(str(exc)) from None
        self.current = sup
        return sup

    async def stop(self) -> None:
        """End the running job (and its process group), if any; not cancellable half-way."""
        sup, self.current = self.current, None
        if sup is not None:
            await asyncio.shield(sup.stop())


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copyfile(src, dst)


__all__ = ["JobLauncher", "LaunchError"]
