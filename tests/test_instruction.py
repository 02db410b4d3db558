"""Instruction vectors (Stolfo et al.) on the real SmolLM2-135M model."""

from __future__ import annotations

import numpy as np
import pytest

from localsteer.activations import collect
from localsteer.dataset import Pair
from localsteer.instruction import ALL_POSITIONS, candidate_layers, extract_instruction

PROMPTS = ["Describe the ocean.", "What is a good breakfast?", "Tell me about trains.", "Why is the sky blue?",
           "How do bees make honey?", "Name a famous painter.", "What is rain?", "How do I boil an egg?"]
INSTR = "Answer only in lowercase letters."


def chat(model, text):
    return model.tokenize(model.apply_chat_template([{"role": "user", "content": text}]))


def test_one_layer_chosen_on_validation_with_the_projection_weight(smol):
    train = [Pair(f"{p} {INSTR}", p) for p in PROMPTS[:6]]
    val = [Pair(f"{p} {INSTR}", p) for p in PROMPTS[6:]]
    seen = []

    def passes(text: str) -> bool:
        seen.append(text)
        return text == text.lower()

    layers = [8, 16]
    res = extract_instruction(smol, train, val, passes, layers=layers, max_tokens=12)
    v = res.vector
    assert v.layers == (res.layer,) and res.layer in layers
    assert [s.layer for s in res.scores] == layers and len(seen) == len(layers) * len(val)
    best = max(s.accuracy for s in res.scores)
    assert next(s for s in res.scores if s.layer == res.layer).accuracy == best
    # the weight is the projection rule, recomputed here from the captured activations
    il = res.layer
    pos = collect(smol, [chat(smol, p.positive) for p in train], layers=[il])[:, il]
    neg_last = collect(smol, [chat(smol, p.negative) for p in train], layers=[il])[:, il]
    neg_all = collect(smol, [chat(smol, p.negative) for p in train], layers=[il], last_n=ALL_POSITIONS,
                      skip_first=True)[:, il]
    unit = pos.mean(0) - neg_last.mean(0)
    unit /= np.linalg.norm(unit)
    weight = (pos @ unit).mean() - (neg_all @ unit).mean()
    assert np.isclose(res.weight, weight, rtol=1e-3)
    np.testing.assert_allclose(v.directions[il], unit * weight, rtol=1e-3, atol=1e-4)
    assert v.meta["method"] == "instruction" and v.meta["layers"] == str(il)


@pytest.mark.nomodel
def test_candidate_layers_are_the_middle_half():
    assert candidate_layers(24) == [6, 8, 10, 12, 14, 16, 18]
    assert candidate_layers(30) == [7, 9, 11, 13, 15, 17, 19, 21]
