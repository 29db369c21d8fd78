"""packaging/windows/install.ps1 installs crowdd from a wheel or a checkout (crowdd is on no
package index). PowerShell is not run here; the script's text is checked against the docs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "packaging" / "windows" / "install.ps1").read_text()
DOC = (ROOT / "docs" / "install.md").read_text()


def test_it_installs_a_wheel_or_a_checkout_not_an_index_name() -> None:
    assert re.search(r"\[string\]\$Source\b", SCRIPT)
    pip_lines = [line for line in SCRIPT.splitlines() if "-m pip install" in line]
    assert pip_lines and all("$src" in line for line in pip_lines), pip_lines
    assert not re.search(r"pip install[^\n]*\bcrowdd\b(?!\S)", SCRIPT.replace("$src", "")), "installs by index name"
    # the default source is the checkout the script sits in; a wheel install has none, and says so
    assert 'Join-Path $PSScriptRoot "..\\.."' in SCRIPT and "pyproject.toml" in SCRIPT
    assert "pass -Source" in SCRIPT


def test_the_docs_describe_the_same_options() -> None:
    assert "-Source C:\\path\\to\\crowdd-0.1.0-py3-none-any.whl" in DOC
    assert "pip install this checkout + pywin32" in DOC
    assert "pip install crowdd" not in DOC
