"""The job spec: parse and validate it before TensorFlow is imported (TF-free).

See ``docs/job-spec.md``. Every impossible value raises :class:`SpecError` naming the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crowdd.errors import InputError
from crowdd.config import JobConfig, parse_hostport
from crowdd.hyperparams import MERGES, HyperparamError, Job, validate_job
from crowdd.job import MODEL_FILE
from crowdd.job.shards import segments
from crowdd.data.manifest import Layout, Manifest, ManifestError

ROLES = ("host", "worker")
INDEX_FILE = "crowdd-worker-index"
_TOP = {"role", "index", "cluster", "job", "dataset", "workdir", "output_dir", "settings"}


class SpecError(InputError):
    """An impossible job spec; ``field`` names the culprit (dotted path)."""

    field: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


_DEFAULTS = JobConfig()
START_TIMEOUT = 300.0


@dataclass(frozen=True)
class Settings:
    """The spec's ``settings``; defaults are the daemon's ``[job]`` defaults (``JobConfig``)."""

    steps_per_function: int = _DEFAULTS.steps_per_function
    sync_every: int = _DEFAULTS.sync_every
    threads: int = _DEFAULTS.threads
    nice: int = _DEFAULTS.nice
    checkpoint_secs: float = _DEFAULTS.checkpoint_secs
    merge: str = _DEFAULTS.merge
    # seconds the host waits for every worker server to answer before it gives up
    start_timeout: float = START_TIMEOUT




@dataclass(frozen=True)
class Cluster:
    """The group's TF worker tasks (slot = index) and, for the host, its coordinator's own
    address. There is no parameter server: the coordinator holds the model."""

    worker: tuple[str, ...]
    chief: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        d = {"worker": list(self.worker)}
        if self.chief:
            d["chief"] = list(self.chief)
        return d

    @property
    def num_workers(self) -> int:
        return len(self.worker)


@dataclass(frozen=True)
class JobSpec:
    role: str
    index: int
    cluster: Cluster
    job: Job
    data: str
    manifest: str
    output_dir: str | None = None
    workdir: str | None = None
    settings: Settings = field(default_factory=Settings)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "role": self.role,
            "index": self.index,
            "cluster": self.cluster.to_dict(),
            "job": self.job.to_dict(),
            "dataset": {"data": self.data, "manifest": self.manifest},
            "settings": asdict(self.settings),
        }
        if self.output_dir is not None:
            d["output_dir"] = self.output_dir
        if self.workdir is not None:
            d["workdir"] = self.workdir
        return d

    def own_ports(self) -> dict[str, int]:
        """The ports this job's servers bind."""
        if self.role == "host":
            ports = {"worker": port_of(self.cluster.worker[0])}
            if self.cluster.chief:
                ports["chief"] = port_of(self.cluster.chief[0])
            return ports
        return {"worker": port_of(self.cluster.worker[self.index])}


def port_of(address: str) -> int:
    return parse_hostport(address, 0)[1]


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(name, "must be a non-empty string")
    if "\0" in value:
        raise SpecError(name, "must not contain NUL")
    return value


def _addresses(value: Any, name: str, lo: int, hi: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        raise SpecError(name, f"must be a list of {lo}..{hi} HOST:PORT strings")
    out = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, str):
            raise SpecError(where, f"must be a HOST:PORT string, got {item!r}")
        try:
            _host, port = parse_hostport(item, 0)
        except ValueError as exc:
            raise SpecError(where, str(exc)) from None
        if ":" not in item or not 1 <= port <= 65535:
            raise SpecError(where, f"needs an explicit port 1..65535, got {item!r}")
        out.append(item.strip())
    return tuple(out)


def _cluster(value: Any) -> Cluster:
    if not isinstance(value, Mapping):
        raise SpecError("cluster", "must be an object with a worker list")
    unknown = sorted(set(value) - {"worker", "chief"})
    if unknown:
        raise SpecError(f"cluster.{unknown[0]}", "unknown cluster job (expected worker, chief; there is no "
                        "parameter server: the host's coordinator holds the model)")
    workers = _addresses(value.get("worker"), "cluster.worker", 1, 1025)
    chief = _addresses(value["chief"], "cluster.chief", 1, 1) if "chief" in value else ()
    seen: dict[tuple[str, int], str] = {}
    for name, addrs in (("worker", workers), ("chief", chief)):
        for i, addr in enumerate(addrs):
            key = parse_hostport(addr, 0)
            if key in seen:
                raise SpecError(f"cluster.{name}[{i}]", f"{addr} is used twice (also {seen[key]})")
            seen[key] = f"cluster.{name}[{i}]"
    return Cluster(workers, chief)


def _settings(value: Any) -> Settings:
    if value is None:
        return Settings()
    if not isinstance(value, Mapping):
        raise SpecError("settings", "must be an object")
    base = Settings()
    unknown = sorted(set(value) - set(asdict(base)))
    if unknown:
        raise SpecError(f"settings.{unknown[0]}", "unknown setting")
    spf = _int(value.get("steps_per_function", base.steps_per_function), "settings.steps_per_function", 1, 100_000)
    sync = _int(value.get("sync_every", base.sync_every), "settings.sync_every", 1, 100_000)
    if sync > spf:
        raise SpecError("settings.sync_every", f"must be <= steps_per_function ({spf}), got {sync}")
    threads = _int(value.get("threads", base.threads), "settings.threads", 1, 256)
    nice = _int(value.get("nice", base.nice), "settings.nice", 0, 19)
    ck = value.get("checkpoint_secs", base.checkpoint_secs)
    if isinstance(ck, bool) or not isinstance(ck, (int, float)) or not 0 < ck < float("inf"):
        raise SpecError("settings.checkpoint_secs", f"must be a number > 0, got {ck!r}")
    merge = value.get("merge", base.merge)
    if merge not in MERGES:
        raise SpecError("settings.merge", f"must be one of {', '.join(MERGES)}, got {merge!r}")
    start = value.get("start_timeout", base.start_timeout)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 86_400:
        raise SpecError("settings.start_timeout", f"must be a number of seconds in (0, 86400], got {start!r}")
    return Settings(spf, sync, threads, nice, float(ck), merge, float(start))


