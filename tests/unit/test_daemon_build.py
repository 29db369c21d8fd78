"""One node, assembled one way: ``build()`` behind both ``crowdd daemon`` (``run()``) and the
Windows service's entry (tests/unit/test_service_runner.py runs that one for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crowdd.config import Config, Paths
from crowdd.node.daemon import Daemon
from crowdd.node.entry import build, run


def test_build_assembles_the_node_from_config_and_paths(tmp_path: Path) -> None:
    paths = Paths.under(tmp_path)
    d = build(Config(), paths, matchmaker="127.0.0.1:7700")
    assert isinstance(d, Daemon) and d.paths == paths and not d.donating


def test_a_bad_matchmaker_address_is_refused_clearly_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths.under(tmp_path / "node")
    assert run(Config(), paths, matchmaker="nohost:notaport") == 2
    err = capsys.readouterr().err
    assert "crowdd daemon: bad --matchmaker" in err and "nohost:notaport" in err
    assert not (tmp_path / "node").exists()  # nothing made
    with pytest.raises(ValueError):
        build(Config(), paths, matchmaker="nohost:notaport")
