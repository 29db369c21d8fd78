"""The volunteer's two switches, in one place: donation on or off, and a pause.

Both are the user's word (``crowdd donate``, ``crowdd pause``/``resume``, the TUI) and both
survive a restart, kept in ``state/daemon.json`` (written atomically: a crash leaves the old
file). The pause lives in the idle policy, which decides with it; the status view shows both.
A pause saved before a restart holds again if it has not ended (like BOINC's snooze); an
ended or unreadable one is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from crowdd.idle.policy import Policy
from crowdd.node.status import StatusView
from crowdd.protocol.control import format_pause

logger = logging.getLogger(__name__)

STATE_FILE = "daemon.json"


class DonationSwitch:
    """Donation and pause: set, shown (``view``), decided on (``policy``), kept (``state_dir``)."""

    def __init__(self, state_dir: Path, policy: Policy, view: StatusView) -> None:
        self._path = state_dir / STATE_FILE
        self._policy = policy
        self._view = view

    @property
    def on(self) -> bool:
        return self._view.donating

    @property
    def paused_until(self) -> float | None:
        return self._policy.paused_until

    def load(self) -> None:
        """Take the switch and the pause as they were before this start (a new install: off)."""
        saved = self._read()
        self._view.set_donating(saved.get("donating", False) is True)
        self._restore_pause(saved.get("paused_until"))

    def switch(self, on: bool) -> bool:
        """Donation on or off; returns whether it changed."""
        if on == self.on:
            return False
        self._view.set_donating(on)
        self._save()
        return True

    def pause(self, hours: float) -> float | None:
        """Hold donation back for ``hours`` (raises ValueError for a bad duration); returns the
        pause's end (epoch seconds). A new pause replaces a running one."""
        self._policy.pause(hours)
        self._view.paused_until = self._policy.paused_until
        self._save()
        return self._policy.paused_until

    def resume(self) -> bool:
        """End the pause now; returns whether there was one."""
        was_paused = self._policy.paused_until is not None
        self._policy.resume()
        self._view.paused_until = None
        self._save()
        return was_paused

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s (donation starts off)", self._path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        tmp = self._path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"donating": self.on, "paused_until": self._policy.paused_until}))
            os.replace(tmp, self._path)
        except OSError as exc:
            logger.error("cannot save the donation switch and pause to %s: %s", self._path, exc)

    def _restore_pause(self, until: Any) -> None:
        if until is None:
            return
        now = time.time()
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not now < until < float("inf"):
            if isinstance(until, (int, float)) and not isinstance(until, bool) and until <= now:
                logger.info("the pause saved before the restart has ended")
            else:
                logger.warning("ignoring an unreadable pause in %s: %r", self._path, until)
            return
        try:
            self._policy.pause((until - now) / 3600.0)
        except ValueError as exc:
            logger.warning("ignoring the pause saved before the restart: %s", exc)
            return
        self._view.paused_until = self._policy.paused_until
        self._view.log(logging.INFO, f"{format_pause(until, now)}: set before the restart; `crowdd resume` ends it")


__all__ = ["STATE_FILE", "DonationSwitch"]
