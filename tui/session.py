"""The loaded model and the one `Steerer` every reply goes through.

Only worker threads call into a `Session`, and only one at a time (`hold`): llama.cpp contexts
are not thread-safe, and a reply and an extraction must not share the model at once. Whoever
comes second waits (queues) until the first is done or cancelled.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from localsteer import api
from localsteer.api import (ControlVector, Decision, Gate, Lora, Model, Pair, Reply, Sampling, TokenEvent,
                            backend_devices, importance_order)

from .mix import PLAIN, Choice, Mailbox

Cancelled = Callable[[], bool]


class Stopped(Exception):
    """A worker was cancelled while it waited for the model or extracted."""


def backend_name() -> str:
    """"CUDA", "Metal" or "CPU": where llama.cpp runs (as `localsteer doctor` says)."""
    names = [name for name, _ in backend_devices()]
    if any(n.startswith("CUDA") for n in names):
        return "CUDA"
    if any(n.startswith(("Metal", "MTL")) for n in names):
        return "Metal"
    return "CPU"


class Session:
    def __init__(self, model: Model, n_threads: int | None = None, n_ctx: int = 4096,
                 adapters: Sequence[tuple[Lora, float]] = (), gate: Gate | None = None):
        self.model = model
        self.gate = gate  # steer only the turns whose prompt the probe flags
        self.adapters = list(adapters)
        self.n_ctx = n_ctx
        self.steerer = api.make_steerer(model, api.Steering(None, ()), None, n_threads=n_threads, n_ctx=n_ctx,
                                        adapters=adapters)
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self._n_threads = n_threads
        self._directer: api.InstructionSteerer | None = None  # made at the first amplified reply
        # every reply and extraction runs on this one thread: llama.cpp's CPU backend keeps a
        # pool of OpenMP threads per calling thread, and a new calling thread after another one
        # decoded at about half speed (measured: 74 against 163 tok/s, SmolLM2, 2 cores)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localsteer-model")

    def close(self) -> None:
        with self._lock:
            self.steerer.close()
            if self._directer is not None:
                self._directer.close()
            self.model.close()
        self._model_thread.shutdown(wait=False)

    @contextmanager
    def hold(self, cancelled: Cancelled, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Exclusive use of the model; `waiting()` is called once if someone else has it."""
        if not self._lock.acquire(blocking=False):
            waiting()
            while not self._lock.acquire(timeout=0.1):
                if cancelled():
                    raise Stopped()
        try:
            yield
        finally:
            self._lock.release()

    # --- replies --------------------------------------------------------------------------------

    def prompt(self, messages: Sequence[dict], max_tokens: int, system: str | None = None) -> tuple[list[int], int]:
        """Prompt tokens for the conversation (after the `system` message, if any), and how many
        of its oldest messages were left out so that the reply still fits the context."""
        messages = list(messages)
        dropped = 0
        while True:
            tokens = api.chat_prompt(self.model, messages, system=system)
            if len(tokens) + min(max_tokens, 128) <= self.n_ctx:
                return tokens, dropped
            if len(messages) <= 1:
                raise ValueError(f"the message is too long for the {self.n_ctx}-token context")
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            dropped += 2

    def _importance(self, choice: Choice, status: Callable[[str], None]) -> list[int] | None:
        steering = choice.steering
        if choice.rejection is None or steering.vector is None:
            return None
        if self._fingerprint is None:
            self._fingerprint = api.quick_fingerprint(self.model.path)
        status("ranking layers for rejection (once per mix)…")
        return importance_order(self.model, steering.vector, steering.layers, self._fingerprint)

    def reply(self, messages: Sequence[dict], mailbox: Mailbox | Choice, max_tokens: int, sampling: Sampling,
              cancelled: Cancelled, on_token: Callable[[TokenEvent, bool, float], None],
              on_applied: Callable[[int, Choice], None],
              status: Callable[[str], None] = lambda text: None) -> tuple[str, Reply]:
        """Generate a reply to `messages`, steered by the mailbox's latest choice, which may
        change between two tokens. Returns the reply text and its figures."""
        with self.hold(cancelled, lambda: status("waiting for the model…")):
            return self._model_thread.submit(self._reply, messages, mailbox, max_tokens, sampling, cancelled,
                                             on_token, on_applied, status).result()

    def _reply(self, messages: Sequence[dict], mailbox: Mailbox | Choice, max_tokens: int, sampling: Sampling,
               cancelled: Cancelled, on_token: Callable[[TokenEvent, bool, float], None],
               on_applied: Callable[[int, Choice], None], status: Callable[[str], None]) -> tuple[str, Reply]:
        box = mailbox if isinstance(mailbox, Mailbox) else Mailbox(mailbox)
        version, choice = box.latest()
        prompt, dropped = self.prompt(messages, max_tokens, system=choice.instruction or None)
        if choice.directer is not None:
            return self._reply_directer(prompt, dropped, box, version, choice, max_tokens, sampling, cancelled,
                                        on_token, on_applied, status)
        gate = _TurnGate(self.gate, prompt, bool(self.adapters))
        choice = gate.effective(choice)
        if self.adapters:
            self.steerer.set_adapters(self.adapters if gate.steers else [])
        importance = self._importance(choice, status)
        self._configure(choice, importance)
        on_applied(0, choice)
        notes = [f"left out the {dropped} oldest messages to fit the context"] if dropped else []
        if gate.decision is not None:
            notes.append(gate.decision.describe())
        status("; ".join(notes))
        latest = {"version": version}

        def between(ev: TokenEvent) -> None:
            change = box.newer(latest["version"])
            if change:
                # between two tokens: the next one is chosen with the new mix; layer
                # importance stays the one ranked for the reply's first mix
                latest["version"], new = change
                new = gate.effective(new)
                if gate.decision is not None:
                    status(gate.decision.describe())
                self._configure(new, importance)
                on_applied(ev.index + 1, new)

        reply = api.run_reply(self.steerer, prompt, max_tokens, sampling, on_token=on_token, cancelled=cancelled,
                              between=between)
        return reply.text, reply

    def _reply_directer(self, prompt: list[int], dropped: int, box: Mailbox, version: int, choice: Choice,
                        max_tokens: int, sampling: Sampling, cancelled: Cancelled,
                        on_token: Callable[[TokenEvent, bool, float], None],
                        on_applied: Callable[[int, Choice], None], status: Callable[[str], None]) -> tuple[str, Reply]:
        """A reply through DIRECTER's loop, the pinned instruction (the system prompt) amplified.
        Between two tokens the amplification and the vectors follow the panel (switched off, the
        vectors still take DIRECTER's test); a new instruction text waits for the next reply."""
        if self.gate is not None or self.adapters:
            raise ValueError("amplifying the instruction (DIRECTER) does not combine with --lora or --when")
        span = api.instruction_span(self.model, prompt, choice.instruction)
        if self._directer is None:
            self._directer = api.InstructionSteerer(self.model, span, choice.directer, n_ctx=self.n_ctx,
                                                    n_threads=self._n_threads)
        steerer = self._directer
        steerer.span, steerer.settings = span, choice.directer

        def configure(c: Choice) -> Choice:
            v = c.steering.vector
            steerer.set_steering(c.directer is not None, None if v is None else v.directions, c.steering.layers)
            return dataclasses.replace(c, rejection=None, instruction=choice.instruction,
                                       directer=choice.directer if c.directer is not None else None)

        on_applied(0, configure(choice))
        status(f"left out the {dropped} oldest messages to fit the context" if dropped else "")
        latest = {"version": version}

        def between(ev: TokenEvent) -> None:
            change = box.newer(latest["version"])
            if change:
                latest["version"], new = change
                if new.instruction != choice.instruction:
                    status("the new instruction applies from the next reply")
                on_applied(ev.index + 1, configure(new))

        reply = api.run_reply(steerer, prompt, max_tokens, sampling, on_token=on_token, cancelled=cancelled,
                              between=between)
        return reply.text, reply

    def _configure(self, choice: Choice, importance: list[int] | None) -> None:
        s = choice.steering
        self.steerer.configure(s.vector, s.layers or None, choice.rejection, importance)

    # --- extraction -----------------------------------------------------------------------------

    def extract(self, pairs: Sequence[Pair], method: str, dataset_name: str,
                progress: Callable[[int, int], None], cancelled: Cancelled,
                waiting: Callable[[], None] = lambda: None) -> ControlVector:
        def step(done: int, total: int) -> None:
            if cancelled():
                raise Stopped()
            progress(done, total)

        with self.hold(cancelled, waiting):
            return self._model_thread.submit(lambda: api.extract_vector(
                self.model, pairs, method=method, dataset_name=dataset_name, progress=step).vector).result()


class _TurnGate:
    """A probe's decision for one reply, taken on its prompt the first time steering is asked
    for (a steered mix, or the session's adapters); steering the probe turns down is replaced by
    none for the whole reply: no vector, no adapters."""

    def __init__(self, gate: Gate | None, prompt: list[int], adapters: bool = False):
        self.gate = gate
        self.prompt = prompt
        self.adapters = adapters
        self.decision: Decision | None = None

    @property
    def steers(self) -> bool:
        return self.decision is None or self.decision.steer

    def effective(self, choice: Choice) -> Choice:
        if self.gate is None or (choice.steering.vector is None and not self.adapters):
            return choice
        if self.decision is None:
            self.decision = self.gate.decide(self.prompt)
        return choice if self.decision.steer else PLAIN
