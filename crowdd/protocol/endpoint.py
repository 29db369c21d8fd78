"""Where a daemon's control socket lives, for its server and its clients.

A Unix socket (user mode: the runtime dir, mode 0600; system mode: ``/run/crowdd/control.sock``,
group ``crowdd``, mode 0660), or on Windows loopback TCP plus a random token kept in a file only
the user can read, with the daemon's TLS fingerprint (:class:`TokenFile`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from crowdd.config import Paths
from crowdd.errors import Unavailable

#: The system service's control socket (systemd ``RuntimeDirectory=crowdd``).
SYSTEM_SOCKET = Path("/run/crowdd/control.sock")


def how_to_start(system: bool = False) -> str:
    if sys.platform == "win32":
        return "start it with `crowdd daemon` (or start the crowdd Windows service)"
    if system:
        return "start it with `sudo systemctl start crowdd` (or run `crowdd daemon --system`)"
    return "start it with `crowdd daemon` (or `systemctl --user start crowdd`)"


@dataclass(frozen=True)
class Endpoint:
    """Where the control socket is: a Unix socket path, or loopback TCP + a token file."""

    path: Path | None = None
    token_file: Path | None = None
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 0
    system: bool = False

    @property
    def is_tcp(self) -> bool:
        return self.path is None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"loopback TCP (token file {self.token_file})"

    @classmethod
    def for_paths(
        cls, paths: Paths, *, system: bool = False, socket_path: Path | None = None, tcp: bool | None = None
    ) -> Endpoint:
        """The endpoint for a node's paths: Unix socket, or TCP + token on Windows."""
        use_tcp = sys.platform == "win32" if tcp is None else tcp
        if use_tcp:
            return cls(path=None, token_file=paths.runtime_dir / "control.token", system=system)
        return cls(path=socket_path or paths.control_socket, system=system)


def client_socket(
    socket: Path | str | None = None,
    root: Path | str | None = None,
    *,
    system: bool = False,
    user_socket: Path | None = None,
    system_socket: Path = SYSTEM_SOCKET,
) -> Path:
    """The control socket a client (CLI, TUI) talks to: ``--socket``; else the ``--root``
    layout's; else ``--system``'s; else the per-user socket, or the system service's when
    there is no per-user one and the system one exists (a volunteer who installed the service
    needs no flag). ``user_socket``/``system_socket`` default to the real locations."""
    if socket:
        return Path(socket)
    if root:
        return Paths.under(Path(root)).control_socket
    if system:
        return system_socket
    user = user_socket if user_socket is not None else Paths.for_user().control_socket
    if not user.exists() and system_socket.exists():
        return system_socket
    return user


class TokenFile(NamedTuple):
    """What a TCP control client needs: where, the token, and the daemon's TLS fingerprint."""

    host: str
    port: int
    token: str
    fingerprint: str


def write_token_file(path: Path, tf: TokenFile) -> None:
    """Write the TCP endpoint, its token and the daemon's certificate fingerprint to a file only
    this user can read (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(tf._asdict()).encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # On Windows the per-user profile directory's ACL does the real work.
    os.replace(tmp, path)


def read_token_file(path: Path) -> TokenFile:
    try:
        data = json.loads(path.read_text())
        return TokenFile(str(data["host"]), int(data["port"]), str(data["token"]), str(data["fingerprint"]))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"the control token file {path} is unreadable ({exc})") from None


__all__ = ["SYSTEM_SOCKET", "Endpoint", "TokenFile", "client_socket", "how_to_start", "read_token_file",
           "write_token_file"]
