"""sd_notify(3) by the protocol, without libsystemd.

systemd hands a ``Type=notify`` service the path of an ``AF_UNIX`` datagram socket in
``NOTIFY_SOCKET`` (a leading ``@`` means a Linux abstract socket) and, with ``WatchdogSec=``,
the watchdog period in ``WATCHDOG_USEC`` (for the process in ``WATCHDOG_PID``, if set).
The service sends newline-separated ``KEY=VALUE`` lines as one datagram: ``READY=1``,
``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``.

Outside systemd (no ``NOTIFY_SOCKET``) every method does nothing. :meth:`Notifier.from_env`
removes the variables from the environment it reads, so children (the TF job) never inherit
them and cannot talk to systemd in the daemon's name. A failed send is logged, never raised:
the daemon must not die because the service manager went away.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | bytes | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value, or None if unusable."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    # vsock:... (VMs) and anything else: not something this process can reach over AF_UNIX
    logger.warning("NOTIFY_SOCKET=%r is not an AF_UNIX path or abstract name; sd_notify disabled", value)
    return None


def _watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    usec_s = environ.get("WATCHDOG_USEC")
    if not usec_s:
        return None
    wd_pid = environ.get("WATCHDOG_PID")
    if wd_pid:
        try:
            if int(wd_pid) != pid:
                return None  # the watchdog belongs to another process (e.g. our parent)
        except ValueError:
            logger.warning("WATCHDOG_PID=%r is not a number; watchdog disabled", wd_pid)
            return None
    try:
        usec = int(usec_s)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not a number; watchdog disabled", usec_s)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000  # ping at half the period, as sd_watchdog_enabled(3) advises


class Notifier:
    """Tell the service manager about this process; a no-op when ``address`` is None."""

    def __init__(self, address: str | bytes | None = None, watchdog_interval: float | None = None) -> None:
        self._address = address
        self._watchdog_interval = watchdog_interval
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """Read and remove ``NOTIFY_SOCKET``/``WATCHDOG_*`` from ``environ`` (default ``os.environ``)."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        address = _address(value) if value else None
        interval = _watchdog_interval(env, os.getpid() if pid is None else pid) if address is not None else None
        for name in NOTIFY_VARS:
            env.pop(name, None)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), None if no watchdog."""
        return self._watchdog_interval

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if sent, False if disabled or failed."""
        if self._address is None:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"sd_notify lines are KEY=VALUE without newlines, got {line!r}")
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", lines[0].split("=", 1)[0] if lines else "", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` — send only once the control socket and listeners are bound."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``; does nothing if systemd set no watchdog for this process."""
        if self._watchdog_interval is None:
            return False
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
