"""Control vectors from contrastive pairs: difference of means, or the first principal
component of the paired differences (as repeng's `pca_diff` and llama.cpp's cvector-generator)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .activations import Progress, collect, max_prompt_tokens
from .dataset import Pair, same_sides
from .errors import ContextError, DatasetError
from .runtime import Model
from .vector import ControlVector

METHODS = ("mean", "pca")

# A mean-difference vector added at every layer of a band acts roughly once per layer, so the
# vector is stored as a total strength spread over the suggested band (`prescale`). 1.5 over the layers from
# a quarter to four fifths of the depth gave clear, fluent persona and case effects on SmolLM2
# and Qwen2.5 0.5B (scripts/make_vectors.py prints samples).
SUGGESTED_STRENGTH = 1.5


def suggested_layers(n_layer: int) -> list[int]:
    return list(range(max(1, n_layer // 4), max(2, (4 * n_layer) // 5) + 1))


def format_pair(model: Model, pair: Pair) -> tuple[str, str]:
    """Both sides of a pair as chat prompts in the model's own template."""
    def fmt(user: str) -> str:
        return model.apply_chat_template([{"role": "user", "content": user}]) + pair.assistant
    return fmt(pair.positive), fmt(pair.negative)


def pair_activations(model: Model, pairs: Sequence[Pair], last_n: int = 1,
                     progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Activations of the positive and negative sides, each `(n_pairs, n_layer, n_embd)`."""
    if not pairs:
        raise DatasetError("no pairs to extract from")
    prompts: list[list[int]] = []
    limit = max_prompt_tokens(model)
    for i, pair in enumerate(pairs, 1):
        pos, neg = format_pair(model, pair)
        prompts += [model.tokenize(pos), model.tokenize(neg)]
        for side, toks in (("positive", prompts[-2]), ("negative", prompts[-1])):
            if len(toks) > limit:
                raise ContextError(f"pair {i}: the {side} prompt is {len(toks)} tokens, more than the "
                                   f"{limit} activations are read from")
    acts = collect(model, prompts, layers=range(1, model.n_layer), last_n=last_n, progress=progress)
    return acts[0::2], acts[1::2]


def directions(pos: np.ndarray, neg: np.ndarray, method: str) -> np.ndarray:
    """Per-layer directions `(n_layer, n_embd)` from paired activations `(n_pairs, n_layer, n_embd)`.

    mean: mean(pos) - mean(neg).
    pca:  the first right singular vector of the (uncentred) differences, signed so that
          positives project higher, and scaled to the mean projection of the differences, so
          that scale 1 means "the average positive-negative shift", as for `mean`.
    """
    diffs = (pos - neg).astype(np.float64)
    if method == "mean":
        return diffs.mean(axis=0).astype(np.float32)
    if method != "pca":
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    out = np.zeros(diffs.shape[1:], dtype=np.float32)
    for il in range(diffs.shape[1]):
        d = diffs[:, il, :]
        if not d.any():
            continue
        _, _, vt = np.linalg.svd(d, full_matrices=False)
        v = vt[0]
        proj = d @ v
        if proj.mean() < 0:
            v, proj = -v, -proj
        out[il] = (v * proj.mean()).astype(np.float32)
    return out


@dataclass(frozen=True)
class ExtractResult:
    vector: ControlVector
    seconds: float
    n_pairs: int


def extract(model: Model, pairs: Sequence[Pair], method: str = "mean", dataset_name: str = "",
            model_sha256: str = "", progress: Progress | None = None) -> ExtractResult:
    """Extract a control vector for `model` from contrastive `pairs`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if pairs and all(same_sides(p) for p in pairs):
        raise DatasetError("every pair's positive and negative texts are the same (up to spacing and case): "
                           "there is nothing to contrast")
    t0 = time.perf_counter()
    pos, neg = pair_activations(model, pairs, progress=progress)
    layers = suggested_layers(model.n_layer)
    prescale = SUGGESTED_STRENGTH / len(layers)
    # stored pre-scaled, so that scale 1 (here and in llama.cpp's --control-vector-scaled) is
    # the suggested strength on the suggested layers
    dirs = directions(pos, neg, method) * np.float32(prescale)
    meta = {
        "method": method,
        "model_name": model.info.name,
        "model_sha256": model_sha256,
        "dataset": dataset_name,
        "n_pairs": len(pairs),
        "prescale": float(prescale),
        "scale": 1.0,
        "layers": f"{layers[0]}-{layers[-1]}",
    }
    vector = ControlVector(dirs, model.arch, meta)
    return ExtractResult(vector, time.perf_counter() - t0, len(pairs))
