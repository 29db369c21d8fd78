"""``crowdd tui``: the terminal UI, a Textual client of the daemon's control socket.

Importing this package does not import textual; :func:`main` loads the app.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crowdd.client.resolve import client_endpoint
from crowdd.protocol.endpoint import SYSTEM_SOCKET, client_socket


def socket_path(args: argparse.Namespace) -> Path:
    """``--socket``, else the ``--root`` layout's, else the per-user socket (or the system one)."""
    return client_socket(getattr(args, "socket", None), getattr(args, "root", None))


def main(args: argparse.Namespace) -> int:
    """Run the TUI until the user quits (the daemon keeps running)."""
    from crowdd.tui.app import CrowddApp
    from crowdd.client.daemon_client import ControlDaemonClient

    # the same endpoint the CLI uses: a Unix socket, or TCP + token where the node has one
    app = CrowddApp(ControlDaemonClient(client_endpoint(args)))
    app.run()
    return int(app.return_code or 0)


__all__ = ["SYSTEM_SOCKET", "main", "socket_path"]
