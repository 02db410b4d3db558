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
