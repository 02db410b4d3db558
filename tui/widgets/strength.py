"""A steering strength: "◀ +1.25 ▶", changed with the keyboard (←/→, -/+), a click on either
arrow, or the mouse wheel."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

STEP = 0.25
LIMIT = 16.0


class Strength(Widget, can_focus=True):
    BINDINGS = [
        Binding("right,plus,equals_sign", "step(1)", "Stronger", show=False),
        Binding("left,minus", "step(-1)", "Weaker", show=False),
    ]

    value: reactive[float] = reactive(1.0)

    class Changed(Message):
        def __init__(self, strength: "Strength", value: float):
            super().__init__()
            self.strength = strength
            self.value = value

        @property
        def control(self) -> "Strength":
            return self.strength

    def __init__(self, value: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.set_reactive(Strength.value, round(value, 4))

    def render(self) -> Content:
        return Content(f"◀{self.value:+6.2f} ▶")

    def action_step(self, direction: int) -> None:
        self.value = max(-LIMIT, min(LIMIT, round(self.value + direction * STEP, 4)))

    def watch_value(self, value: float) -> None:
        self.post_message(self.Changed(self, value))

    def on_click(self, event: events.Click) -> None:
        if self.disabled:
            return
        # the left half weakens, the right half strengthens
        self.action_step(-1 if event.x < self.size.width // 2 else 1)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        if not self.disabled:
            event.stop()
            self.action_step(1)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        if not self.disabled:
            event.stop()
            self.action_step(-1)
