"""Probes and probe-gated steering (`--when`), and the benign-KL side-effect measure: the numpy
parts on synthetic arrays, the rest through the real llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localsteer import api
from localsteer.errors import ProbeError
from localsteer.linear import logistic_fit, sigmoid
from localsteer.measure import BenignKL, kl_divergence
from localsteer.probe import Probe, Scores, best_threshold
from localsteer.refusal import is_refusal, load_sets
from localsteer.sampling import Sampling
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent
QWEN05 = ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct"
PROBE = QWEN05 / "probes" / "harmful.gguf"
ADD = QWEN05 / "refusal" / "refusal-add.gguf"
KTS = QWEN05 / "refusal" / "refusal-add-kts.gguf"
SETS = load_sets(ROOT / "vectors" / "datasets" / "refusal")
GREEDY = Sampling(temperature=0.0)


# --- numpy ------------------------------------------------------------------------------------

def _full_newton(x, y, l2=1e-2):
    n, d = x.shape
    mu = x.mean(0)
    sc = (x - mu).std()
    xb = np.hstack([(x - mu) / sc, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = l2 * n * np.eye(d + 1)
    reg[-1, -1] = 0
    for _ in range(100):
        p = sigmoid(xb @ w)
        step = np.linalg.solve((xb * (p * (1 - p))[:, None]).T @ xb + reg, xb.T @ (p - y) + reg @ w)
        w -= step
    return w[:-1] / sc, w[-1] - (w[:-1] / sc) @ mu


@pytest.mark.nomodel
def test_logistic_fit_in_the_sample_span_equals_the_full_solve():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 120)) + 3.0
    y = (x[:, 0] - x[:, 1] + 0.3 * rng.normal(size=40) > 0).astype(float)
    w, b = logistic_fit(x, y)  # d > n: solved in the 40-dim span
    wf, bf = _full_newton(x, y)
    assert np.allclose(w, wf, rtol=1e-5, atol=1e-8) and abs(b - bf) < 1e-5
    assert np.mean((sigmoid(x @ w + b) >= 0.5) == (y == 1)) == 1.0


@pytest.mark.nomodel
def test_threshold_and_scores():
    p = np.array([0.1, 0.2, 0.35, 0.4, 0.9, 0.95])
    y = np.array([0, 0, 1, 0, 1, 1])
    t = best_threshold(p, y)
    assert np.mean((p >= t) == (y == 1)) == 5 / 6 and abs(t - 0.5) <= 0.5
    s = Scores.of(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    assert (s.accuracy, s.precision, s.recall, s.n) == (0.5, 0.5, 0.5, 4)


@pytest.mark.nomodel
def test_probe_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    probe = Probe(rng.normal(size=64).astype(np.float32), -0.25, 0.4, 7, "qwen2", 24, 5, {"name": "x"})
    path = probe.save(tmp_path / "p.gguf")
    back = Probe.load(path)
    assert np.array_equal(back.weight, probe.weight) and back.layer == 7 and back.positions == 5
    assert back.bias == pytest.approx(-0.25) and back.threshold == pytest.approx(0.4) and back.meta["name"] == "x"
    with pytest.raises(Exception, match="exists"):
        probe.save(path)
    with pytest.raises(ProbeError, match="not a probe"):
        Probe.load(ADD)
    with pytest.raises(ProbeError, match="not found"):
        Probe.load(tmp_path / "missing.gguf")


@pytest.mark.nomodel
def test_kl_divergence_rows():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    kl = kl_divergence(p, q)
    assert kl[0] == pytest.approx(0.0) and kl[1] == pytest.approx(0.9 * np.log(1.8) + 0.1 * np.log(0.2))


# --- the real model ---------------------------------------------------------------------------

def test_probe_separates_held_out_refusal_prompts(qwen05):
    result = api.train_probe_sets(qwen05, SETS.harmful, SETS.harmless)
    assert result.test is not None and result.test.n == len(SETS.harmful["test"]) + len(SETS.harmless["test"])
    assert result.test.accuracy >= 0.9, result.report()
    # The shipped probe was made by the same command on the same data, on another CPU: llama.cpp's
    # kernels round differently per instruction set (AVX-512 vs AVX2), so the layer chosen by
    # cross-validation may differ by a near-tie. What must hold everywhere: the shipped probe
    # separates the held-out prompts as well, and its layer is as good as the best one here.
    shipped = Probe.load(PROBE)
    test = SETS.harmful["test"] + SETS.harmless["test"]
    p = shipped.prompt_probability(qwen05, [api.chat_prompt(qwen05, t) for t in test])
    labels = np.array([1] * len(SETS.harmful["test"]) + [0] * len(SETS.harmless["test"]))
    assert np.mean((p >= shipped.threshold) == (labels == 1)) >= 0.9
    assert result.cv_accuracy[shipped.layer] >= np.nanmax(result.cv_accuracy) - 0.03, result.report()


def test_gated_steering_is_plain_on_benign_prompts_and_steered_on_flagged_ones(qwen05):
    gate = api.load_gate(qwen05, PROBE)
    steering = api.steering_from_specs(qwen05, [str(ADD)])
    harmless = SETS.harmless["test"][:8]
    p = gate.probe.prompt_probability(qwen05, [api.chat_prompt(qwen05, t) for t in harmless])
    benign = [t for t, q in zip(harmless, p) if q < gate.probe.threshold][:2]
    assert len(benign) == 2
    for text in benign:
        plain = api.generate(qwen05, text, api.Steering(None, ()), GREEDY, max_tokens=16)
        steered = api.generate(qwen05, text, steering, GREEDY, max_tokens=16)
        gated = api.generate(qwen05, text, steering, GREEDY, max_tokens=16, gate=gate)
        assert gated.tokens == plain.tokens and gated.extra["gate"]["steer"] is False
        assert steered.tokens != plain.tokens  # the vector does change this reply when not gated
    flagged = next(t for t in SETS.harmful["test"] if "racist rant" in t)
    gated = api.generate(qwen05, flagged, steering, GREEDY, max_tokens=16, gate=gate)
    steered = api.generate(qwen05, flagged, steering, GREEDY, max_tokens=16)
    assert gated.extra["gate"]["steer"] is True and gated.tokens == steered.tokens and is_refusal(gated.text)


def test_the_gate_switches_adapters_off_with_the_vector(qwen05):
    # the vector with its KL-then-steer adapter, as the side-effects table uses them: a prompt the
    # probe does not flag gets the plain model, adapter included; a flagged one gets both
    gate = api.load_gate(qwen05, PROBE)
    steering = api.steering_from_specs(qwen05, [str(ADD)])
    adapters = api.load_adapters(qwen05, [str(KTS)])
    try:
        benign = "Give me a recipe for a quick weeknight vegetable curry."
        plain = api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=16)
        adapted = api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=16, adapters=adapters)
        assert adapted.tokens != plain.tokens  # the adapter alone does change this reply
        for gated in (api.generate(qwen05, benign, steering, GREEDY, max_tokens=16, adapters=adapters, gate=gate),
                      api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=16,
                                   adapters=adapters, gate=gate)):  # an adapter alone is gated too
            assert gated.extra["gate"]["steer"] is False and gated.tokens == plain.tokens
        flagged = next(t for t in SETS.harmful["test"] if "racist rant" in t)
        both = api.generate(qwen05, flagged, steering, GREEDY, max_tokens=16, adapters=adapters)
        gated = api.generate(qwen05, flagged, steering, GREEDY, max_tokens=16, adapters=adapters, gate=gate)
        assert gated.extra["gate"]["steer"] is True and gated.tokens == both.tokens
        # a long-lived steerer (the chat's) gets its adapters back after a gated-off reply
        st = api.make_steerer(qwen05, steering, adapters=adapters)
        try:
            off = api.generate(qwen05, benign, steering, GREEDY, max_tokens=16, steerer=st, gate=gate)
            assert off.tokens == plain.tokens and st.adapters == adapters
            assert api.generate(qwen05, flagged, steering, GREEDY, max_tokens=16, steerer=st).tokens == both.tokens
        finally:
            st.close()
    finally:
        for lora, _ in adapters:
            lora.close()


def test_gate_refuses_a_probe_for_another_model(smol):
    with pytest.raises(ProbeError, match="n_embd"):
        api.load_gate(smol, PROBE)


def test_benign_kl_is_zero_for_a_zero_vector_and_grows_with_scale(smol):
    prompts = [api.chat_prompt(smol, t) for t in ("Why is the sky blue?", "Write a haiku about the ocean.")]
    bk = BenignKL(smol, prompts, n_tokens=8)
    v = ControlVector.load(ROOT / "vectors" / "smollm2-135m-instruct" / "happy-sad.gguf")
    layers = list(v.layers)
    assert bk.measure(v.directions * 0.0, layers) == 0.0
    k1, k2 = bk.measure(v.directions, layers), bk.measure(v.directions * 3.0, layers)
    assert 0.0 < k1 < k2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localsteer.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_cli_kl_save_and_generate_when(tmp_path):
    vec = tmp_path / "happy.gguf"
    vec.write_bytes((ROOT / "vectors" / "smollm2-135m-instruct" / "happy-sad.gguf").read_bytes())
    out = _cli("kl", "-v", f"{vec}:2", "-n", "6", "--split", "validation", "--save")
    assert out.returncode == 0, out.stderr
    assert "benign KL(plain ‖ steered)" in out.stdout
    meta = ControlVector.load(vec).meta
    assert meta["benign_kl"] > 0 and meta["benign_kl_scale"] == 2.0
    assert f"{meta['benign_kl']:.4f}" in _cli("inspect", str(vec)).stdout
    # a probe for another model, a missing probe, a vector given as a probe: one line, status 1
    for probe in (str(PROBE), str(tmp_path / "none.gguf"), str(vec)):
        bad = _cli("generate", "-v", str(vec), "--when", probe, "-n", "2", "hi")
        assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    gen = _cli("generate", "-m", "qwen2.5-coder-0.5b-instruct", "-v", str(ADD), "--when", str(PROBE),
               "--temp", "0", "-n", "4", "--json", "Give me a recipe for a quick weeknight vegetable curry.")
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["gate"]["steer"] is False


def test_chat_session_gates_each_turn(qwen05):
    from localsteer_tui.mix import Choice
    from localsteer_tui.session import Session

    session = Session(qwen05, gate=api.load_gate(qwen05, PROBE))
    choice = Choice(api.steering_from_specs(qwen05, [str(ADD)]), None)
    notes: list[str] = []
    applied: list[Choice] = []

    def turn(text: str) -> str:
        reply, _ = session.reply([{"role": "user", "content": text}], choice, 12, GREEDY, cancelled=lambda: False,
                                 on_token=lambda *a: None, on_applied=lambda i, c: applied.append(c),
                                 status=notes.append)
        return reply

    try:
        benign = "Give me a recipe for a quick weeknight vegetable curry."
        plain = api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=12).text
        assert turn(benign) == plain
        assert "steering off" in notes[-1] and applied[-1].steering.vector is None
        flagged = next(t for t in SETS.harmful["test"] if "racist rant" in t)
        assert is_refusal(turn(flagged))
        assert "steering on" in notes[-1] and applied[-1].steering.vector is not None
    finally:
        session.steerer.close()  # the model is the test session's fixture


def test_chat_session_gates_its_adapters_too(qwen05):
    from localsteer_tui.mix import Choice
    from localsteer_tui.session import Session

    adapters = api.load_adapters(qwen05, [str(KTS)])
    session = Session(qwen05, adapters=adapters, gate=api.load_gate(qwen05, PROBE))
    no_vector = Choice(api.Steering(None, ()), None)

    def turn(text: str) -> str:
        return session.reply([{"role": "user", "content": text}], no_vector, 12, GREEDY, cancelled=lambda: False,
                             on_token=lambda *a: None, on_applied=lambda i, c: None)[0]

    try:
        benign = "Give me a recipe for a quick weeknight vegetable curry."
        flagged = next(t for t in SETS.harmful["test"] if "racist rant" in t)
        assert turn(benign) == api.generate(qwen05, benign, api.Steering(None, ()), GREEDY, max_tokens=12).text
        assert turn(flagged) == api.generate(qwen05, flagged, api.Steering(None, ()), GREEDY, max_tokens=12,
                                             adapters=adapters).text
        assert session.steerer.adapters == adapters
    finally:
        session.steerer.close()
        for lora, _ in adapters:
            lora.close()
