"""The sockets a node binds when it registers: its data and session listeners, and the TF
ports it advertises (held bound until the job starts, so nobody else takes them)."""

from __future__ import annotations

import socket


class Reservation:
    """Sockets bound at registration: data and session listeners, TF ports held until the job."""

    def __init__(self, host: str, data_port: int, session_port: int, tf_count: int) -> None:
        self.data_sock = _listener(host, data_port)
        self.session_sock = _listener(host, session_port)
        self.tf_socks = [_bound(host) for _ in range(tf_count)]
        self.data_port = self.data_sock.getsockname()[1]
        self.session_port = self.session_sock.getsockname()[1]
        self.tf_ports = [s.getsockname()[1] for s in self.tf_socks]

    def release_tf(self) -> None:
        for s in self.tf_socks:
            s.close()

    def close(self) -> None:
        for s in (self.data_sock, self.session_sock, *self.tf_socks):
            s.close()


def _listener(host: str, port: int) -> socket.socket:
    s = socket.create_server((host, port), reuse_port=False, backlog=64)
    s.setblocking(False)
    return s


def _bound(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    return s


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct free ports, all held open at once so none is handed out twice.

    They are released before returning, so another process may still take one: use a
    :class:`Reservation` where the caller keeps the sockets.
    """
    socks = [_bound(host) for _ in range(n)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


__all__ = ["Reservation", "free_port", "free_ports"]
