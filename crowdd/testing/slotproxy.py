"""TCP proxies in front of TF worker slots, as the host daemon's relay is (tests).

They run in a child process (:class:`ProxyProcess`): TensorFlow holds the GIL in some
blocking calls, so a proxy in the TF client's own process could stall its own RPCs.

``cut()`` closes every connection through it and closes each new one at once (what the
daemon does when it removes a slot from the members file); ``uncut()`` forwards again. A
connection that cannot reach the target (no server behind the slot yet) is closed.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading

log = logging.getLogger(__name__)


class SlotProxy:
    """Listens on ``127.0.0.1:listen_port`` and forwards to ``127.0.0.1:target_port``."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", listen_port))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._accept, name=f"slotproxy-{listen_port}", daemon=True)
        self._thread.start()

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def uncut(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._sock)
        self._thread.join(timeout=2)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self._cut:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._cut:
                    _close(client)
                    _close(upstream)
                    continue
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class ProxyProcess:
    """Proxies ``{listen_port: target_port}`` in a child process; ``cut``/``uncut`` by listen port."""

    def __init__(self, ports: dict[int, int]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crowdd.testing.slotproxy", json.dumps({str(k): v for k, v in ports.items()})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self._lock = threading.Lock()
        self._ask("ping")

    def _ask(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"slot proxy: {line!r} -> {answer!r}")

    def cut(self, listen_port: int) -> None:
        self._ask(f"cut {listen_port}")

    def uncut(self, listen_port: int) -> None:
        self._ask(f"uncut {listen_port}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


def main() -> int:
    ports = {int(k): int(v) for k, v in json.loads(sys.argv[1]).items()}
    proxies = {k: SlotProxy(k, v) for k, v in ports.items()}
    for line in sys.stdin:
        words = line.split()
        if words == ["ping"]:
            pass
        elif len(words) == 2 and words[0] in ("cut", "uncut") and int(words[1]) in proxies:
            getattr(proxies[int(words[1])], words[0])()
        else:
            print(f"bad command {line.strip()!r}", flush=True)
            continue
        print("ok", flush=True)
    for proxy in proxies.values():
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ProxyProcess", "SlotProxy"]
