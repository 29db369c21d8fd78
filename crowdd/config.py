"""Settings from TOML, paths from platformdirs.

Every section is a dataclass whose defaults are the documented defaults (see
``docs/crowdd.sample.toml``). :func:`load_config` reads a file and raises
:class:`ConfigError` naming the file, the key and what was expected; unknown keys and
sections are errors too, never ignored silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

import platformdirs

from crowdd.errors import InputError
from crowdd.hyperparams import MERGES
from crowdd.route import DEFAULT_CHUNK, DEFAULT_ROUTE

APP = "crowdd"
DEFAULT_MATCHMAKER_PORT = 7700


class ConfigError(InputError):
    """A bad configuration file or value; the message names the file and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(message, field=key)
        self.args = (f"{source}: {key}: {message}",)
        self.source = source
        self.key = key


@dataclass
class DaemonConfig:
    matchmaker: str = f"127.0.0.1:{DEFAULT_MATCHMAKER_PORT}"
    name: str = ""
    listen_host: str = "0.0.0.0"
    advertise_host: str = ""
    data_port: int = 0
    session_port: int = 0
    tag: str = ""
    want_tag: str = ""
    heartbeat: float = 5.0
    peer_timeout: float = 15.0
    retry_min: float = 1.0
    retry_max: float = 60.0
    matchmaker_fingerprint: str = ""


@dataclass
class MatchmakerConfig:
    listen: str = f"0.0.0.0:{DEFAULT_MATCHMAKER_PORT}"
    max_clients: int = 20_000
    max_per_ip: int = 256
    max_handshaking_per_ip: int = 64
    max_handshaking: int = 8192
    heartbeat_timeout: float = 30.0
    read_timeout: float = 10.0
    max_frame: int = 1 << 20
    status_interval: float = 60.0
    trust_advertised: bool = False
    check_reachable: bool = True
    reach_timeout: float = 3.0


@dataclass
class ReplicationConfig:
    route: str = DEFAULT_ROUTE
    chunk_size: int = DEFAULT_CHUNK
    stall_timeout: float = 10.0
    #: cap on the upload bandwidth for serving the dataset to other members (0 = none)
    max_upload_mbit: float = 0.0

    def upload_rate(self) -> float | None:
        """The cap in bytes per second, or None."""
        return self.max_upload_mbit * 1e6 / 8 if self.max_upload_mbit > 0 else None


@dataclass
class LimitsConfig:
    #: the dataset cache and the job directories together; pruned oldest first (0 = no cap)
    disk_max_gb: float = 20.0


@dataclass
class JobConfig:
    # group-wide defaults (the host's count): the fastest to a target accuracy measured on
    # emulated volunteer machines (benchmarks/scaling.py; docs/scaling.md)
    steps_per_function: int = 200
    sync_every: int = 200
    merge: str = "average"
    threads: int = 1
    nice: int = 19
    checkpoint_secs: float = 30.0
    max_memory_mb: int = 4096  # the whole job (its TF servers too); 0 = no cap


@dataclass
class IdleConfig:
    user_idle_minutes: float = 5.0
    max_other_cpu_percent: float = 30.0
    cpu_window_seconds: float = 60.0
    allow_on_battery: bool = False
    battery_resume_percent: float = 90.0
    schedule: list[str] = field(default_factory=list)
    on_busy: str = "suspend"
    tf_threads: int = 1


