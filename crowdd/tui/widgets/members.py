"""The group panel: one row per member with its state and a replication progress bar."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.css.query import NoMatches
from textual.widgets import Label, ProgressBar

from crowdd.tui.model import DaemonView, Member


class MemberRow(Horizontal):
    """``index role name state [replication bar]``."""

    def __init__(self, member: Member) -> None:
        super().__init__(classes="member")
        self.member = member

    def compose(self) -> ComposeResult:
        yield Label(Content(self._text()), classes="member-label")  # a peer's name: never markup
        yield ProgressBar(total=1, show_eta=False, classes="member-bar")

    def on_mount(self) -> None:
        self.show(self.member)

    def _text(self) -> str:
        m = self.member
        role = "H" if m.role == "host" else "W"
        return f"{m.index:>2} {role} {m.name[:8]:<8} {m.state[:11]:<11} "

    def show(self, member: Member) -> None:
        self.member = member
        # a peer's words: plain text, never markup
        self.tooltip = Content(f"expelled: {member.note}") if member.state == "expelled" and member.note else None
        try:
            label = self.query_one(".member-label", Label)
            bar = self.query_one(ProgressBar)
        except NoMatches:  # not composed yet: on_mount shows self.member
            return
        label.update(Content(self._text()))
        bar.update(total=max(member.total, 1), progress=min(member.done, max(member.total, 1)) if member.total else 0)


class MembersPanel(VerticalScroll):
    """The group's members (empty until the matchmaker forms a group)."""

    BORDER_TITLE = "Group"

    def compose(self) -> ComposeResult:
        yield Label("no group yet", id="no-group")

    def show(self, view: DaemonView) -> None:
        self.border_title = f"Group {view.group_id}" if view.group_id else "Group"
        rows = list(self.query(MemberRow))
        for row, member in zip(rows, view.members):
            row.show(member)
        for row in rows[len(view.members):]:
            row.remove()
        if len(view.members) > len(rows):
            self.mount_all([MemberRow(m) for m in view.members[len(rows):]])
        self.query_one("#no-group", Label).display = not view.members
