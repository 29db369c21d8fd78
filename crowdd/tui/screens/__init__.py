"""The app's screens: main view, Host form, stop confirmation, pause dialog, daemon not running."""

from crowdd.tui.screens.confirm import ConfirmStopScreen
from crowdd.tui.screens.host import HostScreen
from crowdd.tui.screens.main import MainScreen
from crowdd.tui.screens.pause import PauseScreen
from crowdd.tui.screens.unavailable import UnavailableScreen

__all__ = ["ConfirmStopScreen", "HostScreen", "MainScreen", "PauseScreen", "UnavailableScreen"]
