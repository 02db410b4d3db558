"""Rewrite-contrast vectors and case-folded plausibility, on the real models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localsteer.eval import verify
from localsteer.activations import collect
from localsteer.extract import suggested_layers
from localsteer.rewrite import _reply_tokens, extract_rewrite, greedy_replies
from localsteer.sampling import Sampling
from localsteer.casefold import case_classes
from localsteer.steer import Rejection, Steerer
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent
LOWER = verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / "lowercase.jsonl")


def is_lower(text: str) -> bool:
    return verify.check({"type": "lowercase"}, text)


def test_collect_takes_a_count_per_prompt(smol):
    prompts = [smol.user_prompt("Describe the ocean."), smol.user_prompt("What is rain?")]
    both = collect(smol, prompts, layers=[5], last_n=[3, 7])
    one = collect(smol, prompts[:1], layers=[5], last_n=3)
    two = collect(smol, prompts[1:], layers=[5], last_n=7)
    np.testing.assert_allclose(both[0, 5], one[0, 5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both[1, 5], two[0, 5], rtol=1e-4, atol=1e-4)


def test_reply_tokens_carry_no_bos(smol, qwen05):
    for model in (smol, qwen05):
        toks = _reply_tokens(model, "hello there")
        assert model.detokenize(toks) == "hello there"


def test_extract_rewrite_contrast_and_strength_selection(smol):
    train = [it["prompt"] for it in verify.split(LOWER, "train")[:6]]
    val = [it["prompt"] for it in verify.split(LOWER, "validation")[:3]]
    calls = []

    def passes(text):
        calls.append(text)
        return is_lower(text)

    res = extract_rewrite(smol, train, val, "lower", passes, max_tokens=16, scales=(1.0, 3.0))
    v = res.vector
    band = suggested_layers(smol.n_layer)
    assert v.layers == tuple(band) and len(calls) == 2 * len(val)
    assert res.scale in (1.0, 3.0) and [s.scale for s in res.scores] == [1.0, 3.0]
    best = max(s.accuracy for s in res.scores)
    assert next(s for s in res.scores if s.scale == res.scale).accuracy == best
    assert v.meta["method"] == "rewrite-lower" and v.meta["reject_fold"] == "case"
    # the contrast, recomputed: the model's own replies lowercased minus as written, over the reply
    heads = [smol.user_prompt(p) for p in train]
    replies = greedy_replies(smol, heads, 16)
    sides = []
    for rewrite in (str.lower, lambda t: t):
        bodies = [_reply_tokens(smol, rewrite(smol.detokenize(r))) for r in replies]
        acts = collect(smol, [h + b for h, b in zip(heads, bodies)], layers=band, last_n=[len(b) for b in bodies])
        sides.append(acts.mean(0))
    want = (sides[0] - sides[1])[band] * (1.5 / len(band)) * res.scale
    np.testing.assert_allclose(v.directions[band], want, rtol=1e-3, atol=1e-4)


def test_case_classes_join_spellings(smol):
    classes = case_classes(smol)
    assert classes.shape == (smol.n_vocab,)
    when = smol.tokenize(" When", special=False)[-1:]
    low = smol.tokenize(" when", special=False)[-1:]
    the = smol.tokenize(" the", special=False)[-1:]
    assert len(when) == len(low) == 1
    assert classes[when[0]] == classes[low[0]] != classes[the[0]]
    with pytest.raises(ValueError, match="fold"):
        Rejection(fold="accents")


def test_shipped_lowercase_vector_steers_and_survives_folded_rejection(qwen05):
    """Qwen2.5-Coder-0.5B does not write in lowercase when asked; the shipped rewrite vector makes
    it. Exact plausibility rejects every lowercase start (the plain model never chooses one), so
    rejection undoes the effect; plausibility up to case keeps it."""
    vec = ControlVector.load(ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "lowercase.gguf")
    layers = list(vec.layers)
    prompts = [qwen05.user_prompt(it["prompt"]) for it in verify.split(LOWER, "test")[:2]]
    greedy = Sampling(temperature=0)

    def replies(vector, rejection=None):
        st = Steerer(qwen05, vector, layers if vector is not None else None, rejection, layers, details=False)
        try:
            return [qwen05.detokenize([e.token for e in st.generate(p, 20, greedy) if not qwen05.is_eog(e.token)])
                    for p in prompts]
        finally:
            st.close()

    plain = replies(None)
    assert not any(is_lower(t) for t in plain), plain
    assert all(is_lower(t) for t in replies(vec)), replies(vec)
    assert all(is_lower(t) for t in replies(vec, Rejection(topk=20, fold="case")))
    assert not any(is_lower(t) for t in replies(vec, Rejection(topk=20, fold="none")))


def test_recase_lets_the_plain_model_read_the_reply_in_its_own_casing(smol):
    """fold="recase": the plain context reads each accepted token as the member of its case class
    it finds most likely. Recomputed here from scratch: at every step the event's plain
    probability is the plain model's, given the prompt and the reply recased so far."""
    vec = ControlVector.load(ROOT / "vectors" / "smollm2-135m-instruct" / "lowercase.gguf")
    layers = list(vec.layers)
    prompt = smol.user_prompt("What is the capital of France?")
    greedy = Sampling(temperature=0)

    def run(rejection):
        st = Steerer(smol, vec, layers, rejection, layers, details=True)
        try:
            return list(st.generate(prompt, 10, greedy))
        finally:
            st.close()

    events = run(Rejection(topk=smol.n_vocab, fold="recase"))  # K = vocabulary: all accepted
    assert [e.token for e in events] == [e.token for e in run(None)]
    assert is_lower(smol.detokenize([e.token for e in events if not smol.is_eog(e.token)]))
    classes = case_classes(smol)
    seen, recased = list(prompt), 0
    with smol.context() as ctx:
        for e in events:
            ctx.clear()
            ctx.decode_sequence(seen, 0)
            logits = ctx.logits()
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            assert e.plain_prob == pytest.approx(float(probs[e.token]), rel=0.02, abs=1e-4)
            members = np.flatnonzero(classes == classes[e.token])
            seen.append(int(members[np.argmax(logits[members])]))
            recased += seen[-1] != e.token
    assert recased >= 1  # "the" was read as "The" at least once
    # with "case", the plain model reads the lowercase reply itself: other probabilities
    folded = run(Rejection(topk=smol.n_vocab, fold="case"))
    assert [e.token for e in folded] == [e.token for e in events]
    assert any(abs(a.plain_prob - b.plain_prob) > 0.01 for a, b in zip(folded, events))


