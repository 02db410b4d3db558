"""Save the conversation as Markdown or JSONL (with per-token events) to a path the user types;
an existing file is only overwritten after asking."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioButton, RadioSet

from localsteer.api import LocalsteerError

from ..conversation import Conversation
from .confirm import write_to_typed_path


class SaveScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, conversation: Conversation, model: str):
        super().__init__()
        self.conversation = conversation
        self.model = model

    def compose(self) -> ComposeResult:
        stem = f"localsteer-chat-{datetime.now():%Y%m%d-%H%M%S}"
        with Vertical(classes="dialog") as box:
            box.border_title = "Save the conversation"
            with RadioSet(id="format", compact=True):
                yield RadioButton("Markdown", value=True, id="md", compact=True)
                yield RadioButton("JSONL with token events", id="jsonl", compact=True)
            yield Label("Path")
            yield Input(f"{stem}.md", id="path", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#path").focus()

    @on(RadioSet.Changed, "#format")
    def _format(self, event: RadioSet.Changed) -> None:
        path = self.query_one("#path", Input)
        suffix = ".jsonl" if event.pressed.id == "jsonl" else ".md"
        path.value = str(Path(path.value).with_suffix(suffix))
        path.focus()  # so that enter saves

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted, "#path")
    def _save(self) -> None:
        write_to_typed_path(self, self.query_one("#path", Input).value, "type a path to save to", self._write)

    def _write(self, path: Path, force: bool) -> None:
        try:
            kind = self.conversation.save(path, self.model, force=force)
        except LocalsteerError as e:
            self.notify(f"could not save: {e}", severity="error", markup=False)
            return
        self.notify(f"saved the conversation to {path} ({kind})", markup=False)
        self.dismiss(path)
