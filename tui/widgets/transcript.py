"""The chat transcript: user messages and streamed replies, newest at the bottom.
←/→ move the token cursor through a reply (the last one, or the one clicked in)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Static

from ..conversation import Turn
from .reply_view import ReplyView

HINT = ("Type a message below. Switch vectors on in the panel and change their strength while "
        "a reply is being written: it applies from the next token. With rejection on, tokens the "
        "plain model found implausible are drawn in colour; click one to see why.")


class Transcript(VerticalScroll, can_focus=True):
    BINDINGS = [
        Binding("left", "token(-1)", "Prev token"),
        Binding("right", "token(1)", "Next token"),
    ]

    def __init__(self, hint: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.hint = hint
        self._views: dict[int, ReplyView] = {}
        self.selected: ReplyView | None = None

    def compose(self) -> ComposeResult:
        if self.hint:
            yield Static(HINT, classes="hint")

    def add_user(self, turn: Turn) -> None:
        self.query(".hint").remove()
        self.mount(Static(Content(turn.text), classes="user"))
        self.anchor()

    def add_reply(self, turn: Turn) -> ReplyView:
        view = ReplyView(turn)
        self._views[id(turn)] = view
        self.mount(view)
        self.anchor()
        return view

    def view_for(self, turn: Turn) -> ReplyView | None:
        view = self._views.get(id(turn))
        return view if view is not None and view.turn is turn else None

    def remove_reply(self, turn: Turn) -> None:
        view = self._views.pop(id(turn), None)
        if view is not None:
            if self.selected is view:
                self.selected = None
            view.remove()

    def clear(self) -> None:
        self._views.clear()
        self.selected = None
        self.remove_children()
        if self.hint:
            self.mount(Static(HINT, classes="hint"))

    def on_reply_view_token_selected(self, event: ReplyView.TokenSelected) -> None:
        if self.selected is not None and self.selected is not event.view:
            self.selected.cursor = None
        self.selected = event.view

    def action_token(self, delta: int) -> None:
        views = list(self.query(ReplyView))
        view = self.selected if self.selected in views else (views[-1] if views else None)
        if view is not None:
            view.move_cursor(delta)
            self.scroll_to_widget(view, animate=False)