@dataclass
class SecurityConfig:
    allow_exposed_tensorflow: bool = False
    allow_unsandboxed: bool = False


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    matchmaker: MatchmakerConfig = field(default_factory=MatchmakerConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    job: JobConfig = field(default_factory=JobConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("replication", "route"): ("binomial", "chain", "star"),
    ("idle", "on_busy"): ("suspend", "leave"),
    ("job", "merge"): MERGES,
}
_POSITIVE = {
    ("daemon", "heartbeat"), ("daemon", "peer_timeout"), ("daemon", "retry_min"), ("daemon", "retry_max"),
    ("matchmaker", "max_clients"), ("matchmaker", "max_per_ip"), ("matchmaker", "heartbeat_timeout"),
    ("matchmaker", "max_handshaking_per_ip"), ("matchmaker", "max_handshaking"),
    ("matchmaker", "read_timeout"), ("matchmaker", "max_frame"), ("matchmaker", "status_interval"),
    ("matchmaker", "reach_timeout"),
    ("replication", "chunk_size"), ("replication", "stall_timeout"),
    ("job", "steps_per_function"), ("job", "sync_every"), ("job", "threads"), ("job", "checkpoint_secs"),
    ("idle", "cpu_window_seconds"), ("idle", "tf_threads"),
}
_NOT_NEGATIVE = {("replication", "max_upload_mbit"), ("limits", "disk_max_gb")}
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_PORTS = {("daemon", "data_port"), ("daemon", "session_port")}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(source: str, key: str, tp: Any, value: Any) -> Any:
    expected = _type_name(tp)
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected {expected}, got {value!r}")
        return [_coerce(source, f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(source, key, f"expected {expected}, got {value!r}")
    return value


def _check(source: str, section: str, name: str, value: Any) -> None:
    key = f"{section}.{name}"
    choices = _CHOICES.get((section, name))
    if choices and value not in choices:
        raise ConfigError(source, key, f"expected one of {', '.join(choices)}, got {value!r}")
    if (section, name) in _POSITIVE and not value > 0:
        raise ConfigError(source, key, f"expected a value > 0, got {value!r}")
    if (section, name) in _PORTS and not 0 <= value <= 65535:
        raise ConfigError(source, key, f"expected a port 0..65535 (0 = any free port), got {value!r}")
    if (section, name) == ("job", "max_memory_mb") and not (value == 0 or value >= 64):
        raise ConfigError(source, key, f"expected a number of MB >= 64 (0 = no cap), got {value!r}")
    if (section, name) in _NOT_NEGATIVE and value < 0:
        raise ConfigError(source, key, f"expected a value >= 0 (0 = no cap), got {value!r}")
    if (section, name) == ("job", "nice") and not -20 <= value <= 19:
        raise ConfigError(source, key, f"expected a nice value -20..19, got {value!r}")
    if key == "daemon.matchmaker_fingerprint" and value and not _FINGERPRINT.fullmatch(value):
        raise ConfigError(source, key, f"expected \"sha256:\" and 64 lowercase hex digits (crowdd matchmaker prints it), got {value!r}")
    if key in ("daemon.matchmaker", "matchmaker.listen"):
        try:
            parse_hostport(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Build a :class:`Config` from parsed TOML, checking every key."""
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(source, section, f"unknown section (known: {', '.join(sorted(sections))})")
        if not isinstance(values, dict):
            raise ConfigError(source, section, "expected a table")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(source, f"{section}.{name}", f"unknown key (known: {', '.join(sorted(hints))})")
            value = _coerce(source, f"{section}.{name}", hints[name], value)
            _check(source, section, name, value)
            setattr(target, name, value)
    return cfg


def load_config(path: Path | str | None) -> Config:
    """Load settings from ``path``; a missing path gives the defaults (None = defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (FileNotFoundError, NotADirectoryError):
        return Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot read: {exc.strerror}") from None
    return config_from_dict(data, str(path))


def parse_hostport(value: str, default_port: int = DEFAULT_MATCHMAKER_PORT) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``"host"`` → (host, port)."""
    value = value.strip()
    if not value:
        raise ValueError("expected HOST:PORT, got an empty string")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    else:
        host, port_s = value, ""
    if not port_s:
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0..65535, got {value!r}")
    return host or "0.0.0.0", int(port_s)


@dataclass(frozen=True)
class Paths:
    """Where crowdd keeps its files."""

    config_file: Path
    state_dir: Path
    cache_dir: Path
    log_dir: Path
    runtime_dir: Path

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def dataset_cache(self) -> Path:
        return self.cache_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @property
    def identity_dir(self) -> Path:
        """This node's TLS key and certificate (:mod:`crowdd.trust.identity`)."""
        return self.state_dir / "identity"

    @classmethod
    def for_user(cls) -> Paths:
        d = platformdirs.PlatformDirs(APP, appauthor=False)
        runtime = Path(d.user_runtime_dir)
        return cls(
            config_file=Path(d.user_config_dir) / "crowdd.toml",
            state_dir=Path(d.user_data_dir),
            cache_dir=Path(d.user_cache_dir),
            log_dir=Path(d.user_log_dir),
            runtime_dir=runtime,
        )

    @classmethod
    def for_system(cls) -> Paths:
        """The system service's layout (systemd StateDirectory/RuntimeDirectory)."""
        state = Path(os.environ.get("STATE_DIRECTORY", "/var/lib/crowdd"))
        return cls(
            config_file=Path("/etc/crowdd/crowdd.toml"),
            state_dir=state,
            cache_dir=state / "cache",
            log_dir=Path(os.environ.get("LOGS_DIRECTORY", "/var/log/crowdd")),
            runtime_dir=Path(os.environ.get("RUNTIME_DIRECTORY", "/run/crowdd")),
        )

    @classmethod
    def under(cls, root: Path) -> Paths:
        """Everything below one directory (demo nodes, tests)."""
        root = Path(root)
        return cls(
            config_file=root / "crowdd.toml",
            state_dir=root / "state",
            cache_dir=root / "cache",
            log_dir=root / "log",
            runtime_dir=root / "run",
        )

    def ensure(self) -> None:
        for d in (self.state_dir, self.cache_dir, self.log_dir, self.runtime_dir):
            d.mkdir(parents=True, exist_ok=True)
