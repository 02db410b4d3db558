"""An on/off switch: a compact checkbox whose mark is drawn only when on, so that its state
reads without colour too (e.g. in a screen capture)."""

from __future__ import annotations

from textual.widgets import Checkbox


class OnOff(Checkbox):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compact", True)
        super().__init__(*args, **kwargs)
        self.BUTTON_INNER = "X" if self.value else " "

    def watch_value(self) -> None:
        super().watch_value()
        self.BUTTON_INNER = "X" if self.value else " "
        self.refresh()
