"""``crowdd tui``: the terminal UI, a Textual client of the daemon's control socket.

Importing this package does not import textual; :func:`main` loads the app.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crowdd.config import Paths

SYSTEM_SOCKET = Path("/run/crowdd/control.sock")


def socket_path(args: argparse.Namespace) -> Path:
    """``--socket``, else the ``--root`` layout's, else the per-user socket (or the system one)."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    if getattr(args, "root", None):
        return Paths.under(Path(args.root)).control_socket
    user = Paths.for_user().control_socket
    if not user.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return user


def main(args: argparse.Namespace) -> int:
    """Run the TUI until the user quits (the daemon keeps running)."""
    from crowdd.tui.app import CrowddApp
    from crowdd.tui.client import ControlDaemonClient

    app = CrowddApp(ControlDaemonClient(socket_path(args)))
    app.run()
    return int(app.return_code or 0)


__all__ = ["SYSTEM_SOCKET", "main", "socket_path"]
