"""Rewrite-contrast vectors, for instructions that are a fixed rewrite of the text (lowercase, uppercase).

Stolfo et al.'s instruction vector (instruction.py) reads the model at the last *prompt* token, where
it has understood the instruction. On the small models here that direction carries "an
instruction was given" more than "write in lowercase": added back it shortens replies and, stronger,
breaks them, without lowering their case (Qwen2.5-Coder-0.5B: at most 2/12 validation replies in
lowercase at any layer or weight, none fluent). For a format that is a deterministic rewrite of the
text, the model can show us the state we want directly:

1. it answers the training prompts plainly (greedy);
2. each reply is read twice after its prompt: rewritten (e.g. lowercased) and as written;
3. the vector is the difference of the mean activations over the reply positions, per layer, on the
   suggested band, pre-scaled as `extract` does (scale 1 = strength 1.5 over the band);
4. the strength is chosen on validation prompts: the smallest multiplier of `SCALES` at which the
   most replies pass the checker while staying fluent (perplexity under the plain model at most
   `FLUENT_PPL`), and baked into the saved vector, so scale 1 is the chosen strength.

No instruction text is involved: the contrast is the model's own text in two spellings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .activations import Progress, collect
from .errors import DatasetError
from .extract import SUGGESTED_STRENGTH, suggested_layers
from .measure import FLUENT_PPL, perplexity
from .runtime import Model
from .sampling import Sampling
from .steer import Steerer
from .vector import ControlVector

REWRITES: dict[str, Callable[[str], str]] = {"lower": str.lower, "upper": str.upper}
SCALES = (1.0, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class ScaleScore:
    scale: float
    accuracy: float  # share of validation replies that pass the checker and are fluent
    pass_rate: float  # share that pass the checker


@dataclass(frozen=True)
class RewriteResult:
    vector: ControlVector
    scale: float
    scores: tuple[ScaleScore, ...]
    seconds: float


def _reply_tokens(model: Model, text: str) -> list[int]:
    """`text` as reply tokens: no BOS (the tokenizer adds one for models that want it first)."""
    toks = model.tokenize(text, special=False)
    bare = model.tokenize("", special=False)
    return toks[len(bare):] if bare and toks[:len(bare)] == bare else toks


def greedy_replies(model: Model, prompts: Sequence[list[int]], max_tokens: int,
                   vector: ControlVector | None = None, tick: Callable[[], None] = lambda: None
                   ) -> list[list[int]]:
    """Greedy reply tokens (end-of-generation left out) to each chat prompt."""
    steerer = Steerer(model, vector, list(vector.layers) if vector is not None else None, details=False)
    out = []
    try:
        for p in prompts:
            toks = [e.token for e in steerer.generate(p, max_tokens, Sampling(temperature=0))]
            out.append([t for t in toks if not model.is_eog(t)])
            tick()
    finally:
        steerer.close()
    return out


def score_scales(model: Model, vector: ControlVector, prompts: Sequence[list[int]],
                 passes: Callable[[str], bool], scales: Sequence[float] = SCALES, max_tokens: int = 32,
                 tick: Callable[[], None] = lambda: None) -> list[ScaleScore]:
    """Fluent checker accuracy of greedy replies to `prompts` with `vector` at each scale."""
    scores = []
    for scale in scales:
        ok = fluent = 0
        for prompt, body in zip(prompts, greedy_replies(model, prompts, max_tokens, vector * scale, tick)):
            good = passes(model.detokenize(body))
            ok += good
            fluent += good and bool(body) and perplexity(model, prompt, body) <= FLUENT_PPL
        scores.append(ScaleScore(float(scale), fluent / len(prompts), ok / len(prompts)))
    return scores


def extract_rewrite(model: Model, train: Sequence[str], validation: Sequence[str], rewrite: str,
                    passes: Callable[[str], bool], max_tokens: int = 40, scales: Sequence[float] = SCALES,
                    name: str = "", model_sha256: str = "",
                    progress: Progress | None = None) -> RewriteResult:
    """A rewrite-contrast vector from the user prompts `train` (see the module docstring), its
    strength chosen on the prompts `validation` with the checker `passes(reply)`."""
    if rewrite not in REWRITES:
        raise ValueError(f"unknown rewrite {rewrite!r}; use one of {tuple(REWRITES)}")
    if not train:
        raise DatasetError("no training prompts (lines with \"split\": \"train\")")
    if not validation:
        raise DatasetError("no validation prompts (lines with \"split\": \"validation\")")
    t0 = time.perf_counter()
    total = 2 * len(train) + len(scales) * len(validation)
    done = 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    heads = [model.user_prompt(p) for p in train]
    replies = greedy_replies(model, heads, max_tokens, tick=tick)
    keep = [(h, r) for h, r in zip(heads, replies) if r]
    if not keep:
        raise DatasetError("the model gave no reply to any training prompt")
    layers = suggested_layers(model.n_layer)
    sides = []
    for side in (REWRITES[rewrite], lambda text: text):
        seqs, counts = [], []
        for head, body in keep:
            toks = _reply_tokens(model, side(model.detokenize(body)))
            seqs.append(head + toks)
            counts.append(len(toks))
        sides.append(collect(model, seqs, layers=layers, last_n=counts).mean(axis=0))
        tick(len(train) // 2)
    prescale = SUGGESTED_STRENGTH / len(layers)
    dirs = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
    dirs[layers] = (sides[0] - sides[1])[layers] * np.float32(prescale)
    base = ControlVector(dirs, model.arch)
    val = [model.user_prompt(p) for p in validation]
    scores = score_scales(model, base, val, passes, scales, tick=tick)
    best = max(scores, key=lambda s: (s.accuracy, s.pass_rate, -s.scale))
    meta = {"method": f"rewrite-{rewrite}", "model_name": model.info.name, "model_sha256": model_sha256,
            "dataset": name, "n_pairs": len(keep), "prescale": float(prescale * best.scale),
            "scale": 1.0, "layers": f"{layers[0]}-{layers[-1]}", "selected_scale": best.scale,
            "scale_candidates": [s.scale for s in scores],
            "scale_accuracy": [s.accuracy for s in scores],
            # plausibility for dynamic rejection is judged up to letter case (steer.Rejection.fold)
            "reject_fold": "case"}
    vector = ControlVector(base.directions * np.float32(best.scale), model.arch, meta)
    return RewriteResult(vector, best.scale, tuple(scores), time.perf_counter() - t0)
