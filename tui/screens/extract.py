"""Extract a control vector inside the app: from a dataset file or a few pairs typed in, in a
worker with a progress bar. The vector is saved under the user's vector directory and the app
adds it to the steering panel."""

from __future__ import annotations

import os
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static, TextArea
from textual.worker import get_current_worker

from localsteer import api
from localsteer.api import LocalsteerError, Pair

from ..session import Session, Stopped
from .confirm import ConfirmScreen


def parse_typed_pairs(text: str) -> list[Pair]:
    """Pairs typed one per line as "positive | negative"."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pos, sep, neg = line.partition("|")
        if not sep or not pos.strip() or not neg.strip():
            raise ValueError(f"pair line {n}: write it as  positive text | negative text")
        pairs.append(Pair(pos.strip(), neg.strip()))
    return pairs


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class ExtractScreen(ModalScreen[Path | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    class Progress(Message):
        def __init__(self, done: int, total: int):
            super().__init__()
            self.done = done
            self.total = total

    class Note(Message):
        def __init__(self, text: str, failed: bool = False):
            super().__init__()
            self.text = text
            self.failed = failed

    class Done(Message):
        def __init__(self, path: Path, text: str):
            super().__init__()
            self.path = path
            self.text = text

    def __init__(self, session: Session, user_dir: Path, datasets_dir: Path):
        super().__init__()
        self.session = session
        self.user_dir = user_dir
        self.datasets = sorted(datasets_dir.glob("*.jsonl")) if datasets_dir.is_dir() else []

    def compose(self) -> ComposeResult:
        default = next((p for p in self.datasets if p.name == "happy-sad.jsonl"), None)
        with Vertical(classes="dialog") as box:
            box.border_title = "Extract a control vector"
            yield Label("Dataset: JSONL of positive/negative pairs")
            yield Input(_shown(default) if default else "", id="dataset", compact=True,
                        suggester=SuggestFromList([_shown(p) for p in self.datasets]))
            yield Label("…or type pairs, one per line:  positive | negative")
            yield TextArea(id="pairs", compact=True)
            with Horizontal(classes="field"):
                yield Label("Name", classes="label")
                yield Input(id="name", compact=True, placeholder="from the dataset")
                yield Select([("mean", "mean"), ("pca", "pca")], value="mean", allow_blank=False,
                             id="method", compact=True)
            yield ProgressBar(id="progress", show_eta=False)
            yield Static(id="state")
            with Horizontal(classes="buttons"):
                yield Button("Extract", id="extract", variant="primary", compact=True)
                yield Button("Close", id="close", compact=True)

    def on_mount(self) -> None:
        self.query_one("#progress").display = False
        self.query_one("#dataset").focus()

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)

    def _pairs(self) -> tuple[list[Pair], str]:
        typed = self.query_one("#pairs", TextArea).text
        if typed.strip():
            return parse_typed_pairs(typed), "typed pairs"
        path = self.query_one("#dataset", Input).value.strip()
        if not path:
            raise ValueError("give a dataset file or type some pairs")
        return api.load_pairs(Path(path).expanduser()), Path(path).name

    @on(Button.Pressed, "#extract")
    @on(Input.Submitted, "#dataset, #name")
    def _start(self) -> None:
        if self.query_one("#extract", Button).disabled:
            return
        try:
            pairs, source = self._pairs()
        except (LocalsteerError, ValueError) as e:
            self.notify(str(e), severity="error", markup=False)
            return
        name = self.query_one("#name", Input).value.strip() or (
            "custom" if source == "typed pairs" else Path(source).stem)
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            self.notify("a vector name is letters, digits, - _ and .", severity="error", markup=False)
            return
        out = self.user_dir / f"{name}.gguf"
        if out.exists():
            self.app.push_screen(ConfirmScreen(f"{out} exists. Overwrite it?"),
                                 lambda yes: self._run(pairs, source, out, True) if yes else None)
        else:
            self._run(pairs, source, out, False)

    def _run(self, pairs: list[Pair], source: str, out: Path, force: bool) -> None:
        self.query_one("#extract", Button).disabled = True
        bar = self.query_one("#progress", ProgressBar)
        bar.display = True
        bar.update(total=2 * len(pairs), progress=0)
        self.query_one("#state", Static).update(f"extracting from {len(pairs)} pairs…")
        self.extract(pairs, source, self.query_one("#method", Select).value, out, force)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def extract(self, pairs: list[Pair], source: str, method: str, out: Path, force: bool) -> None:
        worker = get_current_worker()
        try:
            vector = self.session.extract(
                pairs, method, source, progress=lambda done, total: self.post_message(self.Progress(done, total)),
                cancelled=lambda: worker.is_cancelled,
                waiting=lambda: self.post_message(self.Note("waiting for the reply to finish…")))
            vector.save(out, force=force)
        except Stopped:
            return
        except (LocalsteerError, ValueError, OSError) as e:
            self.post_message(self.Note(str(e), failed=True))
            return
        except Exception as e:  # noqa: BLE001 - MemoryError or a bug: shown, never a hang
            self.post_message(self.Note(f"{type(e).__name__}: {e}", failed=True))
            return
        self.post_message(self.Done(out, f"wrote {out} (suggested layers {vector.meta.get('layers')}); "
                                         "switch it on in the panel"))

    def on_extract_screen_progress(self, event: Progress) -> None:
        self.query_one("#progress", ProgressBar).update(total=event.total, progress=event.done)

    def on_extract_screen_note(self, event: Note) -> None:
        self.query_one("#state", Static).update(Content(event.text))
        if event.failed:
            self.notify(event.text, severity="error", markup=False)
            self.query_one("#extract", Button).disabled = False

    def on_extract_screen_done(self, event: Done) -> None:
        self.notify(event.text, markup=False)
        self.dismiss(event.path)
