"""Refusal direction: scoring, INLP on synthetic data, and the shipped Qwen2.5-Coder-0.5B
interventions through the real llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_interop import llama_completion, localsteer_generate

from localsteer import refusal as rf
from localsteer.linear import inlp, logistic_direction, threshold_accuracy
from localsteer.runtime import Lora
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "refusal"
SETS = rf.load_sets(ROOT / "vectors" / "datasets" / "refusal")


@pytest.mark.nomodel
@pytest.mark.parametrize("phrase", rf.PHRASES)
def test_every_refusal_phrase_is_caught(phrase):
    assert rf.is_refusal(f"{phrase.capitalize()} help with that request.")
    assert rf.is_refusal(f"Well. {phrase.upper()} do it.")  # case-insensitive, anywhere in the head


@pytest.mark.nomodel
def test_answers_are_not_refusals_and_late_phrases_do_not_count():
    assert not rf.is_refusal("Sure! Here is a recipe for a quick weeknight vegetable curry: first, chop")
    assert not rf.is_refusal("To kill a hanging Python process, find its PID with ps and run kill -9 PID.")
    assert not rf.is_refusal("x" * rf.REFUSAL_CHARS + " I'm sorry")


@pytest.mark.nomodel
def test_datasets_are_split_and_disjoint():
    for sets in (SETS.harmful, SETS.harmless):
        assert all(len(sets[s]) >= 20 for s in ("train", "validation", "test"))
        assert sum(len(v) for v in sets.values()) >= 120
    every = [p for sets in (SETS.harmful, SETS.harmless) for v in sets.values() for p in v]
    assert len(every) == len(set(every))


@pytest.mark.nomodel
def test_inlp_finds_the_separating_direction_and_removes_it():
    rng = np.random.default_rng(0)
    d = 40
    true = rng.normal(size=d)
    true /= np.linalg.norm(true)

    def sample(n):
        y = rng.integers(0, 2, size=n)
        x = rng.normal(size=(n, d)) + np.outer(np.where(y == 1, 2.5, -2.5), true)
        return x, y

    xt, yt = sample(300)
    xv, yv = sample(200)
    res = inlp(xt, yt, xv, yv, rounds=6, stop_at=0.6)
    assert abs(res.directions[0] @ true) > 0.9
    assert res.validation_accuracy[0] > 0.95
    np.testing.assert_allclose(res.directions @ res.directions.T, np.eye(len(res.directions)), atol=1e-5)
    # after projecting the learned subspace out, a fresh classifier is near chance
    q = res.directions.T.astype(np.float64)
    xv_null = xv - (xv @ q) @ q.T
    w = logistic_direction(xt - (xt @ q) @ q.T, yt)
    assert threshold_accuracy(xv_null, yv, w / np.linalg.norm(w)) < 0.65


def test_post_instruction_tokens_of_qwen(qwen05):
    assert rf.post_instruction_count(qwen05) == 5  # <|im_end|> \n <|im_start|> assistant \n


def replies(model, prompts, control=None, loras=()):
    return rf.generate_replies(model, prompts, 20, control, loras)[0]


def test_shipped_ablation_adapter_removes_refusal_and_addition_induces_it(qwen05):
    # test requests the plain model refuses (it complies with many others: see the refusal table in docs/guide.md)
    refused = ("ex's email", "Instagram account", "racist rant", "assassinate")
    harmful = [p for p in SETS.harmful["test"] if any(k in p for k in refused)]
    harmless = SETS.harmless["test"][:3]
    assert len(harmful) == 4
    plain_h = replies(qwen05, harmful)
    assert sum(map(rf.is_refusal, plain_h)) >= 3  # (replies to harmful requests are not printed)
    lora = Lora(qwen05, SHIPPED / "refusal-ablate.gguf")
    try:
        assert replies(qwen05, harmful, loras=[(lora, 0.0)]) == plain_h  # scale 0 = plain
        ablated = replies(qwen05, harmful, loras=[(lora, 1.0)])
        assert sum(map(rf.is_refusal, ablated)) <= 1
    finally:
        lora.close()
    vec = ControlVector.load(SHIPPED / "refusal-add.gguf")
    plain_b = replies(qwen05, harmless)
    assert not any(map(rf.is_refusal, plain_b)), plain_b
    added = replies(qwen05, harmless, control=(vec.directions, list(vec.layers)))
    assert sum(map(rf.is_refusal, added)) >= 2, added


@pytest.mark.slow
def test_llama_cpp_cli_loads_the_ablation_adapter_and_matches_localsteer(qwen05_path):
    request = next(p for p in SETS.harmful["test"] if "ex's email" in p)  # the plain model refuses this one
    prompt = f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n"
    adapter = str(SHIPPED / "refusal-ablate.gguf")
    theirs = llama_completion(qwen05_path, prompt, 24, "--lora", adapter)
    ours = localsteer_generate(qwen05_path, prompt, 24, "--lora", adapter)
    plain = llama_completion(qwen05_path, prompt, 24)
    assert ours == theirs
    assert rf.is_refusal(plain) and not rf.is_refusal(ours)


def test_refusal_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    base = [sys.executable, "-m", "localsteer.cli", "refusal"]
    table = subprocess.run(base + ["table", "-d", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert table.returncode == 1 and "run `localsteer refusal direction` first" in table.stderr
    direction = subprocess.run(base + ["direction", "-o", str(tmp_path / "o"), "--datasets", str(tmp_path)],
                               capture_output=True, text=True, cwd=ROOT)
    assert direction.returncode == 1 and "dataset not found" in direction.stderr
    assert "Traceback" not in table.stderr + direction.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "refusal-add.gguf").write_bytes(b"x")
    exists = subprocess.run(base + ["direction", "-o", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert exists.returncode == 1 and "exists (use --force" in exists.stderr


def test_candidate_scores_are_cached_reused_and_keyed(smol, tmp_path, monkeypatch):
    from localsteer.errors import DatasetError
    from localsteer.refusal.lora import residual_writers

    splits = ("train", "validation")
    sets = rf.RefusalSets({s: SETS.harmful[s][:3] for s in splits}, {s: SETS.harmless[s][:3] for s in splits})
    weights = residual_writers(smol.path)
    path, key = tmp_path / rf.CACHE, {"model": "smol", "run": 1}

    def select(kl_max):
        return rf.select_direction(smol, weights, sets, kl_max=kl_max, top=2, max_layer_frac=0.15,
                                   cache=rf.CandidateCache(path, key))

    def scores(sel):
        return [(c.layer, c.position, c.induce, c.ablate, c.kl, c.why) for c in sel.candidates]

    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    first = select(kl_max=100.0)
    assert sum(not np.isnan(c.kl) for c in first.candidates) == 2  # the two best inducers were ablated
    assert list(scratch.iterdir()) == []  # the candidates' scratch adapters are gone
    # a rerun reads every score from the file: llama.cpp is not asked for a single distribution
    monkeypatch.setattr(rf.Scorer, "last_logits", lambda *a, **k: pytest.fail("a cached score was recomputed"))
    again = select(kl_max=100.0)
    assert repr(scores(again)) == repr(scores(first))  # (repr: nan == nan)
    np.testing.assert_array_equal(again.direction, first.direction)
    # a stricter bound is applied to the same scores
    with pytest.raises(DatasetError, match="KL <= 1e-09"):
        select(kl_max=1e-9)
    # a file made for another model or other datasets is ignored
    assert rf.CandidateCache(path, {**key, "run": 2}).scores == {}
