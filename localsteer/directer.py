"""DIRECTER on llama.cpp (Kang & Kim, arXiv 2603.06745; docs/methods.md, "Instruction steering
(DIRECTER)"): steer whatever instruction the prompt holds by amplifying its keys, and accept a
steered token only where the plain model finds it plausible. No vector, no dataset.

How it runs here. One context holds two sequences over one KV cache: 0 is the plain reply, 1 the
steered view of it, sharing every cell of sequence 0 (`Context.share`), so the steered pass
attends to the plain history as the method asks. On sequence 1 `runtime.KeyScale` multiplies the
attention scores against the instruction's cells by alpha in the active layers: the same as
multiplying the instruction's keys by alpha (values untouched) for that row only. Each token is
decoded in one of two ways (`loop`): "split", the plain row first and, unless the skip test
passes (greedy only), the steered row after it; "joint", both rows in one decode of two. "auto"
takes the cheaper on this machine at the share of tokens the last replies skipped
(`calibrate.Costs.directer_joint_wins`: where a second row costs little, as on GPUs and the
Intel hosts, joint; where it costs about as much as the first, split). The steered row's own
cache entry is then dropped and sequence 1 shares sequence 0's (the generated tokens' KV come
from the plain pass). A rejected token is evaluated again on sequence 1 alone with fewer layers.

The loop, per token: with plain top-2 probabilities x >= y, if y < p x only the plain top-1 can
pass, so greedy decoding emits it without a steered pass (`Status.SKIPPED`). Otherwise trial t
(t = 0, 1, ...) takes the steered choice with the layers kept at that trial (all of them at
t = 0, then the most sensitive L / 2^t) and accepts it if its plain probability is more than
p x the plain maximum; after `trials` trials, or below one layer, the plain model's choice stands.
Sampling: the steered distribution of each trial is sampled (seeded by position and trial), the
sampled token takes the same test, and the skip test is not used (it is exact for greedy only).
The sensitivity ranking is computed once per reply, at the first token that needs a second
trial: each layer alone, KL(plain || steered) of that token's distribution, most disturbed first;
the layers are evaluated in one decode of a row per layer where the machine's calibration finds
that cheaper than one decode each (on CPUs too: 24 rows cost far less than 24 decodes of one).

With control vectors, the steered pass adds them too (on their layers within the trial's set);
the plain pass never has them (`InstructionSteerer`).
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import LocalsteerError
from . import calibrate
from .runtime import Callbacks, KeyScale, Model, RowsSteer
from .sampling import Sampling, softmax, top_indices
from .steer import PRIOR_TOKENS, Status, TokenEvent

LOOPS = ("auto", "split", "joint")
BATCHES = ("auto", "together", "one-by-one")  # how a token's further steered rows are evaluated
MAX_SEQ = 256  # llama.cpp's limit on sequences in a context (LLAMA_MAX_SEQ)


class InstructionError(LocalsteerError):
    """An instruction span that is empty or not in the prompt, or bad DIRECTER settings."""


@dataclass(frozen=True)
class Directer:
    """DIRECTER's settings. alpha: the factor on the instruction's keys (the paper's default 100);
    p: a steered token passes if its plain probability > p x the plain maximum; trials: at most
    this many layer sets per token (all layers, then the most sensitive half, quarter, ...)."""

    alpha: float = 100.0
    p: float = 0.5
    trials: int = 10

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise InstructionError(f"alpha must be a finite number above 0, not {self.alpha}")
        if not (math.isfinite(self.p) and 0 < self.p <= 1):
            raise InstructionError(f"p must be in (0, 1], not {self.p}")
        if self.trials < 1:
            raise InstructionError(f"trials must be at least 1, not {self.trials}")


def _only_top_passes(probs: np.ndarray, p: float) -> bool:
    """The skip test: with plain top-2 probabilities x >= y, y < p x leaves only the plain top-1
    able to pass (exact for greedy decoding)."""
    if len(probs) < 2:
        return True
    x, y = probs[top_indices(probs, 2)]
    return bool(y < p * x)


def find_span(model: Model, tokens: Sequence[int], text: str, instruction: str) -> tuple[int, int]:
    """The tokens [start, end) of `tokens` (the tokenized `text`) that spell the last occurrence
    of `instruction` in `text`; an `InstructionError` if it is empty or not there."""
    if not instruction.strip():
        raise InstructionError("the instruction is empty")
    data, want = text.encode("utf-8"), instruction.strip().encode("utf-8")
    at = data.rfind(want)
    if at < 0:
        raise InstructionError(f"the instruction {instruction.strip()!r} is not in the prompt")
    begin, end = at, at + len(want)
    offset, start, stop = 0, None, None
    bos = model.bos_token
    for i, tok in enumerate(tokens):
        piece = model.piece(tok, special=True)
        if i == 0 and tok == bos and not data.startswith(piece):
            continue  # a BOS the tokenizer added: not in the text
        nxt = offset + len(piece)
        if start is None and nxt > begin:
            start = i
        if nxt >= end:
            stop = i + 1
            break
        offset = nxt
    if start is None or stop is None or stop <= start:
        raise InstructionError(f"the instruction {instruction.strip()!r} could not be found in the prompt's tokens")
    return start, stop


class InstructionSteerer:
    """Generates with DIRECTER from one model: `generate(prompt, max_tokens, sampling)` yields a
    `TokenEvent` per token (the `reply.run` interface), steering the prompt tokens `span`.

    With a control vector (`vector`: directions `(n_layer, n_embd)`, `vector_layers` its active
    layers) the steered pass is both: the instruction's keys amplified in the layer set of the
    trial and the vector added (`runtime.RowsSteer`, to the steered row only) on its layers within
    that set; the plain pass has neither. Weakening a token thus weakens both, and the sensitivity
    ranking measures each layer with both.

    `loop`: how a token's two rows are decoded ("split", "joint" or "auto": see the module's
    docstring); `batch`: a token's further steered rows (the ranking's, one per layer; the
    weakened trials' layer sets) evaluated "together" in one decode of several rows,
    "one-by-one", or "auto" (together where the calibration finds such a decode cheaper than the
    one-row decodes it replaces: all of the ranking's, the trials' expected number). The choices
    are the same either way, up to the batch numerics of llama.cpp's kernels (a row decoded
    beside others may get logits a little off a lone one's)."""

    def __init__(self, model: Model, span: tuple[int, int], settings: Directer = Directer(),
                 n_ctx: int = 4096, n_threads: int | None = None, top_n_events: int = 5, kv_f32: bool = False,
                 vector: np.ndarray | None = None, vector_layers: Sequence[int] = (), loop: str = "auto",
                 batch: str = "auto"):
        if loop not in LOOPS:
            raise InstructionError(f"loop must be one of {', '.join(LOOPS)}, not {loop!r}")
        if batch not in BATCHES:
            raise InstructionError(f"batch must be one of {', '.join(BATCHES)}, not {batch!r}")
        self.batch = batch
        # how many further trials a token evaluates once its first failed (a running mean, from a
        # prior of 2): what evaluating them together in one decode is weighed against
        self.extra_trials = 2.0
        self.model = model
        self.span = span
        self.settings = settings
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.loop = loop
        # the share of steered tokens the skip test spared a steered pass, in the last greedy
        # replies (the replies before the last weigh PRIOR_TOKENS tokens): "auto" weighs the loops at it
        self.skipped = 0.0
        self.top_n_events = top_n_events
        self.layers = tuple(range(model.n_layer))
        self._scale = KeyScale()
        self._vector = RowsSteer()
        self.amplify = True
        self.set_steering(True, vector, vector_layers)
        capture = Callbacks(self._scale, self._vector)
        # the plain reply, and a cell more per steered row of the token being decoded: one, or
        # one per layer while the ranking evaluates every layer in one decode (sequences 2, 3, ...)
        self._width = min(len(self.layers), MAX_SEQ - 2)  # rows of one ranking decode
        self._ctx = model.context(n_ctx=n_ctx + self._width + 8, n_seq_max=self._width + 2, n_threads=n_threads,
                                  capture=capture, flash_attn=False, kv_f32=kv_f32)
        self.ranking: tuple[int, ...] | None = None

    def close(self) -> None:
        self._ctx.close()

    def set_steering(self, amplify: bool, vector: np.ndarray | None = None, vector_layers: Sequence[int] = ()) -> None:
        """What the steered pass does from the next token on: amplify the instruction or not, and
        which vector it adds (the chat switches both live). With neither, tokens are plain
        (`Status.UNSTEERED`) and cost one single-row decode."""
        self.amplify = bool(amplify)
        self._directions = vector if vector is not None and len(vector_layers) else None
        self._vector_layers = frozenset(vector_layers) if self._directions is not None else frozenset()
        self.ranking = None  # ranked for the old steering

    @property
    def steers(self) -> bool:
        return self.amplify or self._directions is not None

    def joint(self, greedy: bool = True) -> bool:
        """Whether a reply decodes each token's plain and steered rows in one decode (sampled
        replies skip no token)."""
        if self.loop == "auto":
            return calibrate.costs(self.model, self.n_threads).directer_joint_wins(self.skipped if greedy else 0.0)
        return self.loop == "joint"

    # --- the two passes ----------------------------------------------------------------------

    def _both(self, token: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode `token` at `pos` plain (sequence 0) and steered on every layer (sequence 1);
        their logits. Sequence 1 then shares sequence 0's entry for it."""
        ctx = self._ctx
        self._steer(self.layers, rows=[1])
        ctx.decode([token, token], [pos, pos], [0, 1], [True, True])
        plain, steered = ctx.logits(0), ctx.logits(1)
        self._rejoin(pos)
        return plain, steered

    def _plain(self, token: int, pos: int) -> np.ndarray:
        """Decode `token` at `pos` on sequence 0 alone; sequence 1 gets its own entry there when
        the steered pass runs (`_steered`), else shares this one."""
        self._steer((), rows=[])
        self._ctx.decode([token], [pos], [0], [True])
        return self._ctx.logits()

    def _steered(self, token: int, pos: int, layers: Sequence[int]) -> np.ndarray:
        """`token` at `pos` evaluated again on sequence 1 alone, keys scaled in `layers` only."""
        ctx = self._ctx
        ctx.remove(1, pos, -1)
        self._steer(layers, rows=[0])
        ctx.decode([token], [pos], [1], [True])
        logits = ctx.logits()
        self._rejoin(pos)
        return logits

    def _steer(self, layers: Sequence[int], rows: list[int]) -> None:
        """The next decode steers `rows` (of its batch) in `layers`: keys scaled, and the vector
        added where it is active (no rows: nothing steered)."""
        self._scale.set(layers if rows and self.amplify else (), range(*self.span), self.settings.alpha, rows)
        vector = sorted(self._vector_layers.intersection(layers))
        self._vector.set_rows([(self._directions, vector) if r in rows else (None, ())
                               for r in range(max(rows, default=-1) + 1)])

    def _steered_each(self, token: int, pos: int, sets: Sequence[Sequence[int]]) -> np.ndarray:
        """`token` at `pos` evaluated steered once per layer set of `sets`, all in one decode (row
        j on sequence 2 + j, which shares the plain history before `pos`); their logits
        `(len(sets), n_vocab)`. The sequences are dropped afterwards."""
        ctx, n = self._ctx, len(sets)
        seqs = list(range(2, 2 + n))
        for seq in seqs:
            ctx.share(0, seq, 0, pos)
        self._scale.set_rows([ls if self.amplify else () for ls in sets], range(*self.span), self.settings.alpha)
        self._vector.set_rows([(self._directions, sorted(self._vector_layers.intersection(ls))) for ls in sets])
        try:
            ctx.decode([token] * n, [pos] * n, seqs, [True] * n)
            return ctx.logits_rows(n)
        finally:
            for seq in seqs:
                ctx.remove(seq, -1, -1)

    def _rejoin(self, pos: int) -> None:
        self._ctx.remove(1, pos, -1)  # the steered pass's own cache entry is dropped...
        self._ctx.share(0, 1, pos, pos + 1)  # ...and the plain one taken

    def _together(self, rows: int, replaces: float) -> bool:
        """Whether to evaluate `rows` steered rows in one decode rather than one by one, where
        that is expected to take `replaces` one-row decodes (`batch`; "auto": measured)."""
        if self.batch == "auto":
            c = calibrate.costs(self.model, self.n_threads, widths=[rows])
            return rows > 1 and c.rows[rows] < replaces * c.one
        return self.batch == "together"

    def layer_effects(self, token: int, pos: int, plain: np.ndarray) -> dict[int, float]:
        """KL(plain || steered) of the next-token distribution with the instruction's keys scaled
        (and the vector added) in each layer alone, for `token` at `pos` after the plain history."""
        logp = plain - np.logaddexp.reduce(plain)
        p = np.exp(logp)
        if self._together(self._width, self._width):
            w = self._width
            rows = np.concatenate([self._steered_each(token, pos, [[il] for il in self.layers[i:i + w]])
                                   for i in range(0, len(self.layers), w)])
        else:
            rows = np.stack([self._steered(token, pos, [il]) for il in self.layers])
        logq = rows - np.logaddexp.reduce(rows, axis=1, keepdims=True)
        return {il: float(np.sum(p * (logp - logq[j]))) for j, il in enumerate(self.layers)}

    def _rank(self, token: int, pos: int, plain: np.ndarray) -> tuple[int, ...]:
        """Layers by how much scaling the instruction's keys in that layer alone moves the
        next-token distribution (KL(plain || steered)), most first."""
        kl = self.layer_effects(token, pos, plain)
        return tuple(sorted(self.layers, key=lambda il: (-kl[il], il)))

    # --- the loop ----------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int = 256,
                 sampling: Sampling = Sampling()) -> Iterator[TokenEvent]:
        if len(prompt) < 2 or not 0 <= self.span[0] < self.span[1] <= len(prompt) - 1:
            raise InstructionError("the instruction must lie inside the prompt, before its last token")
        sampling = sampling.resolved()
        max_tokens = min(max_tokens, self.n_ctx - len(prompt))
        model, ctx, st = self.model, self._ctx, self.settings
        ctx.clear()
        self._steer((), rows=[])
        ctx.decode_sequence(list(prompt[:-1]), 0, seq_id=0)
        ctx.share(0, 1)
        self.ranking = None
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        token, pos = prompt[-1], len(prompt) - 1
        joint = self.steers and self.joint(sampling.greedy)
        n_steered = n_skipped = 0
        try:
            for step in range(max_tokens):
                rounds, layers, s_prob = 0, (), None
                if not self.steers:
                    plain = self._plain(token, pos)
                    probs = softmax(plain)
                    choice, status = sampling.choose(plain, step, 0), Status.UNSTEERED
                    ctx.share(0, 1, pos, pos + 1)
                else:
                    # split: the plain row first; where the skip test passes, no steered row is needed
                    plain, steered = self._both(token, pos) if joint else (self._plain(token, pos), None)
                    probs = softmax(plain)
                    n_steered += 1
                    if sampling.greedy and _only_top_passes(probs, st.p):
                        choice, status = int(np.argmax(plain)), Status.SKIPPED
                        n_skipped += 1
                        if not joint:
                            ctx.share(0, 1, pos, pos + 1)
                    else:
                        if steered is None:
                            steered = self._steered(token, pos, self.layers)
                        choice, status, rounds, layers, s_prob = self._trials(token, pos, plain, steered, probs,
                                                                              sampling, step)
                ev = TokenEvent(step, choice, utf8.decode(model.piece(choice)), status, rounds, layers,
                                s_prob, float(probs[choice]), self._top(probs))
                yield ev
                if model.is_eog(choice) or step + 1 >= max_tokens:
                    return
                token, pos = choice, pos + 1
        finally:
            if n_steered and sampling.greedy:
                self.skipped = (PRIOR_TOKENS * self.skipped + n_skipped) / (PRIOR_TOKENS + n_steered)

    def _trial_layers(self, t: int) -> tuple[int, ...]:
        """The layers trial t >= 1 keeps: the ceil(L / 2^t) the ranking puts first."""
        return tuple(sorted(self.ranking[:max(1, math.ceil(len(self.layers) / 2 ** t))]))

    def _trials(self, token: int, pos: int, plain: np.ndarray, steered: np.ndarray, probs: np.ndarray,
                sampling: Sampling, step: int) -> tuple[int, Status, int, tuple[int, ...], float | None]:
        """The steered choice of the first layer set whose choice passes the test, or the plain one.
        The weakened trials' rows come one decode each, or all of them from one decode."""
        bar = self.settings.p * float(probs.max())
        logits, layers = steered, self.layers
        t = evaluated = 0
        together: dict[int, np.ndarray] | None = None
        try:
            while True:
                choice = sampling.choose(logits, step, t)
                if probs[choice] > bar:
                    status = Status.STEERED if t == 0 else Status.WEAKENED
                    return choice, status, t, layers, float(softmax(logits)[choice])
                t += 1
                if t >= self.settings.trials or len(layers) <= 1:
                    return sampling.choose(plain, step, 0), Status.PLAIN, t, (), None
                if self.ranking is None:
                    self.ranking = self._rank(token, pos, plain)
                layers = self._trial_layers(t)
                if together is None:
                    # the trials the loop can still reach: up to `trials`, down to one layer
                    sets = [layers]
                    while t + len(sets) < self.settings.trials and len(sets[-1]) > 1:
                        sets.append(self._trial_layers(t + len(sets)))
                    together = {}
                    if len(sets) > 1 and self._together(len(sets), self.extra_trials):
                        together = dict(zip(range(t, t + len(sets)), self._steered_each(token, pos, sets)))
                logits = together[t] if t in together else self._steered(token, pos, layers)
                evaluated += 1
        finally:
            if t:  # a running mean over the tokens that needed a second trial, the last weighing most
                self.extra_trials = (PRIOR_TOKENS * self.extra_trials + evaluated) / (PRIOR_TOKENS + 1)

    def _top(self, probs: np.ndarray) -> list[tuple[int, str, float]]:
        n = self.top_n_events
        top = top_indices(probs, n)
        return [(int(t), self.model.piece(int(t)).decode("utf-8", "replace"), float(probs[t])) for t in top]
