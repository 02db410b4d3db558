"""Residual-stream activations of many prompts, read from llama.cpp's `l_out-<il>` tensors.

Prompts are packed several to a `llama_decode` (one sequence id each), which is what makes
extraction faster than evaluating them one by one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import ContextError
from .runtime import Capture, Model

Progress = Callable[[int, int], None]


MAX_PROMPT_TOKENS = 4096  # a prompt is one batch (rows stay in order): its attention costs n^2


def max_prompt_tokens(model: Model) -> int:
    """The longest prompt whose activations are read (the model's training context, at most
    MAX_PROMPT_TOKENS)."""
    trained = model.info.n_ctx_train
    return min(MAX_PROMPT_TOKENS, trained) if trained > 0 else MAX_PROMPT_TOKENS


def collect(model: Model, prompts: Sequence[Sequence[int]], layers: Sequence[int] | None = None,
            last_n: int | Sequence[int] = 1, n_batch: int = 512, max_seqs: int = 64,
            progress: Progress | None = None, skip_first: bool = False) -> np.ndarray:
    """Activations `(n_prompts, n_layer, n_embd)` float32, each the mean over the last `last_n`
    token positions of that prompt (1: the last token; a sequence gives one count per prompt).
    Layers not in `layers` stay zero.

    `prompts` are token id lists. `skip_first` leaves the first position out of the mean (its
    activations are outsized "attention sink" values in many models).
    """
    layers = list(range(model.n_layer)) if layers is None else sorted(set(layers))
    longest = max(len(p) for p in prompts)
    limit = max_prompt_tokens(model)
    if longest > limit:
        i = next(i for i, p in enumerate(prompts) if len(p) == longest)
        raise ContextError(f"prompt {i + 1} of {len(prompts)} is {longest} tokens, more than the {limit} "
                           "activations are read from")
    n_batch = max(n_batch, longest)
    out = np.zeros((len(prompts), model.n_layer, model.n_embd), dtype=np.float32)
    capture = Capture(layers)
    ctx = model.context(n_ctx=n_batch, n_batch=n_batch, n_seq_max=max_seqs, capture=capture)
    try:
        done = 0
        for group in _pack([len(p) for p in prompts], n_batch, max_seqs):
            tokens: list[int] = []
            positions: list[int] = []
            seqs: list[int] = []
            outputs: list[bool] = []
            rows: list[list[int]] = []  # per prompt: its pooled rows' batch indices
            for s, i in enumerate(group):
                p = prompts[i]
                k = min(last_n if isinstance(last_n, int) else last_n[i], len(p) - 1 if skip_first and len(p) > 1 else len(p))
                rows.append(list(range(len(tokens) + len(p) - k, len(tokens) + len(p))))
                tokens.extend(p)
                positions.extend(range(len(p)))
                seqs.extend([s] * len(p))
                outputs.extend([j >= len(p) - k for j in range(len(p))])
            ctx.decode(tokens, positions, seqs, outputs)
            output_index = np.cumsum(outputs) - 1  # batch row -> output row (for the pruned last layer)
            for il, act in capture.layers.items():
                for s, i in enumerate(group):
                    idx = rows[s] if act.shape[0] == len(tokens) else output_index[rows[s]]
                    out[i, il] = act[idx].mean(axis=0)
            ctx.clear()
            done += len(group)
            if progress:
                progress(done, len(prompts))
    finally:
        ctx.close()
    return out


def _pack(lengths: list[int], n_batch: int, max_seqs: int) -> list[list[int]]:
    """Group prompt indices so each group fits one decode."""
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and (used + n > n_batch or len(cur) == max_seqs):
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups
