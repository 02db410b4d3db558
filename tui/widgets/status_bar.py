"""The status bar: model, backend, speed and full-steering acceptance of the reply, active layers,
rejection, and the mix's benign KL when the vector file carries it (`localsteer kl --save`).

It fits its width: when the full line is too long it switches to short labels, then narrower
separators, then shortens the model name, so an 80-column terminal still shows every item.
"""

from __future__ import annotations

from textual.content import Content
from textual.reactive import reactive
from textual.widget import Widget


def _ellipsize(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


class StatusBar(Widget):
    model: reactive[str] = reactive("")
    backend: reactive[str] = reactive("")
    tokens_per_second: reactive[float | None] = reactive(None)
    acceptance: reactive[float | None] = reactive(None)
    layers: reactive[str] = reactive("")
    rejection: reactive[str] = reactive("")
    kl: reactive[float | None] = reactive(None)  # the mix's benign KL, when its file carries it
    note: reactive[str] = reactive("")

    def items(self, short: bool) -> list[str]:
        """Everything after the model name, in long or short labels."""
        tps = self.tokens_per_second
        acc = self.acceptance
        out = [self.backend] if self.backend else []
        out.append(("–" if tps is None else f"{tps:.1f}") + (" t/s" if short else " tok/s"))
        out.append(("acc " if short else "accept ") + ("–" if acc is None else f"{acc:.0%}"))
        out.append(("L " if short else "layers ") + (self.layers or "off"))
        if self.rejection:
            out.append(self.rejection.replace("reject top-", "k=") if short else self.rejection)
        if self.kl is not None:
            out.append(f"KL {self.kl:.2f}" if short else f"benign KL {self.kl:.3f}")
        return out

    def line(self, width: int) -> str:
        """The text of the bar (without the note) in at most `width` characters where possible."""
        model = self.model or "no model"
        for short, sep in ((False, " │ "), (True, " │ "), (True, "│")):
            text = sep.join([model, *self.items(short)])
            if len(text) <= width:
                return text
        rest = "│" + "│".join(self.items(True))
        return _ellipsize(model, max(8, width - len(rest))) + rest

    def render(self) -> Content:
        width = self.size.width or 80
        if self.note:
            # a note (loading, ranking layers…) is the news: it keeps its room, the figures shrink
            room = max(0, width - len(self.note) - 3)
            return Content.assemble(self.line(room), " │ ", (self.note, "bold"))
        return Content(self.line(width))
