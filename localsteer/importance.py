"""Layer importance for weakening: a one-time sensitivity analysis per (model, vector).

Each active layer is steered alone and the KL divergence KL(plain || steered-at-that-layer) of
the next-token distribution is averaged over a few built-in prompts. Dynamic rejection drops the
layers with the smallest KL first. Results are cached under $LOCALSTEER_HOME/importance, keyed by
the model's fingerprint, the layers and the vector's *direction* (the vector divided by its norm,
sign kept), so they are computed once per direction: the ranking is measured at the strength first
used and reused when the user turns the strength up or down, which moves every layer's KL but
rarely their order. A key, not a sidecar file, because mixes of vectors have no file of their own
and shipped vectors may be read-only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np

from .errors import OutputError
from .fileio import write_text
from .models import home
from .runtime import Model
from .sampling import softmax
from .vector import ControlVector

PROMPTS = (
    "Describe the ocean.",
    "What should I cook for dinner tonight?",
    "Explain how a bicycle works.",
    "Write a short note to a friend about the weekend.",
)


def layer_kl(model: Model, vector: ControlVector, layers: Sequence[int]) -> dict[int, float]:
    """Mean KL(plain || steered only at layer il) over `PROMPTS`, for each il in `layers`."""
    prompts = [model.user_prompt(p) for p in PROMPTS]
    n_tok = sum(len(p) for p in prompts)
    ctx = model.context(n_ctx=max(256, n_tok), n_batch=max(256, n_tok), n_seq_max=len(prompts))
    try:
        ctx.set_control(None)
        plain = softmax(ctx.last_logits(prompts))
        result = {}
        for il in layers:
            ctx.set_control(vector.only_layers([il]).directions, il, il)
            steered = softmax(ctx.last_logits(prompts))
            kl = np.sum(plain * (np.log(plain + 1e-12) - np.log(steered + 1e-12)), axis=-1)
            result[int(il)] = float(kl.mean())
    finally:
        ctx.close()
    return result


def _key(model_fingerprint: str, vector: ControlVector, layers: Sequence[int]) -> str:
    h = hashlib.sha256()
    h.update(model_fingerprint.encode())
    d = np.asarray(vector.directions, dtype=np.float64)
    norm = float(np.linalg.norm(d))
    # the direction, rounded so that v and 3 * v / 3 give the same key
    unit = np.round(d / norm, 6) if norm > 0 else d
    h.update(np.ascontiguousarray(unit.astype(np.float32)).tobytes())
    h.update(",".join(map(str, sorted(layers))).encode())
    return h.hexdigest()[:32]


def importance_order(model: Model, vector: ControlVector, layers: Sequence[int],
                     model_fingerprint: str, cache: bool = True) -> list[int]:
    """`layers` from least to most important, computed once and cached."""
    path = home() / "importance" / f"{_key(model_fingerprint, vector, layers)}.json"
    if cache and path.is_file():
        try:
            kl = {int(k): v for k, v in json.loads(path.read_text())["kl"].items()}
            if set(kl) == set(layers):
                return sorted(kl, key=lambda il: (kl[il], il))
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    kl = layer_kl(model, vector, layers)
    if cache:
        try:
            write_text(path, json.dumps({"kl": kl, "prompts": PROMPTS}))
        except OutputError:
            pass  # a cache that cannot be written is recomputed next time
    return sorted(kl, key=lambda il: (kl[il], il))
