"""`localsteer chat`: a Textual chat app that steers the model as you talk to it.

The app composes the widgets and runs the long work in thread workers: loading the model,
writing replies, extracting vectors. The steering panel's changes reach the reply in progress
through a `Mailbox` that the reply worker reads between two tokens.
"""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input
from textual.worker import Worker, get_current_worker

from localsteer import api
from localsteer.api import LocalsteerError, format_layers, parse_layers, suggested_layers

from . import catalog, mix
from .conversation import Conversation, Turn
from .messages import (ModelFailed, ModelLoaded, ReplyFailed, ReplyFinished, SteeringApplied,
                       TokenStreamed, WorkerStatus)
from .options import ChatOptions
from .screens.compare import CompareScreen
from .screens.export import ExportScreen
from .screens.extract import ExtractScreen
from .screens.save import SaveScreen
from .session import Session, Stopped, backend_name
from .widgets.reply_view import ReplyView
from .widgets.status_bar import StatusBar
from .widgets.steering_panel import SteeringPanel
from .widgets.token_details import TokenDetails
from .widgets.transcript import Transcript


FRAME = 1 / 4  # seconds between two redraws of a reply being written (each costs ~14 ms of a core)


class ChatApp(App[None]):
    CSS_PATH = Path(__file__).parent / "app.tcss"  # absolute: subclasses live elsewhere
    TITLE = "localsteer chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        # as in llama.cpp's own chat: Ctrl-C stops the reply being written, else quits
        Binding("ctrl+c", "interrupt", "Stop or quit", show=False, priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("f2", "compare", "Compare"),
        Binding("f3", "extract", "Extract"),
        Binding("f4", "save", "Save"),
        Binding("f5", "export", "Export mix"),
    ]

    def __init__(self, options: ChatOptions | None = None):
        super().__init__()
        self.options = options or ChatOptions()
        self.session: Session | None = None
        self.conversation = Conversation()
        self.mailbox = mix.Mailbox()
        self.choice = mix.PLAIN  # the panel's mix, resolved against the model
        self._settings: mix.MixSettings | None = None
        self._reply: tuple[Turn, Worker] | None = None  # the reply being written
        self._streamed: tuple[Turn, float] | None = None  # tokens not shown yet: their turn, seconds

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                yield TokenDetails(id="details")
                yield Input(id="prompt", placeholder="Message (enter to send)", compact=True)
            yield SteeringPanel(id="panel")
        yield StatusBar(id="status")
        yield Footer(compact=True, show_command_palette=False)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def transcript(self) -> Transcript:
        return self.query_one("#transcript", Transcript)

    @property
    def panel(self) -> SteeringPanel:
        return self.query_one(SteeringPanel)

    @property
    def generating(self) -> bool:
        return self._reply is not None

    # --- the model ------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.status.model = self.options.model_label
        self.status.note = "loading the model…"
        self.query_one("#prompt").focus()
        self.load_model()

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def load_model(self) -> None:
        o = self.options
        try:
            model = api.load_model(o.model, gpu_layers=o.gpu_layers)
            entries, problems = catalog.discover(model, o.model_label, o.vectors, o.shipped_dir, o.user_dir)
            gate = api.load_gate(model, o.when) if o.when else None
            session = Session(model, n_threads=o.threads, adapters=api.load_adapters(model, o.adapters), gate=gate)
            backend = backend_name()
        except (LocalsteerError, ValueError, OSError) as e:
            self.post_message(ModelFailed(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - MemoryError or a bug: a notification, never a hang
            self.post_message(ModelFailed(f"{type(e).__name__}: {e}"))
            return
        self.post_message(ModelLoaded(session, backend, entries, problems))

    def on_model_failed(self, msg: ModelFailed) -> None:
        self.status.note = "no model"
        self.notify(msg.error, title="could not load the model", severity="error", timeout=30,
                    markup=False)

    def on_model_loaded(self, msg: ModelLoaded) -> None:
        self.session = msg.session
        model = msg.session.model
        self.status.backend = msg.backend
        self.status.note = ""
        for problem in msg.problems:
            self.notify(problem, title="vector skipped", severity="error", timeout=15, markup=False)
        self.panel.load(msg.entries, self._initial_layers(msg.entries, model.n_layer),
                        self.options.reject_topk is not None, self.options.reject_topk or 20, model.n_layer,
                        self.options.instruction, self.options.amplify)
        self._apply_settings(self.panel.settings())

    def _initial_layers(self, entries: list[catalog.VectorEntry], n_layer: int) -> str:
        if self.options.layers:
            try:
                return format_layers(parse_layers(self.options.layers, n_layer))
            except LocalsteerError as e:
                self.notify(f"{e}; using the vectors' suggested layers", severity="error", markup=False)
        for e in entries:  # the vectors switched on at the start, else the model's usual band
            if e.enabled and e.fits and e.suggested_layers:
                return format_layers(e.suggested_layers)
        return format_layers(suggested_layers(n_layer))

    def on_unmount(self) -> None:
        self.workers.cancel_all()
        if self.session is not None:
            self.session.close()  # waits for a worker still inside the model

    # --- steering -------------------------------------------------------------------------------

    def on_steering_panel_changed(self, msg: SteeringPanel.Changed) -> None:
        self._apply_settings(msg.settings)

    def _apply_settings(self, settings: mix.MixSettings) -> None:
        if self.session is None or settings == self._settings:
            return
        try:
            choice = mix.choose(self.session.model, settings, self.options.directer)
            if choice.directer is not None and (self.session.gate is not None or self.session.adapters):
                raise ValueError("amplifying the instruction (DIRECTER) does not combine with --lora or --when")
        except (LocalsteerError, ValueError) as e:
            self.notify(str(e), title="steering not changed", severity="error", markup=False)
            return
        if settings.amplify and not settings.instruction:
            self.notify("pin an instruction to amplify (the field above the switch)", severity="warning", markup=False)
        self._settings = settings
        self.choice = choice
        self.mailbox.put(choice)
        self.status.layers = format_layers(choice.steering.layers)
        self.status.rejection = ("DIRECTER" if choice.directer is not None
                                 else f"reject top-{choice.rejection.topk}" if choice.rejection else "")
        self.status.kl = mix.stored_kl(self.session.model, settings)

    # --- chatting -------------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.session is None:
            self.notify("the model is not loaded yet", severity="warning", markup=False)
            return
        if self.generating:
            self.notify("a reply is being written: press esc to stop it", severity="warning", markup=False)
            return
        event.input.clear()
        turn = Turn("user", text)
        self.conversation.turns.append(turn)
        self.transcript.add_user(turn)
        self._start_reply()

    def _start_reply(self) -> None:
        messages = self.conversation.messages()
        turn = Turn("assistant")
        self.conversation.turns.append(turn)
        self.transcript.add_reply(turn)
        self.status.tokens_per_second = None
        self.status.acceptance = None
        self._reply = (turn, self.write_reply(turn, messages))
        self.refresh_bindings()

    @work(thread=True, group="reply", exit_on_error=False)
    def write_reply(self, turn: Turn, messages: list[dict]) -> None:
        worker = get_current_worker()
        o = self.options
        try:
            text, stats = self.session.reply(
                messages, self.mailbox, o.max_tokens, o.sampling,
                cancelled=lambda: worker.is_cancelled,
                on_token=lambda ev, eog, dt: self.post_message(TokenStreamed(turn, ev, eog, dt)),
                on_applied=lambda i, c: self.post_message(SteeringApplied(turn, i, c)),
                status=lambda text: self.post_message(WorkerStatus(text)))
        except Stopped:
            self.post_message(ReplyFailed(turn, ""))
        except (LocalsteerError, ValueError) as e:
            self.post_message(ReplyFailed(turn, str(e)))
        except Exception as e:  # noqa: BLE001 - MemoryError or a bug: the chat goes on
            self.post_message(ReplyFailed(turn, f"{type(e).__name__}: {e}"))
        else:
            self.post_message(ReplyFinished(turn, text, stats))

    def on_steering_applied(self, msg: SteeringApplied) -> None:
        msg.turn.applied.append((msg.index, msg.description))
        msg.turn.steered = msg.turn.steered or bool(msg.layers)

    def on_token_streamed(self, msg: TokenStreamed) -> None:
        """A token joins its turn at once; the screen shows the new tokens at most `FRAME` apart
        (the reply view, the speed, the acceptance, the last token's details): each redraw takes
        CPU from the model on a laptop's few cores."""
        if self.transcript.view_for(msg.turn) is None:
            return  # a reply that was regenerated or cleared meanwhile
        msg.turn.add(msg.event, msg.eog)
        first = self._streamed is None
        self._streamed = (msg.turn, msg.elapsed)
        if first:
            self.set_timer(FRAME, self._show_streamed)

    def _show_streamed(self) -> None:
        if self._streamed is None:
            return
        turn, elapsed = self._streamed
        self._streamed = None
        view = self.transcript.view_for(turn)
        if view is None:
            return
        view.update()
        n = len(turn.events)
        if elapsed > 0:
            self.status.tokens_per_second = n / elapsed
        if turn.steered:
            self.status.acceptance = api.acceptance(turn.events)  # as the finished reply counts it
        if self.transcript.selected is None or self.transcript.selected is view:
            self.query_one(TokenDetails).show(turn, n - 1)

    def on_reply_finished(self, msg: ReplyFinished) -> None:
        self._show_streamed()  # the tokens since the last frame
        turn, stats = msg.turn, msg.stats
        turn.stats = stats
        turn.text = msg.text
        view = self.transcript.view_for(turn)
        if view is not None:
            view.update()
            self.status.tokens_per_second = stats.tokens_per_second
            self.status.acceptance = stats.acceptance if turn.steered else None
        self._reply_done(turn)

    def on_reply_failed(self, msg: ReplyFailed) -> None:
        if msg.error:
            self.notify(msg.error, title="no reply", severity="error", markup=False)
        if msg.turn in self.conversation.turns:
            self.conversation.turns.remove(msg.turn)
            self.transcript.remove_reply(msg.turn)
        self._reply_done(msg.turn)

    def _reply_done(self, turn: Turn) -> None:
        if self._reply is not None and self._reply[0] is turn:
            self._reply = None
            self.status.note = ""
            self.refresh_bindings()

    def on_worker_status(self, msg: WorkerStatus) -> None:
        self.status.note = msg.text

    def on_reply_view_token_selected(self, msg: ReplyView.TokenSelected) -> None:
        self.query_one(TokenDetails).show(msg.turn, msg.index)

    # --- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if len(self.screen_stack) > 1 and action in (
                "stop", "regenerate", "new_chat", "compare", "extract", "save", "export"):
            return False  # the chat's keys belong to the chat screen
        if action == "stop":
            return True if self.generating else None
        if action in ("compare", "extract", "export") and self.session is None:
            return None
        if action == "regenerate" and not any(t.role == "assistant" for t in self.conversation.turns):
            return None
        return True

    def action_interrupt(self) -> None:
        if self.generating:
            self.action_stop()
        else:
            self.exit()  # unmounting cancels the workers; the session waits for one inside the model

    def action_stop(self) -> None:
        if self._reply is not None:
            self._reply[1].cancel()

    def _cancel_reply(self) -> None:
        if self._reply is not None:
            turn, worker = self._reply
            worker.cancel()
            self._reply = None
            if turn in self.conversation.turns:
                self.conversation.turns.remove(turn)
            self.transcript.remove_reply(turn)

    def action_regenerate(self) -> None:
        if self.session is None:
            return
        self._cancel_reply()
        turns = self.conversation.turns
        if turns and turns[-1].role == "assistant":
            self.transcript.remove_reply(turns.pop())
        if turns and turns[-1].role == "user":
            self._start_reply()

    def action_new_chat(self) -> None:
        self._cancel_reply()
        self.conversation = Conversation()
        self.transcript.clear()
        self.query_one(TokenDetails).clear()
        self.status.tokens_per_second = None
        self.status.acceptance = None
        self.refresh_bindings()

    def action_compare(self) -> None:
        if self.session is None:
            return
        prompt = self.query_one("#prompt", Input)
        text = prompt.value.strip()
        if text:
            messages = self.conversation.messages() + [{"role": "user", "content": text}]
            prompt.clear()
        else:
            users = [i for i, t in enumerate(self.conversation.turns) if t.role == "user"]
            if not users:
                self.notify("type a message first: compare answers it plain and steered",
                            severity="warning", markup=False)
                return
            last = users[-1]
            messages = Conversation(self.conversation.turns[:last + 1]).messages()
        self.push_screen(CompareScreen(self.session, messages, self.mailbox, self.options.max_tokens,
                                       self.options.sampling))

    def action_extract(self) -> None:
        if self.session is not None:
            self.push_screen(ExtractScreen(self.session, self.options.user_dir, self.options.datasets_dir),
                             self._extracted)

    def _extracted(self, path: Path | None) -> None:
        if path is None or self.session is None:
            return
        try:
            entry = catalog.entry(self.session.model, path, "extracted")
        except LocalsteerError as e:
            self.notify(str(e), severity="error", markup=False)
            return
        for old in self.panel.rows:
            if old.entry.path.resolve() == path.resolve():
                old.remove()  # overwritten: show the new one
        row = self.panel.add(entry)
        self.call_after_refresh(row.focus)
        self._apply_settings(self.panel.settings())

    def action_save(self) -> None:
        if not self.conversation.turns:
            self.notify("nothing to save yet", severity="warning", markup=False)
            return
        self.push_screen(SaveScreen(self.conversation, self.options.model_label))

    def action_export(self) -> None:
        if self.session is None:
            return
        if self.choice.steering.vector is None:
            self.notify("switch on a vector first: the export is the current mix",
                        severity="warning", markup=False)
            return
        self.push_screen(ExportScreen(self.choice, self.session.model.path))
