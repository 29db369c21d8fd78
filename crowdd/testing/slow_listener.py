"""A real TCP listener that answers a connection late, for tests of code that connects back.

Its accept queue is full (backlog 0, one connection already waiting), so the kernel drops each
new SYN and the client retransmits it (after 1 s, then 3 s, ...). :meth:`SlowListener.release`
accepts the waiting connection: the next retransmitted SYN is answered. Until then a
connection attempt is really in flight, with nothing stubbed.
"""

from __future__ import annotations

import socket
from types import TracebackType


class SlowListener:
    """``with SlowListener() as slow:``; ``slow.port``; ``slow.release()``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = socket.socket()
        self._server.bind((host, 0))
        self._server.listen(0)
        self.port: int = self._server.getsockname()[1]
        self._filler = socket.create_connection((host, self.port))  # fills the accept queue
        self._accepted: list[socket.socket] = []

    def release(self) -> None:
        """Accept the waiting connection: the queue has room for the next one."""
        conn, _ = self._server.accept()
        self._accepted.append(conn)

    def close(self) -> None:
        for s in (*self._accepted, self._filler, self._server):
            s.close()

    def __enter__(self) -> SlowListener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["SlowListener"]
