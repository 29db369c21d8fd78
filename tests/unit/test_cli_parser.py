"""The ``crowdd`` front end: help, version, subcommands, bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from crowdd import __version__
from crowdd.cli.main import build_parser, main

SUBCOMMANDS = ("matchmaker", "daemon", "status", "donate", "pause", "resume", "host", "stop", "reload", "tui", "demo")


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crowdd", *argv], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"crowdd {__version__}"


def test_help_lists_every_subcommand() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in SUBCOMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([name, "--help"])
    assert exc.value.code == 0
    assert "usage: crowdd " + name in capsys.readouterr().out


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_bad_config_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "crowdd.toml"
    cfg.write_text('[matchmaker]\nmax_clients = "many"\n')
    assert main(["matchmaker", "--config", str(cfg), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "matchmaker.max_clients" in err and "integer" in err
