"""Instruction vectors (Stolfo et al., ICLR 2025; docs/methods.md, "Instruction vectors").

For one instruction (e.g. "answer in lowercase"), the same base prompts are run with and without
the instruction; the vector is the difference of the mean residual-stream activations at the last
input token, at one layer. The layer is chosen on held-out prompts: the one where steering
*without* the instruction in the prompt most often yields replies that pass the instruction's
checker. The weight follows the projection rule: the vector is added at every position, so its
length is set to lift the average projection of instruction-free activations onto the unit
direction to the average projection of activations that carry the instruction (no scale sweep).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .activations import Progress, collect
from .dataset import Pair
from .errors import DatasetError
from .runtime import Model
from .sampling import Sampling
from .steer import Steerer
from .vector import ControlVector

ALL_POSITIONS = 1 << 20  # `last_n` large enough to average over every position of a prompt


@dataclass(frozen=True)
class LayerScore:
    layer: int
    accuracy: float  # share of validation replies that pass the checker


@dataclass(frozen=True)
class InstructionResult:
    vector: ControlVector
    layer: int
    weight: float
    scores: tuple[LayerScore, ...]
    seconds: float


def candidate_layers(n_layer: int, step: int = 2) -> list[int]:
    """The middle half of the model, every `step` layers."""
    return list(range(max(1, n_layer // 4), max(2, (3 * n_layer) // 4) + 1, step))


def extract_instruction(model: Model, train: Sequence[Pair], validation: Sequence[Pair],
                        passes: Callable[[str], bool], layers: Sequence[int] | None = None,
                        max_tokens: int = 32, name: str = "", model_sha256: str = "",
                        progress: Progress | None = None) -> InstructionResult:
    """An instruction vector from `train` pairs (positive = prompt + instruction, negative =
    prompt), its layer chosen on `validation` prompts with the checker `passes(reply)`."""
    if not train:
        raise DatasetError("no training pairs (lines with \"split\": \"train\")")
    if not validation:
        raise DatasetError("no validation pairs (lines with \"split\": \"validation\")")
    t0 = time.perf_counter()
    layers = list(layers or candidate_layers(model.n_layer))
    with_instr = [model.user_prompt(p.positive) for p in train]
    without = [model.user_prompt(p.negative) for p in train]
    n_val = len(validation)
    total = 2 * len(train) + len(layers) * n_val
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    pos_last = collect(model, with_instr, layers=layers, last_n=1)
    tick(len(train))
    neg_all = collect(model, without, layers=layers, last_n=ALL_POSITIONS, skip_first=True)
    neg_last = collect(model, without, layers=layers, last_n=1)
    tick(len(train))

    greedy = Sampling(temperature=0)
    val_prompts = [model.user_prompt(p.negative) for p in validation]
    steerer = Steerer(model, details=False)
    vectors: dict[int, ControlVector] = {}
    scores: list[LayerScore] = []
    try:
        for il in layers:
            diff = pos_last[:, il].mean(0) - neg_last[:, il].mean(0)
            unit = diff / (np.linalg.norm(diff) + 1e-12)
            # projection rule: lift the average projection of instruction-free activations (all
            # positions, where the vector is added) to that of instruction-carrying ones
            weight = float(np.mean(pos_last[:, il] @ unit) - np.mean(neg_all[:, il] @ unit))
            d = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
            d[il] = unit * weight
            vec = ControlVector(d, model.arch)
            vectors[il] = vec
            steerer.configure(vec, [il])
            ok = 0
            for prompt in val_prompts:
                toks = [e.token for e in steerer.generate(prompt, max_tokens, greedy)]
                ok += passes(model.detokenize([t for t in toks if not model.is_eog(t)]))
                tick(1)
            scores.append(LayerScore(il, ok / n_val))
    finally:
        steerer.close()
    best = max(scores, key=lambda s: (s.accuracy, -abs(s.layer - model.n_layer / 2))).layer
    weight = float(np.linalg.norm(vectors[best].directions[best]))
    meta = {"method": "instruction", "model_name": model.info.name, "model_sha256": model_sha256,
            "dataset": name, "n_pairs": len(train), "scale": 1.0, "layers": str(best),
            "weight": weight,
            "layer_accuracy": [s.accuracy for s in scores], "layer_candidates": [float(s.layer) for s in scores]}
    vector = ControlVector(vectors[best].directions, model.arch, meta)
    return InstructionResult(vector, best, weight, tuple(scores), time.perf_counter() - t0)
