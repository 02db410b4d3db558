"""Extraction and steered generation on the real SmolLM2-135M model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localsteer import api
from localsteer.extract import directions, pair_activations

DATASETS = Path(__file__).parent.parent / "vectors" / "datasets"
GREEDY = api.sampling_config(temperature=0)


@pytest.fixture(scope="module")
def lowercase(smol):
    pairs = api.load_pairs(DATASETS / "lowercase.jsonl")[:16]
    return api.extract_vector(smol, pairs, method="mean", dataset_name="lowercase.jsonl").vector


def steering(vector, layers):
    return api.Steering(vector.only_layers(layers), tuple(layers))


def gen(model, st, prompt="Describe the ocean.", n=24, sampling=GREEDY):
    return api.generate(model, prompt, st, sampling=sampling, max_tokens=n).tokens


def test_extract_mean_is_difference_of_means(smol):
    pairs = api.load_pairs(DATASETS / "happy-sad.jsonl")[:6]
    pos, neg = pair_activations(smol, pairs)
    v = api.extract_vector(smol, pairs, method="mean").vector
    raw = v.directions[1:] / v.meta["prescale"]
    np.testing.assert_allclose(raw, (pos.mean(0) - neg.mean(0))[1:], rtol=1e-3, atol=1e-4)
    assert v.meta["n_pairs"] == 6 and v.arch == "llama"


@pytest.mark.nomodel
def test_pca_direction_is_signed_and_scaled():
    rng = np.random.default_rng(0)
    true = rng.normal(size=16)
    neg = rng.normal(size=(40, 3, 16))
    pos = neg + true * rng.uniform(0.5, 1.5, size=(40, 1, 1)) + rng.normal(scale=0.05, size=(40, 3, 16))
    d = directions(pos, neg, "pca")
    for il in range(3):
        cos = d[il] @ true / np.linalg.norm(d[il]) / np.linalg.norm(true)
        assert cos > 0.99  # the trait direction, with positives projecting higher
        proj = ((pos - neg)[:, il] @ (d[il] / np.linalg.norm(d[il]))).mean()
        assert np.linalg.norm(d[il]) == pytest.approx(proj, rel=1e-5)


def test_extract_save_load_round_trip(smol, lowercase, tmp_path):
    lowercase.save(tmp_path / "lc.gguf")
    back = api.load_vector(tmp_path / "lc.gguf")
    np.testing.assert_array_equal(back.directions, lowercase.directions)
    assert back.meta["model_sha256"] == lowercase.meta["model_sha256"] != ""


def test_zero_vector_output_is_identical_to_plain(smol, lowercase):
    plain = gen(smol, api.Steering(None, ()))
    assert gen(smol, steering(lowercase * 0.0, range(1, 30))) == plain
    assert gen(smol, steering(lowercase * 4, range(8, 17))) != plain


def test_composition_equals_the_sum(smol, lowercase, tmp_path):
    happy = api.extract_vector(smol, api.load_pairs(DATASETS / "happy-sad.jsonl")[:8]).vector
    lowercase.save(tmp_path / "a.gguf")
    happy.save(tmp_path / "b.gguf")
    composed = api.steering_from_specs(smol, [f"{tmp_path}/a.gguf:2", f"{tmp_path}/b.gguf:3"], "6-14")
    summed = (lowercase * 2 + happy * 3).only_layers(range(6, 15))
    np.testing.assert_allclose(composed.vector.directions, summed.directions, rtol=1e-6)
    baked = api.bake([f"{tmp_path}/a.gguf:2", f"{tmp_path}/b.gguf:3"], 1.0, "6-14")
    baked.save(tmp_path / "baked.gguf")
    one = api.steering_from_specs(smol, [f"{tmp_path}/baked.gguf"])
    assert gen(smol, composed) == gen(smol, one) != gen(smol, api.Steering(None, ()))


def test_seeded_sampling_is_reproducible(smol, lowercase):
    st = steering(lowercase, range(8, 17))
    s = api.sampling_config(temperature=0.9, seed=42)
    assert gen(smol, st, sampling=s) == gen(smol, st, sampling=s)
    assert gen(smol, st, sampling=s) != gen(smol, st, sampling=api.sampling_config(temperature=0.9, seed=7))


def test_perplexity_prefers_the_models_own_greedy_text(smol):
    from localsteer.measure import perplexity
    prompt = api.chat_prompt(smol, "Describe the ocean.")
    own = api.generate(smol, "Describe the ocean.", api.Steering(None, ()), sampling=GREEDY, max_tokens=24).tokens
    rng = np.random.default_rng(0)
    noise = [int(t) for t in rng.integers(100, smol.n_vocab - 1, size=len(own))]
    assert perplexity(smol, prompt, own) < 5 < 1000 < perplexity(smol, prompt, noise)