def _resolve(path: str, workdir: str | None) -> Path:
    p = Path(path)
    if p.is_absolute() or workdir is None:
        return p
    return Path(workdir) / p


def load_layout(manifest_path: Path, data_path: Path) -> Layout:
    """Read the manifest and check the data file against its layout (size only: cheap)."""
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise SpecError("dataset.manifest", f"cannot read {manifest_path}: {exc.strerror or exc}") from None
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        raise SpecError("dataset.manifest", str(exc)) from None
    if manifest.layout is None:
        raise SpecError("dataset.manifest", "has no record layout (not a canonical dataset)")
    try:
        size = os.stat(data_path).st_size
    except OSError as exc:
        raise SpecError("dataset.data", f"cannot read {data_path}: {exc.strerror or exc}") from None
    if size != manifest.size:
        raise SpecError("dataset.data", f"{data_path} has {size} bytes, the manifest says {manifest.size}")
    return manifest.layout


def parse_spec(obj: Any, *, role: str | None = None, check_files: bool = True) -> JobSpec:
    """Validate a spec object; ``role`` is the one given on the command line."""
    if not isinstance(obj, Mapping):
        raise SpecError("spec", "must be a JSON object")
    unknown = sorted(set(obj) - _TOP)
    if unknown:
        raise SpecError(unknown[0], "unknown spec field")
    spec_role = obj.get("role")
    if spec_role not in ROLES:
        raise SpecError("role", f"must be host or worker, got {spec_role!r}")
    if role is not None and role != spec_role:
        raise SpecError("role", f"the command line says {role} but the spec says {spec_role}")
    cluster = _cluster(obj.get("cluster"))
    index = _int(obj.get("index"), "index", 0, cluster.num_workers - 1)
    if spec_role == "host" and index != 0:
        raise SpecError("index", f"the host is index 0, got {index}")
    if spec_role == "worker" and index == 0:
        raise SpecError("index", "a worker's index is >= 1 (worker 0 is the host's)")
    job_obj = obj.get("job")
    try:
        job = validate_job(job_obj if job_obj is not None else {})
    except HyperparamError as exc:
        raise SpecError(f"job.{exc.field}", exc.message) from None
    dataset = obj.get("dataset")
    if not isinstance(dataset, Mapping):
        raise SpecError("dataset", "must be an object with data and manifest paths")
    unknown = sorted(set(dataset) - {"data", "manifest"})
    if unknown:
        raise SpecError(f"dataset.{unknown[0]}", "unknown dataset field")
    data = _str(dataset.get("data"), "dataset.data")
    manifest = _str(dataset.get("manifest"), "dataset.manifest")
    workdir = obj.get("workdir")
    if workdir is not None:
        workdir = _str(workdir, "workdir")
        if check_files and not os.path.isdir(workdir):
            raise SpecError("workdir", f"{workdir} is not a directory")
    output_dir = obj.get("output_dir")
    if output_dir is not None:
        output_dir = _str(output_dir, "output_dir")
    elif spec_role == "host":
        raise SpecError("output_dir", "the host needs an output directory")
    settings = _settings(obj.get("settings"))
    spec = JobSpec(spec_role, index, cluster, job, data, manifest, output_dir, workdir, settings)
    if check_files:
        layout = load_layout(_resolve(manifest, workdir), _resolve(data, workdir))
        check_job_fits(spec, layout)
    return spec


def check_job_fits(spec: JobSpec, layout: Layout) -> None:
    """Refuse a job the dataset cannot feed (a shard smaller than one record, a CNN on flat data)."""
    count, _ = segments(spec.job.sharding, spec.cluster.num_workers)
    if layout.train_count // count < 1:
        raise SpecError(
            "job.sharding",
            f"{layout.train_count} training records cannot be cut into {count} segments",
        )
    if spec.job.model == "cnn" and len(layout.feature_shape) not in (2, 3):
        raise SpecError("job.model", f"cnn needs image data (HxW or HxWxC), got shape {list(layout.feature_shape)}")
    if spec.role == "host" and spec.job.model == "file" and not _resolve(MODEL_FILE, spec.workdir).is_file():
        raise SpecError("job.model", f"model 'file' needs the host's model as {MODEL_FILE} in the working directory")
    if layout.test_count < 1:
        raise SpecError("dataset.manifest", "the dataset has no test records to evaluate on")


def load_spec(path: str | Path, *, role: str | None = None, check_files: bool = True) -> JobSpec:
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("spec", f"cannot read {path}: {exc}") from None
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise SpecError("spec", f"{path} is not JSON: {exc}") from None
    return parse_spec(obj, role=role, check_files=check_files)


def spec_json(spec: JobSpec) -> bytes:
    return json.dumps(spec.to_dict(), indent=2).encode("utf-8")


def write_spec(spec: JobSpec, path: str | Path) -> None:
    Path(path).write_bytes(spec_json(spec))


__all__ = [
    "INDEX_FILE",
    "Cluster",
    "JobSpec",
    "Settings",
    "SpecError",
    "check_job_fits",
    "load_layout",
    "load_spec",
    "spec_json",
    "parse_spec",
    "port_of",
    "write_spec",
]
