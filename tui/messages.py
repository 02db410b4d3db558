"""Messages the worker threads post to the UI (Textual delivers them on the UI thread)."""

from __future__ import annotations

from textual.message import Message

from localsteer.api import Reply, TokenEvent

from .catalog import VectorEntry
from .conversation import Turn
from .mix import Choice
from .session import Session


class ModelLoaded(Message):
    def __init__(self, session: Session, backend: str, entries: list[VectorEntry], problems: list[str]):
        super().__init__()
        self.session = session
        self.backend = backend
        self.entries = entries
        self.problems = problems


class ModelFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class TokenStreamed(Message):
    def __init__(self, turn: Turn, event: TokenEvent, eog: bool, elapsed: float):
        super().__init__()
        self.turn = turn
        self.event = event
        self.eog = eog
        self.elapsed = elapsed


class SteeringApplied(Message):
    """The worker configured the steerer with a new mix before token `index`."""

    def __init__(self, turn: Turn, index: int, choice: Choice):
        super().__init__()
        self.turn = turn
        self.index = index
        self.description = choice.describe()
        self.layers = choice.steering.layers


class ReplyFinished(Message):
    def __init__(self, turn: Turn, text: str, stats: Reply):
        super().__init__()
        self.turn = turn
        self.text = text
        self.stats = stats


class ReplyFailed(Message):
    def __init__(self, turn: Turn, error: str):
        super().__init__()
        self.turn = turn
        self.error = error


class WorkerStatus(Message):
    """A line for the status bar from a worker ("" clears it)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text
