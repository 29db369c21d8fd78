"""The crowdd terminal UI: a Textual app over a :class:`~crowdd.client.daemon_client.DaemonClient`.

The client comes in through the constructor. Only the app's ``@work`` workers call it;
they turn replies, events and failures into messages, and the handlers below fold those
into a :class:`~crowdd.tui.model.DaemonView` and show it. Screens never do I/O: they post
:class:`DonateRequested`, :class:`HostRequested`, :class:`PauseRequested`,
:class:`ResumeRequested` and :class:`StopRequested`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen

from crowdd.client.daemon_client import DaemonClient
from crowdd.errors import RemoteError, Unavailable
from crowdd.tui.messages import (
    DaemonEvent,
    DaemonLost,
    DonateRequested,
    HostRequested,
    PauseRequested,
    RequestDone,
    RequestFailed,
    ResumeRequested,
    StatusLoaded,
    StopRequested,
)
from crowdd.protocol.control import format_pause
from crowdd.tui.model import DaemonView
from crowdd.tui.screens import HostScreen, MainScreen, UnavailableScreen

logger = logging.getLogger(__name__)


def _clock_stamp() -> str:
    return time.strftime("%H:%M:%S")


class CrowddApp(App[None]):
    """See and steer the local crowdd daemon. Quitting leaves the daemon running."""

    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "crowdd"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q", "quit", "Quit")]

    def __init__(
        self,
        client: DaemonClient,
        *,
        poll_interval: float = 5.0,
        retry_interval: float = 2.0,
        timestamp: Callable[[], str] = _clock_stamp,
    ) -> None:
        super().__init__()
        self.client = client
        self.poll_interval = poll_interval
        self.retry_interval = retry_interval
        self.timestamp = timestamp
        self.view = DaemonView()
        self._wake = asyncio.Event()
        self._main = MainScreen(client.where, timestamp)

    def get_default_screen(self) -> Screen[Any]:
        return self._main

    @property
    def main_screen(self) -> MainScreen:
        return self._main

    def on_mount(self) -> None:
        self.poll_status()
        self.follow_events()

    async def on_unmount(self) -> None:
        try:
            await self.client.close()
        except Exception:
            logger.debug("closing the daemon client failed", exc_info=True)

    # ------------------------------------------------------------------ workers (all the I/O)

    @work(group="poll", exclusive=True, exit_on_error=False)
    async def poll_status(self) -> None:
        """Ask for the status now and then; faster while the daemon is away."""
        while True:
            ok = False
            try:
                status = await self.client.status()
            except Unavailable as exc:
                self.post_message(DaemonLost(str(exc)))
            except Exception as exc:
                logger.debug("status failed", exc_info=True)
                self.post_message(DaemonLost(f"status failed: {exc}"))
            else:
                ok = True
                self.post_message(StatusLoaded(status))
            interval = self.poll_interval if ok else self.retry_interval
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass

    @work(group="events", exclusive=True, exit_on_error=False)
    async def follow_events(self) -> None:
        """Stay subscribed to the daemon's events; resubscribe after it comes back."""
        while True:
            try:
                async for event in self.client.subscribe():
                    if event.get("type") == "event":
                        self.post_message(DaemonEvent(event))
            except Unavailable:
                pass
            except Exception:
                logger.debug("event subscription failed", exc_info=True)
            # The stream ended: let the status poll decide whether the daemon is gone.
            self.retry_now()
            await asyncio.sleep(self.retry_interval)

    @work(group="donate", exclusive=True, exit_on_error=False)
    async def request_donate(self, on: bool) -> None:
        await self._request("donate", self.client.donate(on))

    @work(group="host", exclusive=True, exit_on_error=False)
    async def request_host(self, dataset: str, job: dict[str, Any], model_file: str | None = None) -> None:
        await self._request("host", self.client.host(dataset, job, model_file))

    @work(group="stop", exclusive=True, exit_on_error=False)
    async def request_stop(self) -> None:
        await self._request("stop", self.client.stop())

    @work(group="pause", exclusive=True, exit_on_error=False)
    async def request_pause(self, hours: float) -> None:
        await self._request("pause", self.client.pause(hours))

    @work(group="pause", exclusive=True, exit_on_error=False)
    async def request_resume(self) -> None:
        await self._request("resume", self.client.resume())

    async def _request(self, action: str, call: Any) -> None:
        try:
            reply = await call
        except Unavailable as exc:
            self.post_message(RequestFailed(action, "the daemon is not running"))
            self.post_message(DaemonLost(str(exc)))
        except RemoteError as exc:
            self.post_message(RequestFailed(action, exc.message, exc.field))
        except Exception as exc:
            logger.debug("%s failed", action, exc_info=True)
            self.post_message(RequestFailed(action, str(exc) or type(exc).__name__))
        else:
            self.post_message(RequestDone(action, reply))

    def retry_now(self) -> None:
        """Ask the status poll to run now instead of after its interval."""
        self._wake.set()

    # ------------------------------------------------------------------ user requests

    def on_donate_requested(self, message: DonateRequested) -> None:
        self.request_donate(message.on)

    def on_host_requested(self, message: HostRequested) -> None:
        self.request_host(message.dataset, message.job, message.model_file)

    def on_stop_requested(self, message: StopRequested) -> None:
        self.request_stop()

    def on_pause_requested(self, message: PauseRequested) -> None:
        self.request_pause(message.hours)

    def on_resume_requested(self, message: ResumeRequested) -> None:
        self.request_resume()

    # ------------------------------------------------------------------ folding results in

    def _refresh(self) -> None:
        self._main.show(self.view)

    def _unavailable_screen(self) -> UnavailableScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, UnavailableScreen):
                return screen
        return None

    def on_status_loaded(self, message: StatusLoaded) -> None:
        was_connected = self.view.connected
        self.view.connected = True
        self.view.apply_status(message.status)
        self._refresh()
        if not was_connected:
            self._main.log_line("info", f"connected to the daemon on {self.client.where}")
        if self._unavailable_screen() is not None:
            while self._unavailable_screen() is not None:
                self.pop_screen()
            self.notify("The daemon is back.", timeout=3)

    def on_daemon_event(self, message: DaemonEvent) -> None:
        line = self.view.apply_event(message.event)
        self._refresh()
        if line is not None:
            self._main.log_line(*line)

    def on_daemon_lost(self, message: DaemonLost) -> None:
        if self.view.connected:
            self._main.log_line("error", "lost the connection to the daemon")
        self.view.connected = False
        self._refresh()
        screen = self._unavailable_screen()
        if screen is None:
            self.push_screen(UnavailableScreen(self.client.where, message.reason, self.retry_interval))
        else:
            screen.set_reason(message.reason)

    def on_request_done(self, message: RequestDone) -> None:
        if message.action == "donate":
            on = bool(message.reply.get("donating", not self.view.donating))
            self.view.donating = on
            self._main.set_donation(on)
            self._main.log_line("info", f"donation {'on' if on else 'off'}")
        elif message.action == "host":
            if isinstance(self.screen, HostScreen):
                self.pop_screen()
            self._main.log_line("info", "hosting: looking for workers")
        elif message.action == "stop":
            self._main.log_line("info", "session stopped")
        elif message.action in ("pause", "resume"):
            until = message.reply.get("paused_until")
            self.view.paused_until = float(until) if isinstance(until, (int, float)) else None
            self._refresh()
            if self.view.paused_until is not None:
                self._main.log_line("info", f"{format_pause(self.view.paused_until)}: donation held back")
            else:
                self._main.log_line("info", "pause ended: donation goes on as the idle policy allows")
        self.retry_now()

    def on_request_failed(self, message: RequestFailed) -> None:
        if message.action == "donate":
            self._main.set_donation(self.view.donating)
        if message.action == "host" and isinstance(self.screen, HostScreen):
            self.screen.show_error(message.field, message.message)
        self._main.log_line("error", f"{message.action} failed: {message.message}")
        self.notify(message.message, title=f"{message.action} failed", severity="error", timeout=5)
