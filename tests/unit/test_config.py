"""Settings from TOML: defaults, the sample file, and every kind of bad file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from crowdd.config import (
    Config,
    ConfigError,
    Paths,
    config_from_dict,
    load_config,
    parse_hostport,
)

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "crowdd.sample.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "crowdd.toml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    cfg = Config()
    assert cfg.matchmaker.listen == "0.0.0.0:7700"
    assert cfg.matchmaker.max_frame == 1 << 20
    assert cfg.matchmaker.trust_advertised is False
    assert cfg.daemon.heartbeat == 5.0
    assert cfg.idle.schedule == []


def test_missing_file_or_none_gives_defaults(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    assert load_config(tmp_path / "absent.toml") == Config()


def test_sample_file_loads_and_equals_defaults() -> None:
    assert load_config(SAMPLE) == Config()


def test_sample_file_documents_every_key() -> None:
    """Every key appears (uncommented) in the sample, so the sample is the full reference."""
    import tomllib

    data = tomllib.loads(SAMPLE.read_text())
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(data[section.name]) == keys, section.name


def test_values_are_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
[matchmaker]
listen = "127.0.0.1:9000"
max_clients = 5
heartbeat_timeout = 3      # an integer is fine for a float
trust_advertised = true
[idle]
schedule = ["mon-fri 18:00-08:00"]
"""))
    assert cfg.matchmaker.listen == "127.0.0.1:9000"
    assert cfg.matchmaker.max_clients == 5
    assert cfg.matchmaker.heartbeat_timeout == 3.0 and isinstance(cfg.matchmaker.heartbeat_timeout, float)
    assert cfg.matchmaker.trust_advertised is True
    assert cfg.idle.schedule == ["mon-fri 18:00-08:00"]
    assert cfg.daemon == Config().daemon  # untouched sections keep their defaults


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[matchmaker]\nmax_clients = \"many\"\n", "matchmaker.max_clients", "an integer"),
        ("[matchmaker]\nmax_clients = 1.5\n", "matchmaker.max_clients", "an integer"),
        ("[matchmaker]\nmax_clients = true\n", "matchmaker.max_clients", "an integer"),
        ("[matchmaker]\ntrust_advertised = \"yes\"\n", "matchmaker.trust_advertised", "true or false"),
        ("[matchmaker]\nheartbeat_timeout = \"1\"\n", "matchmaker.heartbeat_timeout", "a number"),
        ("[daemon]\nname = 3\n", "daemon.name", "a string"),
        ("[idle]\nschedule = \"mon 1:00-2:00\"\n", "idle.schedule", "a list of str"),
        ("[idle]\nschedule = [1]\n", "idle.schedule[0]", "a string"),
        ("[matchmaker]\nmax_clients = 0\n", "matchmaker.max_clients", "> 0"),
        ("[matchmaker]\nheartbeat_timeout = -1\n", "matchmaker.heartbeat_timeout", "> 0"),
        ("[daemon]\ndata_port = 70000\n", "daemon.data_port", "port"),
        ("[job]\nnice = 40\n", "job.nice", "nice"),
        ("[matchmaker]\nlisten = \"host:port\"\n", "matchmaker.listen", "HOST:PORT"),
        ("[daemon]\nmatchmaker = \"\"\n", "daemon.matchmaker", "HOST:PORT"),
        ("[replication]\nroute = \"random\"\n", "replication.route", "one of binomial, chain, star"),
        ("[idle]\non_busy = \"panic\"\n", "idle.on_busy", "one of suspend, leave"),
        ("[matchmaker]\nmax_client = 5\n", "matchmaker.max_client", "unknown key"),
        ("[matchmakr]\nlisten = \"x\"\n", "matchmakr", "unknown section"),
        ("matchmaker = 5\n", "matchmaker", "expected a table"),
        ("[matchmaker\n", "(syntax)", "not valid TOML"),
        ("[matchmaker]\nlisten = \n", "(syntax)", "not valid TOML"),
    ],
    ids=[
        "str-for-int", "float-for-int", "bool-for-int", "str-for-bool", "str-for-float", "int-for-str",
        "str-for-list", "list-item", "zero", "negative", "port-range", "nice-range", "bad-listen",
        "empty-hostport", "bad-route", "bad-on-busy", "unknown-key", "unknown-section", "not-a-table",
        "bad-toml", "bad-toml-value",
    ],
)
def test_bad_files_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert fragment in err.message
    assert str(path) in str(err) and key in str(err)


def test_unreadable_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(d)
    assert info.value.key == "(file)" and str(d) in str(info.value)


def test_unknown_key_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: .*max_per_ip"):
        config_from_dict({"matchmaker": {"nope": 1}}, "x.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7701", ("127.0.0.1", 7701)),
        ("example.org", ("example.org", 7700)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]", ("::1", 7700)),
        (":9000", ("0.0.0.0", 9000)),
        ("h:0", ("h", 0)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "h:port", "h:70000", "h:-1"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport(text)


def test_paths_under(tmp_path: Path) -> None:
    p = Paths.under(tmp_path)
    assert p.config_file == tmp_path / "crowdd.toml"
    assert p.control_socket == tmp_path / "run" / "control.sock"
    p.ensure()
    assert all(d.is_dir() for d in (p.state_dir, p.cache_dir, p.log_dir, p.runtime_dir))


def test_limits_and_upload_cap(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[limits]\ndisk_max_gb = 1.5\n[replication]\nmax_upload_mbit = 8\n"))
    assert cfg.limits.disk_max_gb == 1.5
    assert cfg.replication.upload_rate() == 1_000_000.0  # 8 Mbit/s = 1 MB/s
    assert Config().replication.upload_rate() is None and Config().limits.disk_max_gb == 20.0
    for text, key in (("[limits]\ndisk_max_gb = -1\n", "limits.disk_max_gb"),
                      ("[replication]\nmax_upload_mbit = -0.5\n", "replication.max_upload_mbit")):
        with pytest.raises(ConfigError, match="expected a value >= 0") as err:
            load_config(write(tmp_path, text))
        assert err.value.key == key
