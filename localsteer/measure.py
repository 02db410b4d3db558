"""Measurements of what steering does: fluency (perplexity under the plain model)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .runtime import Model

# A reply counts as fluent when its perplexity under the plain model is at most this: plain greedy
# replies measure 1.2-4 on the shipped models; degenerate ones (symbol loops, word salad) 20 to thousands.
FLUENT_PPL = 10.0


def perplexity(model: Model, prompt: Sequence[int], output: Sequence[int]) -> float:
    """Perplexity of `output` tokens after `prompt` under the plain (unsteered) model."""
    if not output:
        return float("nan")
    tokens = list(prompt) + list(output)
    n_batch = max(64, len(tokens))
    with model.context(n_ctx=max(256, len(tokens)), n_batch=n_batch) as ctx:
        outs = [i >= len(prompt) - 1 and i < len(tokens) - 1 for i in range(len(tokens))]
        ctx.decode(tokens, range(len(tokens)), [0] * len(tokens), outs)
        logits = ctx.logits_rows(len(output)).astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    nll = logz - logits[np.arange(len(output)), list(output)]
    return float(np.exp(nll.mean()))


# --- side effects: KL(plain ‖ steered) on benign prompts -----------------------------------------

def greedy_reply(model: Model, prompt: Sequence[int], n_tokens: int) -> list[int]:
    """The plain model's greedy continuation of `prompt` (up to `n_tokens`, stops at end of turn)."""
    out: list[int] = []
    with model.context(n_ctx=len(prompt) + n_tokens + 8, n_batch=max(64, len(prompt))) as ctx:
        ctx.decode_sequence(list(prompt), 0)
        for i in range(n_tokens):
            tok = int(np.argmax(ctx.logits()))
            if model.is_eog(tok):
                break
            out.append(tok)
            if i + 1 < n_tokens:
                ctx.decode([tok], [len(prompt) + i], [0], [True])
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) of each row of two logit arrays `(n, n_vocab)`."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


class BenignKL:
    """KL(plain ‖ steered) of next-token distributions along the plain model's own greedy replies
    to benign prompts (teacher-forced: both sides read the same text), averaged over positions
    and prompts. The plain replies and logits are computed once and reused for every steering."""

    def __init__(self, model: Model, prompts: Sequence[Sequence[int]], n_tokens: int = 16,
                 progress=None):
        self.model = model
        self.rows: list[tuple[list[int], int, np.ndarray]] = []  # tokens, first row, plain logits
        for i, prompt in enumerate(prompts):
            reply = greedy_reply(model, prompt, n_tokens)
            tokens = list(prompt) + reply[:-1] if reply else list(prompt)
            self.rows.append((tokens, len(prompt) - 1, self._logits(tokens, len(prompt) - 1)))
            if progress:
                progress(i + 1, len(prompts))

    def _logits(self, tokens: list[int], first: int, control=None, loras=()) -> np.ndarray:
        with self.model.context(n_ctx=len(tokens) + 8, n_batch=max(64, len(tokens))) as ctx:
            if control is not None:
                directions, layers = control
                ctx.set_control(directions, min(layers), max(layers))
            if loras:
                ctx.set_loras(list(loras))
            ctx.decode(tokens, range(len(tokens)), [0] * len(tokens), [i >= first for i in range(len(tokens))])
            return ctx.logits_rows(len(tokens) - first)

    def each(self, directions: np.ndarray | None = None, layers: Sequence[int] = (), loras=()) -> np.ndarray:
        """Each prompt's mean KL for a control vector `(n_layer, n_embd)` active on `layers`
        (and/or adapters)."""
        control = (directions, layers) if directions is not None and len(layers) else None
        if control is None and not loras:
            return np.zeros(len(self.rows))
        return np.array([kl_divergence(plain, self._logits(tokens, first, control, loras)).mean()
                         for tokens, first, plain in self.rows])

    def measure(self, directions: np.ndarray | None = None, layers: Sequence[int] = (), loras=()) -> float:
        """The mean over prompts of `each`."""
        return float(np.mean(self.each(directions, layers, loras)))
