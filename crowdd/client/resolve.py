"""Which settings, paths and daemon endpoint a client command uses.

``--root`` > ``--system`` > per user. Used by every CLI subcommand, the TUI and the matchmaker
command, so no module needs :mod:`crowdd.cli`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crowdd.config import Config, ConfigError, Paths, load_config
from crowdd.protocol.endpoint import SYSTEM_SOCKET, Endpoint, client_socket


def resolve_config(args: argparse.Namespace) -> tuple[Config, Paths]:
    """The settings and paths a subcommand uses (``--root`` > ``--system`` > per user)."""
    if getattr(args, "root", None):
        paths = Paths.under(args.root)
    elif getattr(args, "system", False):
        paths = Paths.for_system()
    else:
        paths = Paths.for_user()
    cfg_file = getattr(args, "config", None) or paths.config_file
    return load_config(cfg_file), paths


def node_paths(args: argparse.Namespace) -> Paths:
    """The node's paths. A client needs no settings, so a broken config file must not stop
    `crowdd status` or `crowdd reload` (which reports the error from the daemon)."""
    try:
        return resolve_config(args)[1]
    except ConfigError:
        if getattr(args, "root", None):
            return Paths.under(args.root)
        return Paths.for_system() if getattr(args, "system", False) else Paths.for_user()


def client_endpoint(
    args: argparse.Namespace, *, user_socket: Path | None = None, system_socket: Path = SYSTEM_SOCKET
) -> Endpoint:
    """The daemon a client talks to: the TCP + token endpoint where the node uses one, else
    the Unix socket (see :func:`crowdd.protocol.endpoint.client_socket`: the system service's socket when
    there is no per-user one). The socket paths are injectable for tests."""
    system = bool(getattr(args, "system", False))
    endpoint = Endpoint.for_paths(node_paths(args), system=system)
    if endpoint.is_tcp:
        return endpoint
    path = client_socket(getattr(args, "socket", None), getattr(args, "root", None), system=system,
                         user_socket=user_socket, system_socket=system_socket)
    return Endpoint(path=path, system=system or path == system_socket)


__all__ = ["client_endpoint", "node_paths", "resolve_config"]
