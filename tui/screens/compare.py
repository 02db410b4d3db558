"""Compare mode: the same prompt answered plain and steered, side by side. Both replies come
from the app's one `Steerer`, one after the other (plain first, then the panel's mix)."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Label, Static
from textual.worker import get_current_worker

from localsteer.api import LocalsteerError, Sampling

from ..conversation import Turn
from ..messages import ReplyFailed, ReplyFinished, SteeringApplied, TokenStreamed, WorkerStatus
from ..mix import PLAIN, Mailbox
from ..session import Session, Stopped
from ..widgets.reply_view import ReplyView
from ..widgets.token_details import TokenDetails
from ..widgets.transcript import Transcript


class CompareScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "close", "Back to chat"),
        Binding("ctrl+r", "again", "Again", priority=True),
    ]

    def __init__(self, session: Session, messages: list[dict], mailbox: Mailbox, max_tokens: int,
                 sampling: Sampling):
        super().__init__()
        self.session = session
        self.messages = messages
        self.mailbox = mailbox
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.turns: dict[str, Turn] = {}

    def compose(self) -> ComposeResult:
        yield Static(Content.assemble(("Compare: ", "bold"), self.messages[-1]["content"]), id="compare-prompt")
        with Horizontal(id="columns"):
            for side in ("plain", "steered"):
                with Vertical(classes="column"):
                    yield Label(side, id=f"{side}-label", classes="column-label")
                    yield Transcript(hint=False, id=f"{side}-transcript")
        yield TokenDetails(id="details")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.action_again()

    def action_close(self) -> None:
        self.workers.cancel_node(self)
        self.dismiss(None)

    def action_again(self) -> None:
        self.turns = {}
        for side in ("plain", "steered"):
            transcript = self.query_one(f"#{side}-transcript", Transcript)
            transcript.clear()
            self.turns[side] = turn = Turn("assistant")
            transcript.add_reply(turn)
        self.query_one("#details", TokenDetails).clear()
        self.run_both(self.turns["plain"], self.turns["steered"])

    @work(thread=True, exclusive=True, exit_on_error=False)
    def run_both(self, plain: Turn, steered: Turn) -> None:
        worker = get_current_worker()
        for turn, choice in ((plain, PLAIN), (steered, self.mailbox)):
            try:
                text, stats = self.session.reply(
                    self.messages, choice, self.max_tokens, self.sampling,
                    cancelled=lambda: worker.is_cancelled,
                    on_token=lambda ev, eog, dt, turn=turn: self.post_message(TokenStreamed(turn, ev, eog, dt)),
                    on_applied=lambda i, c, turn=turn: self.post_message(SteeringApplied(turn, i, c)),
                    status=lambda text: self.post_message(WorkerStatus(text)))
            except Stopped:
                return
            except (LocalsteerError, ValueError) as e:
                self.post_message(ReplyFailed(turn, str(e)))
                return
            self.post_message(ReplyFinished(turn, text, stats))
            if worker.is_cancelled:
                return

    def _side(self, turn: Turn) -> str | None:
        return next((side for side, t in self.turns.items() if t is turn), None)

    def _view(self, turn: Turn) -> ReplyView | None:
        side = self._side(turn)
        return self.query_one(f"#{side}-transcript", Transcript).view_for(turn) if side else None

    def on_token_streamed(self, msg: TokenStreamed) -> None:
        msg.stop()
        view = self._view(msg.turn)
        if view is not None:
            msg.turn.add(msg.event, msg.eog)
            view.update()

    def on_steering_applied(self, msg: SteeringApplied) -> None:
        msg.stop()
        side = self._side(msg.turn)
        if side is None:
            return
        msg.turn.applied.append((msg.index, msg.description))
        msg.turn.steered = msg.turn.steered or bool(msg.layers)
        if msg.index == 0:
            self.query_one(f"#{side}-label", Label).update(Content(f"{side}: {msg.description}\n…"))

    def on_reply_finished(self, msg: ReplyFinished) -> None:
        msg.stop()
        side = self._side(msg.turn)
        if side is None:
            return
        turn, s = msg.turn, msg.stats
        turn.stats = s
        turn.text = msg.text
        self._view(turn).update()
        figures = f"{s.n_tokens} tokens, {s.tokens_per_second:.1f} tok/s"
        if turn.steered:
            figures += f", accept {s.acceptance:.0%}"
        label = self.query_one(f"#{side}-label", Label)
        label.update(Content(f"{side}: {turn.applied[0][1] if turn.applied else ''}\n{figures}"))

    def on_reply_failed(self, msg: ReplyFailed) -> None:
        msg.stop()
        self.notify(msg.error, severity="error", markup=False)

    def on_worker_status(self, msg: WorkerStatus) -> None:
        msg.stop()
        if msg.text:
            self.notify(msg.text, timeout=3, markup=False)

    def on_reply_view_token_selected(self, event: ReplyView.TokenSelected) -> None:
        event.stop()
        self.query_one("#details", TokenDetails).show(event.turn, event.index)