def _words(events) -> list[list]:
    """Events grouped into the words they write: an event with no plain top-k continues a word
    written in pieces ("recase")."""
    words: list[list] = []
    for e in events:
        if not e.plain_top and words:
            words[-1].append(e)
        else:
            words.append([e])
    return words


def test_recase_falls_back_to_the_plain_word_in_the_vectors_spelling(smol):
    """Where steering falls back to the plain choice, "recase" keeps the plain model's word and
    lets the vector spell it: top-1 plausibility forces many fallbacks, and some of them come out
    in another case than the plain model's own (" Mercury" written " mercury", " Marie" as
    " mar" + "ie"). With "case" a fallback is the plain token itself. And a steered word piece
    accepted as the start of the plain model's word is completed in its spelling."""
    vec = ControlVector.load(ROOT / "vectors" / "smollm2-135m-instruct" / "lowercase.gguf")
    layers = list(vec.layers)
    respelled = 0
    for rejection in (Rejection(topk=1, fold="recase"), Rejection(topk=1, fold="case")):
        st = Steerer(smol, vec, layers, rejection, layers, details=True)
        try:
            events = [e for q in ("Name three famous scientists.", "Which planets are closest to the Sun?")
                      for e in st.generate(smol.user_prompt(q), 16, Sampling(temperature=0))]
        finally:
            st.close()
        fallbacks = [w for w in _words(events) if w[0].status == "plain"]
        assert fallbacks
        for w in fallbacks:
            text = "".join(e.text for e in w)
            assert text.casefold() == w[0].plain_top[0][1].casefold(), (text, w[0].plain_top[0])
        n = sum("".join(e.text for e in w) != w[0].plain_top[0][1] for w in fallbacks)
        if rejection.fold == "case":
            assert n == 0 and all(e.plain_top for e in events)  # "case" takes the plain token as it is
        else:
            respelled = n
            # a steered piece accepted as the start of a plain word (" ven" of " Venus") is
            # followed by the rest of that word, in the same case (" ven" + "us")
            accepted = [w for w in _words(events) if w[0].status != "plain" and len(w) > 1]
            assert accepted
            for w in accepted:
                text = "".join(e.text for e in w).casefold()
                assert text in [t.casefold() for _, t, _ in w[0].plain_top], (text, w[0].plain_top)
    assert respelled >= 1


