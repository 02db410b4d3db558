"""Export the current mix (vectors x strengths, layers) as one GGUF control vector, and show the
llama.cpp command lines that steer the same way."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from localsteer.api import LocalsteerError, format_layers

from .. import mix
from .confirm import write_to_typed_path


class ExportScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, choice: mix.Choice, model_path: Path):
        super().__init__()
        self.choice = choice
        self.model_path = model_path
        self.written: Path | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = "Export the mix for llama.cpp"
            yield Static(Content(self.choice.steering.describe()), id="mix")
            yield Label("Path")
            yield Input("mix.gguf", id="path", compact=True)
            yield Static(id="commands")
            with Horizontal(classes="buttons"):
                yield Button("Export", id="export", variant="primary", compact=True)
                yield Button("Close", id="close", compact=True)

    def on_mount(self) -> None:
        self.query_one("#path").focus()

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(self.written)

    @on(Button.Pressed, "#export")
    @on(Input.Submitted, "#path")
    def _export(self) -> None:
        write_to_typed_path(self, self.query_one("#path", Input).value, "type a path for the .gguf file", self._write)

    def _write(self, path: Path, force: bool) -> None:
        try:
            baked = mix.export(self.choice, path, force=force)
        except (LocalsteerError, ValueError, OSError) as e:
            self.notify(str(e), severity="error", markup=False)
            return
        self.written = path
        lines = mix.llama_cpp_commands(self.model_path, self.choice, path)
        self.query_one("#commands", Static).update(Content("\n").join(
            [Content.assemble((f"wrote {path} (layers {format_layers(baked.layers)}, n_embd {baked.n_embd}); "
                               "llama.cpp steers the same way with:", "dim"))] + [Content(line) for line in lines]))
        self.notify(f"exported the mix to {path}", markup=False)
