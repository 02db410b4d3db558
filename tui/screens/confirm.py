"""A yes/no question (e.g. before overwriting a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Content(self.question))
            with Horizontal(classes="buttons"):
                yield Button("Yes", id="yes", variant="warning", compact=True)
                yield Button("No", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def write_to_typed_path(screen: Screen, typed: str, hint: str, write: Callable[[Path, bool], None]) -> None:
    """Call `write(path, force)` for the path the user typed, asking first if the file exists."""
    text = typed.strip()
    if not text:
        screen.notify(hint, severity="warning", markup=False)
        return
    path = Path(text).expanduser()
    if path.exists():
        screen.app.push_screen(ConfirmScreen(f"{path} exists. Overwrite it?"),
                               lambda yes: write(path, True) if yes else None)
    else:
        write(path, False)
