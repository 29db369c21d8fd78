"""The main screen's panels; each takes a :class:`~crowdd.tui.model.DaemonView` in ``show``."""

from crowdd.tui.widgets.eventlog import EventLog
from crowdd.tui.widgets.members import MemberRow, MembersPanel
from crowdd.tui.widgets.status import StatusPanel
from crowdd.tui.widgets.training import TrainingPanel

__all__ = ["EventLog", "MemberRow", "MembersPanel", "StatusPanel", "TrainingPanel"]
