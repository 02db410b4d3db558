"""Steered generation, with or without dynamic rejection (DIRECTER-style; docs/methods.md, "Dynamic rejection").

A `Steerer` holds one loaded model and two contexts over it: the *steered* one, which carries
the control vector, and the *plain* one, which does not. At every token the steered choice is
checked against the plain distribution; an implausible choice (outside the plain top-k, or
below `minp` x the plain maximum) is rejected, steering is weakened by dropping layers, least
important first, and the token is evaluated again. With no layers left, the plain choice stands.

Two fast paths (`Rejection.loop`; "auto" takes the one the machine's measured decode costs
favour, `calibrate.py`). "joint": one context holds both
sequences, the vector is added to the steered row only (`runtime.RowSteer`), and each token is
one decode of two rows, the steered token and the plain one. "drafted":
the steered context drafts a run of tokens, the plain one checks the whole run with one batched
decode, and both caches roll back at the first rejection; it makes exactly the choices of the
token-by-token loop (`fast=False`).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, Sequence

import numpy as np

from . import calibrate
from .casefold import case_classes, extension_mass, respelled, spellings, spelled
from .runtime import Context, Lora, Model, RowSteer
from .sampling import Sampling, prob_of, softmax, top_indices
from .vector import ControlVector, format_layers

RECOVERY = ("reset", "hold", "gradual")
SCHEDULES = ("halve", "one")
FOLDS = ("none", "case", "recase")
LOOPS = ("auto", "drafted", "joint")
ROUNDS = ("auto", "together", "one-by-one")
PRIOR_TOKENS = 4  # the weight, in tokens, of the replies before the last in `Steerer.passed`
ROUNDS_WIDTH = 4  # at most this many weaker layer sets in one decode (`Rejection.rounds`)

@dataclass(frozen=True)
class Rejection:
    """When to reject a steered token, and how steering comes back afterwards. The method, with
    its measurements: docs/methods.md, "Dynamic rejection".

    topk: a steered token must be among the plain model's `topk` likeliest tokens.
    minp: ...and its plain probability at least `minp` x the plain maximum (0: off).
    recovery: after a weakened token, "reset" restores every layer for the next token, "hold"
      keeps the weakened set for the rest of the reply, "gradual" restores one layer per
      accepted token.
    draft: with loop "drafted", steered tokens drafted before one batched plain check (1: none;
      up to 3 the choices equal the token-by-token loop's; see `_ReplyDecoder._plain_append`).
    schedule: each rejection round drops "halve" the active layers (at least one) or "one",
      least important first.
    fold: "none" compares tokens; "case" judges plausibility up to letter case (for case
      vectors); "recase" also lets the plain model read the reply in its own casing and writes
      words in the vector's casing, in pieces where needed (module `casefold`).
    loop: "joint" (one context, the steered and plain tokens in one two-row decode), "drafted"
      (two contexts, drafts checked in batches), or "auto": the cheaper by the machine's
      measured decode costs (`calibrate.py`) at the share of tokens passing.
    rounds: with the joint loop, a rejected token's weaker layer sets evaluated "together" in
      one decode of a row per set (up to ROUNDS_WIDTH), "one-by-one", or "auto": together on a
      GPU build where the calibration finds that cheaper than the re-evaluations expected, one
      by one on CPU builds. Together, the rows' cache cells take other places in the KV cache
      than one round after another gives them, and llama.cpp's attention sums over the cells in
      that order: the choices are the token-by-token loop's up to those numerics (on a GPU its
      kernels are not batch invariant anyway), not bit for bit.
    """

    topk: int = 20
    minp: float = 0.0
    recovery: str = "reset"
    draft: int = 3
    schedule: str = "halve"
    fold: str = "none"
    loop: str = "auto"
    rounds: str = "auto"

    def __post_init__(self):
        if self.topk < 1:
            raise ValueError("reject top-k must be at least 1")
        if self.draft < 1:
            raise ValueError("draft must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}")
        if self.recovery not in RECOVERY:
            raise ValueError(f"recovery must be one of {RECOVERY}")
        if self.fold not in FOLDS:
            raise ValueError(f"fold must be one of {FOLDS}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}")
        if self.rounds not in ROUNDS:
            raise ValueError(f"rounds must be one of {ROUNDS}")


class Status(str, Enum):
    """How a token was chosen."""

    STEERED = "steered"  # at full steering, plausible to the plain model (or no rejection)
    WEAKENED = "weakened"  # after rejection rounds, with fewer layers steering
    PLAIN = "plain"  # no layer set was plausible (or, after 0 rounds, only one token was): the plain model's choice
    UNSTEERED = "unsteered"  # no steering was on
    SKIPPED = "skipped"  # the plain model left one plausible token: no steered pass (DIRECTER, greedy)

    # a Status is its string everywhere: equal, hashed (dict keys, styles), printed, formatted
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class TokenEvent:
    """What happened at one generated token (for UIs, logs and `generate --events`)."""

    index: int
    token: int
    text: str
    status: Status
    # an event with no plain_top continues a word written in pieces (fold "recase")
    rounds: int  # rejection rounds before this token was accepted
    layers: tuple[int, ...]  # layers active when the token was chosen
    steered_prob: float | None = None
    plain_prob: float | None = None
    plain_top: list[tuple[int, str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"index": self.index, "token": self.token, "text": self.text, "status": self.status.value,
                "rounds": self.rounds, "layers": format_layers(self.layers),
                "steered_prob": self.steered_prob, "plain_prob": self.plain_prob,
                "plain_top": [{"token": t, "text": s, "prob": p} for t, s, p in self.plain_top]}


class Steerer:
    """Generates from one model with a control vector on chosen layers.

    `vector` is already composed and scaled (see `compose`); `layers` are the active layers,
    `importance` orders them from least to most important (for weakening). With `details`
    off, events carry no probabilities (saves a softmax over the vocabulary per token).
    `adapters` (LoRA adapters with scales, e.g. the refusal ablation) are part of the model on
    both sides: the plain side is the adapted model without the vector.
    """

    def __init__(self, model: Model, vector: ControlVector | None = None,
                 layers: Sequence[int] | None = None, rejection: Rejection | None = None,
                 importance: Sequence[int] | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, top_n_events: int = 5, details: bool = True,
                 adapters: Sequence[tuple[Lora, float]] = ()):
        self.model = model
        self.adapters = list(adapters)
        self.details = details
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.top_n_events = top_n_events
        self._steered: Context | None = None
        self._plain: Context | None = None
        self._joint: Context | None = None  # both sequences in one context (Rejection.loop "joint")
        self._rows = RowSteer()
        self._joint_run = False  # the reply in progress uses `_joint`
        # the share of steered tokens that passed the plain check at the first try, in the
        # last reply with rejection: "auto" weighs the loops' costs at it (1 before any reply)
        self.passed = 1.0
        # how many weaker layer sets a rejected token re-evaluates (a running mean, from a prior
        # of 2): what evaluating them in one decode is weighed against (`Rejection.rounds`)
        self.reevaluations = 2.0
        self.configure(vector, layers, rejection, importance)

    def configure(self, vector: ControlVector | None = None, layers: Sequence[int] | None = None,
                  rejection: Rejection | None = None, importance: Sequence[int] | None = None) -> None:
        """Change the steering; takes effect at the next token (also in the middle of a reply:
        call it between two tokens of `generate`). Switching rejection on or off takes effect at
        the next reply; a changed top-k, min-p or recovery at the next token."""
        m = self.model
        self.vector = vector.fit(m.arch, m.n_layer, m.n_embd) if vector is not None else None
        if self.vector is None:
            self.layers: tuple[int, ...] = ()
        elif layers is None:
            self.layers = self.vector.layers
        else:
            self.layers = tuple(sorted(set(layers)))
        self.rejection = rejection
        order = [il for il in (importance or []) if il in self.layers]
        self.importance = tuple(order + [il for il in self.layers if il not in order])
        self._applied: tuple[int, ...] | None = None
        self._dirty = True  # the control vector must be set again
        self._reconfigured = True  # a reply in progress must restart its layer set

    def set_adapters(self, adapters: Sequence[tuple[Lora, float]]) -> None:
        """Change the LoRA adapters (an empty list: none) from the next reply on, on both sides."""
        self.adapters = list(adapters)
        for ctx in (self._steered, self._plain, self._joint):
            if ctx is not None:
                ctx.set_loras(self.adapters)

    def joint_loop(self) -> bool:
        """Whether rejection runs both sides in one context (`Rejection.loop`); "auto" takes the
        loop the machine's measured decode costs favour (`calibrate.costs`, cached) at the share
        of tokens that passed in the last reply: the drafted loop wastes its speculative drafts
        when many are rejected, the joint one has none."""
        loop = self.rejection.loop if self.rejection is not None else "drafted"
        if loop == "auto":
            return calibrate.costs(self.model, self.n_threads).joint_wins(self.passed)
        return loop == "joint"

    # contexts are made on first use and reused across replies; those of the other loop closed
    def _contexts(self) -> tuple[Context, Context | None]:
        if self.rejection is not None and self.joint_loop():
            for ctx in (self._steered, self._plain):
                if ctx is not None:
                    ctx.close()
            self._steered = self._plain = None
            if self._joint is None:
                # sequences 0 and 1, and 2.. for a rejected token's weaker sets (`Rejection.rounds`)
                self._joint = self.model.context(n_ctx=2 * self.n_ctx + 2 * ROUNDS_WIDTH, n_seq_max=2 + ROUNDS_WIDTH,
                                                 n_threads=self.n_threads, capture=self._rows)
                if self.adapters:
                    self._joint.set_loras(self.adapters)
            return self._joint, self._joint
        if self._joint is not None:
            self._joint.close()
            self._joint = None
        if self._steered is None:
            self._steered = self.model.context(n_ctx=self.n_ctx, n_threads=self.n_threads)
            if self.adapters:
                self._steered.set_loras(self.adapters)
        if self.rejection is not None and self._plain is None:
            self._plain = self.model.context(n_ctx=self.n_ctx, n_threads=self.n_threads)
            if self.adapters:
                self._plain.set_loras(self.adapters)
        return self._steered, (self._plain if self.rejection is not None else None)

    def _apply(self, active: tuple[int, ...]) -> None:
        if active == self._applied and not self._dirty:
            return
        if self._joint_run:
            self._rows.set(None if self.vector is None else self.vector.directions, active)
            self._applied = active
            self._dirty = False
            return
        ctx = self._steered
        if self.vector is None or not active:
            ctx.set_control(None)
        else:
            ctx.set_control(self.vector.only_layers(active).directions, min(active), max(active))
        self._applied = active
        self._dirty = False

    def close(self) -> None:
        for ctx in (self._steered, self._plain, self._joint):
            if ctx is not None:
                ctx.close()
        self._steered = self._plain = self._joint = None

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int = 256,
                 sampling: Sampling = Sampling(), fast: bool = True) -> Iterator[TokenEvent]:
        """Yield one `TokenEvent` per generated token after the prompt tokens."""
        if len(prompt) + max_tokens > self.n_ctx:
            max_tokens = max(0, self.n_ctx - len(prompt))
        sampling = sampling.resolved()
        steered, plain = self._contexts()
        steered.clear()
        self._joint_run = steered is plain
        self._dirty = True
        self._reconfigured = False
        state = _ActiveLayers(self)
        self._apply(state.active)
        if self._joint_run:
            # sequence 0 is the steered reply (every prompt row steered), sequence 1 the plain one
            self._rows.rows = None
            steered.decode_sequence(prompt, 0, seq_id=0)
            s_logits = steered.logits()
            self._rows.rows = []
            steered.decode_sequence(prompt, 0, seq_id=1)
            p_logits = steered.logits()
            self._rows.rows = [0]  # from here on every decode's first row is the steered token
            run = _ReplyDecoder(self, list(prompt), sampling, max_tokens, steered, plain)
            yield from self._counted(run.checked(s_logits, p_logits, state))
            return
        steered.decode_sequence(prompt, 0)
        s_logits = steered.logits()
        p_logits = None
        if plain is not None:
            # the last two prompt tokens go in a batch of two: see _ReplyDecoder._plain_append
            plain.clear()
            head = max(0, len(prompt) - 2)
            plain.decode_sequence(prompt[:head], 0)
            tail = list(prompt[head:])
            plain.decode(tail, range(head, len(prompt)), [0] * len(tail), [False] * (len(tail) - 1) + [True])
            p_logits = plain.logits()
        run = _ReplyDecoder(self, list(prompt), sampling, max_tokens, steered, plain)
        if plain is None:
            yield from run.unchecked(s_logits, state)
        elif fast and self.rejection.draft > 1 and self.rejection.fold != "recase":
            yield from self._counted(run.drafted(s_logits, p_logits, state))
        else:
            yield from self._counted(run.checked(s_logits, p_logits, state))

    def _counted(self, events: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        """`events`, counting the steered tokens that passed the plain check at the first try
        into `passed` (a running share: the replies so far, the last ones weighing most)."""
        n = n_pass = 0
        try:
            for ev in events:
                if ev.status != Status.UNSTEERED:
                    n += 1
                    n_pass += ev.rounds == 0 and ev.status != Status.PLAIN
                yield ev
        finally:
            if n:
                self.passed = (PRIOR_TOKENS * self.passed + n_pass) / (PRIOR_TOKENS + n)


class _ActiveLayers:
    """The active layer set through a reply: shrinks on rejection, recovers by policy."""

    def __init__(self, steerer: Steerer, active: tuple[int, ...] | None = None):
        self.steerer = steerer
        self.full = steerer.layers
        self.active = self.full if active is None else active

    def copy(self) -> "_ActiveLayers":
        return _ActiveLayers(self.steerer, self.active)

    def weaken(self) -> None:
        rej = self.steerer.rejection
        n = max(1, len(self.active) // 2) if rej is not None and rej.schedule == "halve" else 1
        drop = [il for il in self.steerer.importance if il in self.active][:n]  # least important first
        self.active = tuple(il for il in self.active if il not in drop) if len(drop) == n else ()

    def after_token(self) -> None:
        rej = self.steerer.rejection
        if rej is None or rej.recovery == "hold" or self.active == self.full:
            return
        if rej.recovery == "reset":
            self.active = self.full
        else:  # gradual: bring back the most important missing layer
            missing = [il for il in reversed(self.steerer.importance) if il not in self.active]
            self.active = tuple(sorted(self.active + (missing[0],)))


class _ReplyDecoder:
    """One reply in progress: the token history, the events, and the three decoding loops."""

    def __init__(self, steerer: Steerer, history: list[int], sampling: Sampling, max_tokens: int,
                 steered: Context | None = None, plain: Context | None = None):
        self.steerer = steerer
        self.steered = steered
        self.plain = plain
        # Rejection.loop "joint": one context, the steered reply as sequence 0, the plain one as 1
        self.joint = steered is not None and steered is plain
        self.model = steerer.model
        self.history = history
        self.plain_history = list(history)  # what the plain context has read (see Rejection.fold)
        self.n_prompt = len(history)
        self.sampling = sampling
        self.max_tokens = max_tokens
        self._rejection = steerer.rejection  # used if rejection is switched off mid-reply
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    @property
    def step(self) -> int:
        return len(self.history) - self.n_prompt

    def _refresh(self, state: _ActiveLayers) -> _ActiveLayers:
        """A fresh layer set when `configure()` changed the steering in the middle of a reply."""
        if not self.steerer._reconfigured:
            return state
        self.steerer._reconfigured = False
        return _ActiveLayers(self.steerer)

    def _done(self, token: int) -> bool:
        return self.model.is_eog(token) or self.step >= self.max_tokens

    def _event(self, token: int, status: str, rounds: int, layers: tuple[int, ...],
               s_logits: np.ndarray | None, p_logits: np.ndarray | None) -> TokenEvent:
        ev = TokenEvent(self.step, token, self.utf8.decode(self.model.piece(token)), status, rounds, layers)
        if not self.steerer.details:
            return ev
        if s_logits is not None:
            ev.steered_prob = prob_of(s_logits, token)
        if p_logits is not None:
            p = softmax(p_logits)
            ev.plain_prob = float(p[token])
            n = self.steerer.top_n_events
            top = top_indices(p, n)
            ev.plain_top = [(int(t), self.model.piece(int(t)).decode("utf-8", "replace"), float(p[t]))
                            for t in top]
        return ev

    @property
    def rejection(self) -> Rejection:
        return self.steerer.rejection or self._rejection

    def _plausible(self, token: int, p_logits: np.ndarray) -> bool:
        return self._judge(token, p_logits)[0]

    def _judge(self, token: int, p_logits: np.ndarray) -> tuple[bool, int | None]:
        """Whether `token` is plausible to the plain model; with fold "recase" also the plain
        word it passed as the first piece of (" to" for " Tokyo"), when it passed only so."""
        rej = self.rejection
        if rej.fold != "none":
            classes = case_classes(self.model)
            probs = softmax(p_logits)
            mass = np.bincount(classes, weights=probs, minlength=int(classes.max()) + 1)

            def passes(mine: float) -> bool:
                return int(np.count_nonzero(mass > mine)) < rej.topk and (rej.minp <= 0 or mine >= rej.minp * mass.max())

            # the test only gets easier with more mass: the word-piece search runs only when needed
            if passes(mass[classes[token]]):
                return True, None
            if rej.fold == "recase":
                extended, word = extension_mass(self.model, token, probs)
                if passes(extended):
                    return True, word
            return False, None
        better = int(np.count_nonzero(p_logits > p_logits[token]))
        if better >= rej.topk:
            return False, None
        if rej.minp > 0:
            return float(np.exp(p_logits[token] - p_logits.max())) >= rej.minp, None
        return True, None

    def _only_plausible(self, p_logits: np.ndarray) -> int | None:
        """The skip test: with greedy decoding and exact plausibility, the plain model's choice
        when it is the only plausible token (top-k 1, or no other token within min-p of it).
        Every weakened set would then either choose it or fall back to it, so the rounds are
        not run; the token is `plain` after 0 rounds."""
        rej = self.rejection
        if not self.sampling.greedy or rej.fold != "none":
            return None
        top = int(np.argmax(p_logits))
        if rej.topk == 1:
            return top if int(np.count_nonzero(p_logits >= p_logits[top])) == 1 else None
        if rej.minp > 0:
            within = np.exp(p_logits - p_logits[top]) >= rej.minp  # as `_judge` tests each token
            return top if int(np.count_nonzero(within)) == 1 else None
        return None

    def _plain_token(self, token: int, p_logits: np.ndarray) -> int:
        """The token the plain context reads for a chosen `token`: itself, or with fold "recase"
        the plain model's likeliest spelling of it."""
        return spelled(self.model, token, p_logits) if self.rejection.fold == "recase" else token

    def unchecked(self, s_logits: np.ndarray, state: _ActiveLayers) -> Iterator[TokenEvent]:
        """Plain steering: no plain model, no rejection."""
        steered = self.steered
        while True:
            state = self._refresh(state)
            self.steerer._apply(state.active)
            status = Status.STEERED if state.active else Status.UNSTEERED
            tok = self.sampling.choose(s_logits, self.step)
            ev = self._event(tok, status, 0, state.active, None, None)
            self.history.append(tok)
            yield ev
            if self._done(tok):
                return
            steered.decode([tok], [len(self.history) - 1], [0], [True])
            s_logits = steered.logits()

    def _resolve(self, s_logits: np.ndarray, p_logits: np.ndarray,
                 state: _ActiveLayers) -> tuple[tuple[int, ...], int, str, int, np.ndarray]:
        """Choose the token at the current step, weakening steering until it is plausible.
        Returns the tokens written (several only with "recase", for a word written in pieces),
        the token the plain context reads, the status, the rejection rounds and the last
        steered logits."""
        step = self.step
        full = s_logits
        tok = self.sampling.choose(s_logits, step, 0)
        rounds = 0
        ok, word = self._judge(tok, p_logits) if state.active else (False, None)
        if state.active and not ok:
            only = self._only_plausible(p_logits)
            if only is not None:  # every round would end with this token: none is evaluated
                return (only,), only, Status.PLAIN, 0, s_logits
        if state.active and not ok and self.joint and self._rounds_together(state):
            rounds, tok, ok, word, s_logits = self._rounds_in_one_decode(state, p_logits)
        while state.active and not ok:
            rounds += 1
            state.weaken()
            if not state.active:
                break
            # re-evaluate the last position with the weaker steering
            self.steerer._apply(state.active)
            s_logits = self._steered_next(self.history[-1], len(self.history) - 1, redo=True)
            tok = self.sampling.choose(s_logits, step, rounds)
            ok, word = self._judge(tok, p_logits)
        if rounds:
            evaluated = rounds if state.active else rounds - 1
            self.steerer.reevaluations = (PRIOR_TOKENS * self.steerer.reevaluations + evaluated) / (PRIOR_TOKENS + 1)
        if not state.active:
            status = Status.PLAIN if self.steerer.layers else Status.UNSTEERED
            tok = self.sampling.choose(p_logits, step, 0)
            if self.rejection.fold == "recase" and self.steerer.layers:
                # the plain model's word, in the spelling the vector likes best: one token of its
                # case class, or pieces (" to" "ky" "o" for " Tokyo") when it has no such token
                return respelled(self.model, tok, full), tok, status, rounds, s_logits
            return (tok,), tok, status, rounds, s_logits
        status = Status.STEERED if rounds == 0 and state.active == state.full else Status.WEAKENED
        if word is not None:
            # accepted as the first piece of the plain model's `word`: the steered side writes
            # the rest of the word in that spelling, the plain side reads the word once
            written = next(sp for sp in spellings(self.model, word) if sp[0] == tok)
            return written, word, status, rounds, s_logits
        if status == Status.WEAKENED and self.rejection.fold == "recase":
            # weakened steering may lose the vector's case: the full-strength vector spells it
            return respelled(self.model, tok, full), self._plain_token(tok, p_logits), status, rounds, s_logits
        return (tok,), self._plain_token(tok, p_logits), status, rounds, s_logits

    def _weaker_sets(self, state: _ActiveLayers) -> list[tuple[int, ...]]:
        """The layer sets the rounds would try after `state`'s, in order (each weakening of the
        last), down to the last that is not empty."""
        sets, probe = [], state.copy()
        while True:
            probe.weaken()
            if not probe.active:
                return sets
            sets.append(probe.active)

    def _rounds_together(self, state: _ActiveLayers) -> bool:
        """Whether this token's rounds are evaluated in one decode of a row per weaker layer set
        (`Rejection.rounds`; "auto": where the calibration finds a decode of that many rows
        cheaper than the one-row decodes the rounds are expected to take, the running mean
        `Steerer.reevaluations`). Joint loop only: its context steers each row on its own."""
        mode = self.rejection.rounds
        if mode == "one-by-one" or (mode == "auto" and not self.model.offloaded):
            return False  # see `Rejection.rounds`: on CPU builds the choices stay the token-by-token loop's
        n = min(len(self._weaker_sets(state)), ROUNDS_WIDTH)
        if mode == "together":
            return n >= 1
        if n < 2:
            return False
        c = calibrate.costs(self.model, self.steerer.n_threads, widths=[n])
        return c.rows[n] < self.steerer.reevaluations * c.one

    def _rounds_in_one_decode(self, state: _ActiveLayers, p_logits: np.ndarray):
        """The rounds of the current token from decodes of up to ROUNDS_WIDTH rows, one per
        weaker layer set (row j on sequence 2 + j, which shares the steered history before the
        token): the first set whose choice passes wins, as one round after another would have
        it; the steered sequence then takes that row's cache entry (the last set's if none
        passes). Returns the rounds, the token, whether it passed, the word (fold "recase") and
        its steered logits; `state` is left at the set that passed (empty if none)."""
        ctx, step = self.steered, self.step
        tok_in, pos = self.history[-1], len(self.history) - 1
        sets = self._weaker_sets(state)
        directions = self.steerer.vector.directions
        ctx.remove(0, pos, -1)  # the full set's entry goes first, as before a round's re-evaluation
        for start in range(0, len(sets), ROUNDS_WIDTH):
            chunk = sets[start:start + ROUNDS_WIDTH]
            seqs = list(range(2, 2 + len(chunk)))
            for seq in seqs:
                ctx.share(0, seq, 0, pos)
            self.steerer._rows.per_row(directions, chunk)
            try:
                ctx.decode([tok_in] * len(chunk), [pos] * len(chunk), seqs, [True] * len(chunk))
                rows = ctx.logits_rows(len(chunk))
            finally:
                self.steerer._rows.per_row(None)
            keep = None
            for j, logits in enumerate(rows):
                tok = self.sampling.choose(logits, step, start + j + 1)
                ok, word = self._judge(tok, p_logits)
                if ok or start + j == len(sets) - 1:
                    keep = j
                    break
            if keep is not None:  # the steered sequence takes the kept row's entry
                ctx.share(seqs[keep], 0, pos, pos + 1)
            for seq in seqs:
                ctx.remove(seq, -1, -1)
            if keep is not None:
                state.active = chunk[keep] if ok else ()
                return start + keep + 1 + (0 if ok else 1), tok, ok, word, rows[keep]
        raise AssertionError("no weaker layer set")  # the caller asks only when there is one

    def _checked_step(self, s_logits: np.ndarray, p_logits: np.ndarray, state: _ActiveLayers, lazy: bool = False):
        """Resolve one token with rejection, yield its event, and feed it to both contexts.
        Returns the next (steered, plain) logits, or None when the reply is over. `lazy`: the
        plain context does not read the token yet (the drafted loop puts it at the head of its
        next batch) and the plain logits returned are None."""
        self.steerer._apply(state.active)
        written, read, status, rounds, s_logits = self._resolve(s_logits, p_logits, state)
        for i, tok in enumerate(written):
            if i:  # the next piece of a word spelled in several: the steered side reads the last
                state.after_token()
                self.steerer._apply(state.active)
                s_logits = self._steered_next(self.history[-1], len(self.history) - 1)
            ev = self._event(tok, status, 0 if i else rounds, state.active, s_logits, None if i else p_logits)
            self.history.append(tok)
            yield ev
            if self._done(tok):
                return None
        # the plain context reads the word once, at its own position (see Rejection.fold)
        self.plain_history.append(read)
        state.after_token()
        self.steerer._apply(state.active)
        if self.joint:  # one decode: the steered token as row 0 (steered), the plain one as row 1
            self.steered.decode([written[-1], read], [len(self.history) - 1, len(self.plain_history) - 1],
                                [0, 1], [True, True])
            return self.steered.logits(0), self.steered.logits(1)
        s_logits = self._steered_next(written[-1], len(self.history) - 1)
        if lazy:
            return s_logits, None
        return s_logits, self._plain_append([read], len(self.plain_history) - 1)[0]

    def _steered_next(self, tok: int, pos: int, redo: bool = False) -> np.ndarray:
        """Feed `tok` at `pos` to the steered sequence alone (`redo`: in place of what is cached
        there, after a weakening); the steered logits after it."""
        ctx = self.steered
        if redo:
            ctx.remove(0, pos, -1)
        ctx.decode([tok], [pos], [0], [True])
        return ctx.logits()

    def checked(self, s_logits: np.ndarray, p_logits: np.ndarray, state: _ActiveLayers) -> Iterator[TokenEvent]:
        """The token-by-token rejection loop (the reference for the drafted one)."""
        while True:
            state = self._refresh(state)
            nxt = yield from self._checked_step(s_logits, p_logits, state)
            if nxt is None:
                return
            s_logits, p_logits = nxt

    def _plain_append(self, toks: list[int], start: int) -> np.ndarray:
        """Decode `toks` at positions start.. on the plain context; their logits `(n, n_vocab)`.

        llama.cpp's CPU kernels give a token slightly different logits (and cache entries) in a
        batch of one than in a batch of several, and with repacked weights also in batches of
        4 or more than in batches of 2 or 3 (measured: docs/methods.md, "Identical choices"). So
        every plain decode after the prompt's head is a batch of 2 or 3 (draft <= 3): a lone token is decoded again
        with its predecessor, whose cache entry comes out the same. That keeps the drafted
        loop's choices bit-identical to the token-by-token one.
        """
        plain = self.plain
        if len(toks) == 1:
            plain.remove(0, start - 1, -1)
            plain.decode([self.plain_history[start - 1], toks[0]], [start - 1, start], [0, 0], [False, True])
            return plain.logits()[None]
        plain.decode(toks, range(start, start + len(toks)), [0] * len(toks), [True] * len(toks))
        return plain.logits_rows(len(toks))

    def drafted(self, s_logits: np.ndarray, p_logits: np.ndarray | None, state: _ActiveLayers) -> Iterator[TokenEvent]:
        """Draft steered tokens and check them with one batched plain decode of 2 or 3 rows.

        The plain side may lag one token behind (`p_logits` None): the token chosen after a
        rejection, or the last one a check judged, is not read by the plain context alone (a
        batch of one, which some kernels compute differently) but at the head of the next
        check, before the drafts. A check of n rows thus judges n drafts when the plain side
        lags (n + 1 when not), and the last of them is drafted lazily, only once the ones before
        it passed. After a rejection a check has 2 rows (fewer speculative drafts to lose),
        after a clean one `draft` rows (more tokens per plain decode). The choices are those of
        the token-by-token loop (`checked`)."""
        rows = self.rejection.draft
        while True:
            state = self._refresh(state)
            start = len(self.history)  # the position of the first draft
            lag = p_logits is None  # the plain context has not read history[-1]
            # 1. draft the tokens the check holds: [history[-1] if lagging] + drafts
            n_known = max(2, min(rows, self.rejection.draft)) - (1 if lag else 0)
            drafts: list[tuple[int, np.ndarray, _ActiveLayers]] = []
            cur, st = s_logits, state
            while True:
                self.steerer._apply(st.active)
                drafts.append((self.sampling.choose(cur, start - self.n_prompt + len(drafts), 0), cur, st.copy()))
                final = self._ends(drafts[-1][0], start + len(drafts))
                if final or len(drafts) == n_known:
                    break
                cur, st = self._draft_next(drafts[-1], start + len(drafts) - 1)
            # 2. the check: one plain decode; judge[i] holds the plain logits for draft i
            batch = ([self.plain_history[-1]] if lag else []) + [d[0] for d in drafts]
            if final and not lag:
                batch.pop()  # nothing is judged after the reply's last token
            judge = [] if lag else [p_logits]
            if batch:
                out = self._plain_append(batch, start - 1 if lag else start)
                judge += list(out)
            # 3. accept the plausible prefix; a draft past the known ones is made when it is judged
            j = 0
            while True:
                if j == len(drafts):
                    cur, st = self._draft_next(drafts[-1], start + j - 1)
                    self.steerer._apply(st.active)
                    drafts.append((self.sampling.choose(cur, start - self.n_prompt + j, 0), cur, st.copy()))
                tok, cur, st = drafts[j]
                if not (st.active and self._plausible(tok, judge[j])):
                    break
                ev = self._event(tok, Status.STEERED if st.active == st.full else Status.WEAKENED, 0, st.active,
                                 cur, judge[j])
                self.history.append(tok)
                self.plain_history.append(tok)
                yield ev
                if self._done(tok):
                    return
                j += 1
                if j == len(judge):
                    break
            if j == len(judge):  # all judged tokens passed: the steered side reads the last one
                s_logits, state = self._draft_next(drafts[j - 1], start + j - 1)
                p_logits, rows = None, self.rejection.draft
                continue
            # 4. roll back to the rejected draft and resolve it token by token
            pos = len(self.history)
            self.steered.remove(0, pos, -1)
            self.plain.remove(0, pos, -1)
            state, rows = drafts[j][2], 2
            nxt = yield from self._checked_step(cur, judge[j], state, lazy=True)
            if nxt is None:
                return
            s_logits, p_logits = nxt

    def _ends(self, token: int, length: int) -> bool:
        """Whether `token`, making the history `length` long, ends the reply."""
        return self.model.is_eog(token) or length - self.n_prompt >= self.max_tokens

    def _draft_next(self, draft: tuple[int, np.ndarray, _ActiveLayers], pos: int) -> tuple[np.ndarray, _ActiveLayers]:
        """The steered side reads a draft (token, logits, layer set) at `pos`, with the layer
        set that follows it; the logits after it and that set."""
        st = draft[2].copy()
        st.after_token()
        self.steerer._apply(st.active)
        self.steered.decode([draft[0]], [pos], [0], [True])
        return self.steered.logits(), st
