"""The status bar: model, backend, speed and full-steering acceptance of the reply, active layers."""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget


class StatusBar(Widget):
    model: reactive[str] = reactive("")
    backend: reactive[str] = reactive("")
    tokens_per_second: reactive[float | None] = reactive(None)
    acceptance: reactive[float | None] = reactive(None)
    layers: reactive[str] = reactive("")
    rejection: reactive[str] = reactive("")
    note: reactive[str] = reactive("")

    def render(self) -> Content:
        parts = [self.model or "no model"]
        if self.backend:
            parts.append(self.backend)
        parts.append("– tok/s" if self.tokens_per_second is None else f"{self.tokens_per_second:.1f} tok/s")
        parts.append("accept –" if self.acceptance is None else f"accept {self.acceptance:.0%}")
        parts.append(f"layers {self.layers or 'off'}")
        if self.rejection:
            parts.append(self.rejection)
        text = " │ ".join(parts)
        if self.note:
            return Content.assemble(text, " │ ", (self.note, "bold"))
        return Content(text)
