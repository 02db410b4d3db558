"""The steering panel: the vectors on offer (switch + strength each), the active layer range,
rejection with its top-k, and the pinned instruction (the system prompt) with DIRECTER's switch.
It posts `SteeringPanel.Changed` with the whole mix on any change."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.validation import Function, Integer
from textual.widgets import Checkbox, Input, Label, Static

from localsteer.api import LayerRangeError, parse_layers

from ..catalog import VectorEntry
from ..mix import MixSettings
from .on_off import OnOff
from .vector_row import VectorRow


class SteeringPanel(VerticalScroll):
    class Changed(Message):
        def __init__(self, settings: MixSettings):
            super().__init__()
            self.settings = settings

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.n_layer = 0
        self.border_title = "Steering"

    def compose(self) -> ComposeResult:
        with Vertical(id="vectors"):
            yield Static("loading the model…", classes="note")
        with Horizontal(classes="field"):
            yield Label("Layers", classes="label")
            yield Input(id="layers", compact=True, placeholder="e.g. 7-24",
                        validators=[Function(self._valid_layers, "not a layer range of this model")])
        with Horizontal(classes="field"):
            yield OnOff("Reject", id="reject",
                        tooltip="dynamic rejection: weaken steering when the plain model finds a "
                                "token implausible (switching applies from the next reply)")
            yield Label("top-k", classes="label")
            yield Input("20", id="topk", type="integer", compact=True, validators=[Integer(minimum=1)])
        yield Input(id="instruction", compact=True, placeholder="pinned instruction",
                    tooltip="sent as the system prompt of every reply (a change applies from the next reply)")
        with Horizontal(classes="field"):
            yield OnOff("Amplify", id="amplify",
                        tooltip="DIRECTER: amplify the pinned instruction's keys, each steered token checked "
                                "against the plain model (switches live during a reply that began amplified)")
        yield Static(Content.assemble(
            "Tokens: full ", ("weakened", "$warning"), " ", ("plain", "$error dim"), "\n",
            ("space on/off · ←/→ strength", "$text-muted")), id="legend")

    def _valid_layers(self, text: str) -> bool:
        if not self.n_layer:
            return True
        try:
            parse_layers(text, self.n_layer)
        except LayerRangeError:
            return False
        return True

    # --- filling and reading ----------------------------------------------------------------------

    def load(self, entries: list[VectorEntry], layers: str, reject: bool, topk: int, n_layer: int,
             instruction: str = "", amplify: bool = False) -> None:
        """Show the vectors for a freshly loaded model (without posting `Changed`)."""
        self.n_layer = n_layer
        box = self.query_one("#vectors")
        box.remove_children()
        if entries:
            box.mount_all(VectorRow(e) for e in entries)
        else:
            box.mount(Static("no vectors for this model: extract one (f3)", classes="note"))
        with self.prevent(Input.Changed, Checkbox.Changed):
            self.query_one("#layers", Input).value = layers
            self.query_one("#reject", Checkbox).value = reject
            self.query_one("#topk", Input).value = str(topk)
            self.query_one("#instruction", Input).value = instruction
            self.query_one("#amplify", Checkbox).value = amplify

    def add(self, entry: VectorEntry) -> VectorRow:
        box = self.query_one("#vectors")
        box.query(".note").remove()
        row = VectorRow(entry)
        box.mount(row)
        return row

    @property
    def rows(self) -> list[VectorRow]:
        return list(self.query(VectorRow))

    def row(self, name: str) -> VectorRow:
        return next(r for r in self.rows if r.entry.name == name)

    def settings(self) -> MixSettings:
        try:
            topk = int(self.query_one("#topk", Input).value)
        except ValueError:
            topk = 0  # refused by the app with a notification
        return MixSettings(
            parts=tuple((r.entry.path, r.scale) for r in self.rows if r.entry.fits and r.enabled),
            layers=self.query_one("#layers", Input).value.strip(),
            reject=self.query_one("#reject", Checkbox).value,
            topk=topk,
            instruction=self.query_one("#instruction", Input).value.strip(),
            amplify=self.query_one("#amplify", Checkbox).value)

    def _changed(self) -> None:
        self.post_message(self.Changed(self.settings()))

    # --- changes --------------------------------------------------------------------------------

    def on_vector_row_changed(self, event: VectorRow.Changed) -> None:
        event.stop()
        self._changed()

    @on(Checkbox.Changed, "#reject, #amplify")
    def _reject_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        self._changed()

    @on(Input.Submitted, "#layers, #topk, #instruction")
    @on(Input.Blurred, "#layers, #topk, #instruction")
    def _field_done(self, event: Input.Submitted | Input.Blurred) -> None:
        event.stop()
        self._changed()