def test_recase_counts_the_pieces_a_lowercase_word_is_split_into(qwen05):
    """Qwen's tokenizer writes " Tokyo" as one token and " tokyo" as " to" + "ky" + "o": when the
    plain model wants " Tokyo", the steered " to" is as plausible to "recase", " t" is not; and
    the same for capitals (" recipe", " RECIPE")."""
    from localsteer.casefold import extension_mass
    from localsteer.steer import _ReplyDecoder

    tokyo = qwen05.tokenize(" Tokyo", special=False)
    pieces = qwen05.tokenize(" tokyo", special=False)
    t = qwen05.tokenize(" t", special=False)
    assert len(tokyo) == 1 and len(pieces) > 1 and len(t) == 1
    probs = np.full(qwen05.n_vocab, 0.2 / (qwen05.n_vocab - 1))
    probs[tokyo[0]] = 0.8
    st = Steerer(qwen05, None, None, Rejection(fold="recase"), details=False)
    run = _ReplyDecoder(st, [], Sampling(temperature=0), 1)
    assert extension_mass(qwen05, pieces[0], probs) == (pytest.approx(0.8, abs=1e-3), tokyo[0])
    assert extension_mass(qwen05, t[0], probs)[0] < 0.01
    assert run._plausible(pieces[0], np.log(probs))
    recipe = qwen05.tokenize(" recipe", special=False)
    caps = qwen05.tokenize(" RECIPE", special=False)
    assert len(recipe) == 1 and len(caps) > 1
    probs[recipe[0]], probs[tokyo[0]] = 0.8, 0.2 / (qwen05.n_vocab - 1)
    assert extension_mass(qwen05, caps[0], probs) == (pytest.approx(0.8, abs=1e-3), recipe[0])


def test_recase_fallback_spells_a_word_in_pieces_when_its_case_has_no_token(qwen05):
    """A "recase" fallback writes the plain model's word in the vector's case even where that
    spelling takes several tokens (Qwen: " butter" is one token, " BUTTER" is " BUT" + "TER"): the
    steered side writes the pieces, the plain side reads its own word once. Every fallback word,
    its pieces joined, is the plain model's choice up to case."""
    vec = ControlVector.load(ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "uppercase.gguf")
    layers = list(vec.layers)
    st = Steerer(qwen05, vec, layers, Rejection(topk=1, fold="recase"), layers, details=True)
    try:
        events = [e for q in ("Give me a simple recipe for pancakes.", "Describe the ocean in two sentences.")
                  for e in st.generate(qwen05.user_prompt(q), 32, Sampling(temperature=0))]
    finally:
        st.close()
    words = _words(events)
    fallbacks = [w for w in words if w[0].status == "plain"]
    in_pieces = [w for w in fallbacks if len(w) > 1]
    assert in_pieces
    for w in fallbacks:
        text = "".join(e.text for e in w)
        assert text.casefold() == w[0].plain_top[0][1].casefold(), (text, w[0].plain_top[0])
    assert any("".join(e.text for e in w) != w[0].plain_top[0][1] for w in in_pieces)
    # "case" never writes a word in pieces: every fallback is the plain token itself
    st = Steerer(qwen05, vec, layers, Rejection(topk=1, fold="case"), layers, details=True)
    try:
        events = list(st.generate(qwen05.user_prompt("Give me a simple recipe for pancakes."), 32,
                                  Sampling(temperature=0)))
    finally:
        st.close()
    assert all(e.plain_top and e.token == e.plain_top[0][0] for e in events if e.status == "plain")


def test_recase_spells_in_the_case_the_full_vector_writes_letters_in(qwen05):
    """A fallback's spelling follows the case pattern the full-strength steered distribution puts
    most mass on, not the logit of one token: here " Tokyo" itself is the likeliest single token,
    but most of the mass is on lowercase tokens, so the word is written " to" "ky" "o"; with the
    mass on capitals, " TOKYO" (in whatever pieces the tokenizer uses); single capital letters
    ("T") count for neither."""
    from localsteer.casefold import CAPITAL, LOWER, ONE_CAPITAL, UPPER, case_patterns, respelled

    tokyo = qwen05.tokenize(" Tokyo", special=False)[0]
    patterns = case_patterns(qwen05)
    rng = np.random.default_rng(0)

    def spelled(pattern: int) -> str:
        full = np.full(qwen05.n_vocab, -30.0, dtype=np.float32)
        full[rng.choice(np.flatnonzero(patterns == pattern), 2000, replace=False)] = 4.0
        full[rng.choice(np.flatnonzero(patterns == ONE_CAPITAL), 20, replace=False)] = 4.5
        full[tokyo] = 5.0
        return qwen05.detokenize(respelled(qwen05, tokyo, full))

    assert spelled(LOWER) == " tokyo"
    assert spelled(UPPER) == " TOKYO"
    assert spelled(CAPITAL) == " Tokyo"


def test_extract_rewrite_cli_errors(tmp_path):
    base = [sys.executable, "-m", "localsteer.cli", "extract", "-o", str(tmp_path / "v.gguf")]
    no_rewrite = subprocess.run(base + ["-d", str(tmp_path / "x.jsonl"), "--method", "rewrite"],
                                capture_output=True, text=True, cwd=ROOT)
    assert no_rewrite.returncode == 1 and "--rewrite" in no_rewrite.stderr
    missing = subprocess.run(base + ["-d", str(tmp_path / "x.jsonl"), "--method", "rewrite", "--rewrite", "lower"],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and "dataset not found" in missing.stderr
    assert "Traceback" not in missing.stderr
