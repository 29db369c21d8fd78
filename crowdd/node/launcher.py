"""Starting this node's job child: its work directory, data links, spec and supervisor.

Holds the one job that runs (``current``) so the daemon can suspend, resume and stop it.
The spec's group-wide settings (K, steps per function, merge) come from the session plan;
only local things (threads, nice, checkpoint interval) come from this node's config. The job
child checks the spec when it starts (the trust boundary); the launcher does not check it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from crowdd.errors import CrowddError
from crowdd.platform.threads import thread_env
from crowdd.job.spec import Cluster, JobSpec, Settings, write_spec
from crowdd.manifest import Manifest
from crowdd.node.ports import Reservation
from crowdd.node.tunnels import RelaySetup
from crowdd.platform.userns import confined
from crowdd.plan import SessionPlan
from crowdd.node.supervisor import JobError, JobSupervisor, job_command


class LaunchError(CrowddError):
    """The job could not be started; the message is for the user."""


class JobLauncher:
    """Starts job children below ``jobs_dir``. ``local()`` gives this node's local job settings
    (threads, nice, checkpoint interval) at start."""

    def __init__(self, jobs_dir: Path, python: str, env: Mapping[str, str], local: Callable[[], Settings]) -> None:
        self._jobs_dir = jobs_dir
        self._python = python
        self._env = dict(env)
        self._local = local
        self.current: JobSupervisor | None = None

    def job_dir(self, plan: SessionPlan) -> Path:
        d = self._jobs_dir / f"{plan.group_id}-{plan.index}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def settings(self, plan: SessionPlan) -> Settings:
        """The job's settings: the plan's group-wide ones over this node's local ones."""
        g = plan.settings
        return dataclasses.replace(
            self._local(), steps_per_function=g.steps_per_function, sync_every=g.sync_every, merge=g.merge
        )

    async def start(
        self, plan: SessionPlan, task_index: int, cluster: dict[str, list[str]], data: Path, manifest: Manifest,
        on_event: Callable[[dict[str, Any]], None], res: Reservation, relay: RelaySetup,
    ) -> JobSupervisor:
        """Write the spec, free the reserved TF ports and start the job behind its relay, in its
        own network namespace when ``relay.isolated`` (raises :class:`LaunchError`)."""
        role = "host" if plan.is_host else "worker"
        workdir = self.job_dir(plan)
        _link(data, workdir / "dataset.bin")
        (workdir / "dataset.manifest.json").write_bytes(manifest.to_json())
        spec = JobSpec(
            role=role, index=task_index,
            cluster=Cluster(tuple(cluster["ps"]), tuple(cluster["worker"])),
            job=plan.job,
            data="dataset.bin", manifest="dataset.manifest.json",
            output_dir="output" if role == "host" else None,
            workdir=str(workdir),
            settings=self.settings(plan),
        )
        spec_path = workdir / "spec.json"
        write_spec(spec, spec_path)
        res.release_tf()
        env = {**self._env, **thread_env(spec.settings.threads)}
        command = [self._python, "-m", "crowdd.job.confine", *relay.argv(), "--", *job_command(role, spec_path, self._python)]
        if relay.isolated:
            command = confined(command)
        sup = JobSupervisor(
            command, on_event=on_event, cwd=workdir,
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
