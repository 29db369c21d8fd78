"""Starting this node's job child: its work directory, data links, spec and supervisor.

Holds the one job that runs (``current``) so the daemon can suspend, resume and stop it.
The spec's group-wide settings (K, steps per function, merge) come from the session plan;
only local things (threads, nice, checkpoint interval) come from this node's config. The job
child checks the spec when it starts (the trust boundary); the launcher does not check it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crowdd.errors import CrowddError
from crowdd.node import disk
from crowdd.platform import jobfiles
from crowdd.platform.cgroups import CgroupUnavailable, JobCgroup, JobCgroups
from crowdd.platform.jobenv import job_env
from crowdd.platform.process import SAFE_PATH
from crowdd.config import parse_hostport
from crowdd.job.spec import Cluster, JobSpec, Settings, port_of, spec_json
from crowdd.data.manifest import Manifest
from crowdd.node.ports import Reservation
from crowdd.node.tunnels import RelaySetup
from crowdd.platform.userns import confined
from crowdd.plan import SessionPlan
from crowdd.node.supervisor import JobError, JobSupervisor, job_command


logger = logging.getLogger(__name__)


class LaunchError(CrowddError):
    """The job could not be started; the message is for the user."""


@dataclass(frozen=True)
class JobLimits:
    """How this node runs a job: in the Landlock sandbox or not, its memory cap in MB (0 =
    none) over the job and all its processes, and the node's disk cap in bytes (0 = none), of
    which the job's directory may hold what the cache and the other jobs leave."""

    sandbox: bool = True
    max_memory_mb: int = 0
    disk_cap_bytes: int = 0


#: the least room a job's directory needs (its checkpoints, log and a host's model)
MIN_JOB_DISK = 64 * 10**6


class JobLauncher:
    """Starts job children below ``jobs_dir``. ``local()`` gives this node's local job settings
    (threads, nice, checkpoint interval) at start. ``guard``: directories no runtime path of a
    sandboxed job may expose (the daemon's state, config, cache). ``cgroups``: where each job
    gets a cgroup with hard caps (the daemon sets it once it has looked; None: the memory cap is
    a poll)."""

    def __init__(
        self, jobs_dir: Path, python: str, env: Mapping[str, str], local: Callable[[], Settings],
        guard: tuple[Path, ...] = (), dataset_cache: Path | None = None,
    ) -> None:
        self._jobs_dir = jobs_dir
        self._dataset_cache = dataset_cache
        self._guard = guard
        self._python = python
        self._env = dict(env)
        self._local = local
        self.current: JobSupervisor | None = None
        self.cgroups: JobCgroups | None = None

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
        limits: JobLimits = JobLimits(),
    ) -> JobSupervisor:
        """Write the spec, free the reserved TF ports and start the job behind its relay, in its
        own network namespace when ``relay.isolated``, in its sandbox when ``limits.sandbox``
        (raises :class:`LaunchError`). Every member's TF graph reads ``dataset.bin`` in its work
        directory: a symbolic link to the cache's file, which the sandbox keeps read-only (a
        hard link would share the work directory's write access)."""
        role = "host" if plan.is_host else "worker"
        workdir = self.job_dir(plan)
        # a resumed job's directory holds what its graphs wrote (a link, a directory where a file
        # was): never write through a link there, and replace whatever stands in the way
        try:
            jobfiles.link(workdir, "dataset.bin", data.resolve())
            jobfiles.write(workdir, "dataset.manifest.json", manifest.to_json())
        except jobfiles.JobFileError as exc:
            raise LaunchError(f"cannot prepare the job's directory: {exc.message}") from None
        spec = JobSpec(
            role=role, index=task_index,
            cluster=job_cluster(cluster, role),
            job=plan.job,
            data="dataset.bin", manifest="dataset.manifest.json",
            output_dir="output" if role == "host" else None,
            workdir=str(workdir),
            settings=self.settings(plan),
        )
        spec_path = workdir / "spec.json"
        try:
            jobfiles.write(workdir, "spec.json", spec_json(spec))
        except jobfiles.JobFileError as exc:
            raise LaunchError(f"cannot prepare the job's directory: {exc.message}") from None
        room = self._disk_room(workdir, limits.disk_cap_bytes)
        res.release_tf()
        env = job_env(self._env, workdir, spec.settings.threads)  # an allowlist: never the daemon's own
        command = [self._python, SAFE_PATH, "-m", "crowdd.job.confine", *relay.argv(), *(sandbox_argv(workdir, data, spec.cluster, self._guard) if limits.sandbox else []),
                   "--", *job_command(role, spec_path, self._python)]
        if relay.isolated:
            command = confined(command, private_view=relay.private_view)
        sup = JobSupervisor(
            command, on_event=on_event, cwd=workdir,
            log_path=workdir / "job.log", env=env, nice=spec.settings.nice, max_memory_mb=limits.max_memory_mb,
            cgroup=self._cgroup(workdir.name, limits.max_memory_mb), max_disk_bytes=room,
        )
        try:
            await sup.start()
        except JobError as exc:
            raise LaunchError(str(exc)) from None
        self.current = sup
        return sup

    def _disk_room(self, workdir: Path, cap: int) -> int:
        """What the job's directory may hold (0: no cap); raises :class:`LaunchError` when the
        cap leaves too little."""
        if not cap:
            return 0
        cache = self._dataset_cache if self._dataset_cache is not None else self._jobs_dir / "nonexistent"
        room = disk.job_allowance(cache, self._jobs_dir, cap, workdir)
        if room < MIN_JOB_DISK:
            raise LaunchError(f"this node's disk cap ([limits] disk_max_gb) leaves {room / 1e6:,.0f} MB for the "
                              f"job's files, under the {MIN_JOB_DISK / 1e6:,.0f} MB it needs: raise the cap")
        return room

    def _cgroup(self, name: str, memory_mb: int) -> JobCgroup | None:
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(name, memory_mb)
        except CgroupUnavailable as exc:
            logger.warning("the job's memory cap is a poll: %s", exc)
            return None

    async def stop(self) -> None:
        """End the running job (and its process group), if any; not cancellable half-way."""
        sup, self.current = self.current, None
        if sup is not None:
            await asyncio.shield(sup.stop())


def job_cluster(cluster: dict[str, list[str]], role: str) -> Cluster:
    """The job's cluster; the host's coordinator gets its own port after the group's (else TF
    would pick one at random, which its sandbox could not allow it to bind)."""
    workers = tuple(cluster["worker"])
    if role != "host":
        return Cluster(workers)
    host, _ = parse_hostport(workers[0], 0)
    last = max(port_of(a) for a in workers)
    return Cluster(workers, (f"{host}:{last + 1}",))


def sandbox_argv(workdir: Path, data: Path, cluster: Cluster, guard: Sequence[Path] = ()) -> list[str]:
    """The relay's arguments that run a job in its sandbox (:mod:`crowdd.job.confine`)."""
    out = ["--sandbox", "--workdir", str(workdir), "--data", str(data.resolve())]
    out += [a for addr in cluster.chief for a in ("--own", str(port_of(addr)))]
    return out + [a for g in guard for a in ("--guard", str(g))]



__all__ = ["MIN_JOB_DISK", "JobLauncher", "JobLimits", "LaunchError", "job_cluster", "sandbox_argv"]
