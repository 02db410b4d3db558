"""The details of the selected token: its status, the layers active when it was chosen, the
steering in effect, and the plain model's top-k with probabilities."""

from __future__ import annotations

import json

from textual.content import Content
from textual.widgets import Static

from localsteer.api import Status, format_layers

from ..conversation import Turn

HINT = "click a token (or ←/→ in the transcript) to see how it was chosen"
_STATUS_STYLE = {Status.STEERED: "$success", Status.WEAKENED: "$warning", Status.PLAIN: "$error",
                 Status.UNSTEERED: "$text-muted", Status.SKIPPED: "$text-muted"}


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class TokenDetails(Static):
    def on_mount(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.update(Content.assemble((HINT, "dim")))

    def show(self, turn: Turn, index: int) -> None:
        ev = turn.events[index]
        status = ev.status + (f" after {ev.rounds} rejection round{'s' * (ev.rounds != 1)}" if ev.rounds else "")
        probs = ""
        if ev.steered_prob is not None:
            probs += f"  steered p {ev.steered_prob:.3f}"
        if ev.plain_prob is not None:
            probs += f"  plain p {ev.plain_prob:.3f}"
        top = "  ".join(f"{_quoted(text)} {p:.1%}" for _, text, p in ev.plain_top)
        lines = [
            Content.assemble((f"#{ev.index} {_quoted(ev.text)}", "bold"), "  ",
                             (status, _STATUS_STYLE.get(ev.status, "")), probs),
            Content.assemble("layers ", (format_layers(ev.layers) or "none", "bold"), "  ·  ",
                             turn.steering_at(index) or "no steering"),
            Content(f"plain top: {top}") if top else
            Content.assemble(("plain top-k: shown with rejection on", "dim")),
        ]
        self.update(Content("\n").join(lines))
