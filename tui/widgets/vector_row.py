"""One vector in the steering panel: an on/off switch with its name, and its strength."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.content import Content
from textual.message import Message

from ..catalog import VectorEntry
from .on_off import OnOff
from .strength import Strength


class VectorRow(Horizontal):
    # +/- also work while the switch has focus (they bubble up from it)
    BINDINGS = [
        Binding("plus,equals_sign", "step(1)", "Stronger", show=False),
        Binding("minus", "step(-1)", "Weaker", show=False),
    ]

    class Changed(Message):
        def __init__(self, row: "VectorRow"):
            super().__init__()
            self.row = row

    def __init__(self, entry: VectorEntry, **kwargs):
        super().__init__(**kwargs)
        self.entry = entry
        self.enabled = entry.enabled
        self.scale = entry.scale

    def compose(self) -> ComposeResult:
        e = self.entry
        tip = (f"{e.path}\n({e.origin})" + (f"\nmeasured: {e.measured}" if e.measured else "")
               + (f"\ndoes not fit: {e.problem}" if e.problem else ""))
        switch = OnOff(Content(e.name), e.enabled, disabled=not e.fits)
        switch.tooltip = tip
        yield switch
        yield Strength(e.scale, disabled=not e.fits)

    def toggle(self) -> None:
        self.query_one(OnOff).toggle()

    def focus(self, scroll_visible: bool = True) -> "VectorRow":
        """Focus the row's switch."""
        self.query_one(OnOff).focus(scroll_visible)
        return self

    def action_step(self, direction: int) -> None:
        self.query_one(Strength).action_step(direction)

    def on_checkbox_changed(self, event: OnOff.Changed) -> None:
        event.stop()
        self.enabled = event.value
        self.post_message(self.Changed(self))

    def on_strength_changed(self, event: Strength.Changed) -> None:
        event.stop()
        self.scale = event.value
        self.post_message(self.Changed(self))
