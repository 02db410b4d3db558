"""One reply loop, whoever asks for it (`generate`, the Python API, the chat, the eval grid): it
runs a `Steerer` over a prompt, streams each token's event, stops when asked to, and reports
the reply with one definition of its figures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .sampling import Sampling
from .steer import Status, Steerer, TokenEvent


def acceptance(events: Sequence[TokenEvent]) -> float:
    """The share of a reply's tokens that rejection left as steering chose them: every token but
    the weakened ones and the plain fallbacks (1.0 for no tokens)."""
    if not events:
        return 1.0
    changed = sum(e.status in (Status.WEAKENED, Status.PLAIN) for e in events)
    return 1.0 - changed / len(events)


@dataclass
class Reply:
    """A finished (or stopped) reply. `tokens` include an end-of-generation token if the model
    wrote one; `text` does not."""

    text: str
    tokens: list[int]
    events: list[TokenEvent]
    seconds: float
    n_prompt: int
    stopped: bool = False  # `cancelled` stopped it before its end
    context_full: bool = False  # the context ran out before `max_tokens`
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        return acceptance(self.events)


def run(steerer: Steerer, prompt: Sequence[int], max_tokens: int, sampling: Sampling,
        on_token: Callable[[TokenEvent, bool, float], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        between: Callable[[TokenEvent], None] | None = None) -> Reply:
    """Generate a reply to the `prompt` tokens. `on_token(event, is_end, seconds_so_far)` sees
    each token as it comes; `cancelled()` is asked after each one and stops the reply;
    `between(event)` runs between two tokens (where `steerer.configure` may change the steering)."""
    model = steerer.model
    events: list[TokenEvent] = []
    stopped = False
    t0 = time.perf_counter()
    stream = steerer.generate(prompt, max_tokens, sampling)
    try:
        for ev in stream:
            events.append(ev)
            end = model.is_eog(ev.token)
            if on_token is not None:
                on_token(ev, end, time.perf_counter() - t0)
            if cancelled():
                stopped = not end
                break
            if between is not None:
                between(ev)
    finally:
        stream.close()
    seconds = time.perf_counter() - t0
    tokens = [e.token for e in events]
    ended = bool(tokens) and model.is_eog(tokens[-1])
    full = not stopped and not ended and len(tokens) < max_tokens and len(prompt) + len(tokens) >= steerer.n_ctx
    return Reply(model.detokenize([t for t in tokens if not model.is_eog(t)]), tokens, events, seconds, len(prompt),
                 stopped=stopped, context_full=full)
