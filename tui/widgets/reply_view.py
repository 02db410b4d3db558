"""An assistant reply drawn token by token, so that rejection is visible: full-steering tokens
plain, weakened ones and plain-fallback ones in their own styles (see app.tcss). A token can be
selected (click, or ←/→ in the transcript) to see its details."""

from __future__ import annotations

from textual import events
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.style import Style
from textual.widget import Widget

from localsteer.api import Status

from ..conversation import Turn

STATUSES = tuple(s.value for s in Status)  # steered, weakened, plain, unsteered


class ReplyView(Widget):
    COMPONENT_CLASSES = {f"reply--{s}" for s in STATUSES} | {"reply--cursor", "reply--note"}

    cursor: reactive[int | None] = reactive(None)

    class TokenSelected(Message):
        def __init__(self, view: "ReplyView", turn: Turn, index: int):
            super().__init__()
            self.view = view
            self.turn = turn
            self.index = index

    def __init__(self, turn: Turn, **kwargs):
        super().__init__(**kwargs)
        self.turn = turn
        self._styles: dict = {}
        self._parts: list = []  # each event's (status, (text, style)), None for the end token

    def update(self) -> None:
        """The turn got new tokens or finished."""
        self.refresh(layout=True)

    def render(self) -> Content:
        turn = self.turn
        styles = {s: self.get_visual_style(f"reply--{s}") for s in STATUSES}
        if styles != self._styles:  # the theme changed: style every token again
            self._styles, self._parts = styles, []
        # each token's style is kept while its status stays: a long reply is not restyled at every frame
        del self._parts[len(turn.events):]
        for i, ev in enumerate(turn.events):
            if i < len(self._parts) and self._parts[i][0] == ev.status:
                continue
            style = styles.get(ev.status, styles["steered"]) + Style.from_meta({"token": ev.index})
            part = (ev.status, None if ev.index == turn.eog_index else (ev.text, style))
            if i < len(self._parts):
                self._parts[i] = part
            else:
                self._parts.append(part)
        parts: list = []
        for i, (_, part) in enumerate(self._parts):
            if part is not None:
                parts.append(part if i != self.cursor else (part[0], part[1] + self.get_visual_style("reply--cursor")))
        if not turn.done:
            parts.append("▌")
        elif turn.stats and turn.stats.stopped:
            parts.append((" [stopped]", self.get_visual_style("reply--note")))
        return Content.assemble(*parts)

    # --- selection ------------------------------------------------------------------------------

    def select(self, index: int) -> None:
        if 0 <= index < len(self.turn.events):
            self.cursor = index
            self.post_message(self.TokenSelected(self, self.turn, index))

    def move_cursor(self, delta: int) -> None:
        n = len(self.turn.events) - (self.turn.eog_index is not None)
        if n <= 0:
            return
        start = (n if delta < 0 else -1) if self.cursor is None else self.cursor
        self.select(max(0, min(n - 1, start + delta)))

    def on_click(self, event: events.Click) -> None:
        index = event.style.meta.get("token")
        if index is not None:
            self.select(int(index))

    def watch_cursor(self) -> None:
        self.refresh()
