"""The ``crowdd`` command: the parser (main.py), the subcommands (commands.py), ``crowdd model``
(export.py) and ``crowdd demo`` (demo.py)."""

from crowdd.cli.main import main

__all__ = ["main"]
