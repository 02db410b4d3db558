"""Dynamic rejection decoding on the real SmolLM2-135M model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localsteer import api, calibrate, importance, models, steer
from localsteer.runtime import Context, supports_gpu_offload
from localsteer.steer import Rejection, Steerer, _ActiveLayers, _ReplyDecoder

DATASETS = Path(__file__).parent.parent / "vectors" / "datasets"
GREEDY = api.sampling_config(temperature=0)
SAMPLED = api.sampling_config(temperature=0.9, seed=1234)
PROMPTS = ["Describe the ocean.", "Give me three tips for sleeping better."]


@pytest.fixture(scope="module")
def vector(smol):
    pairs = api.load_pairs(DATASETS / "happy-sad.jsonl")[:16]
    return api.extract_vector(smol, pairs).vector


def tokens(model, steerer, prompt, n=32, sampling=GREEDY, fast=True):
    toks = api.chat_prompt(model, prompt)
    return [e.token for e in steerer.generate(toks, n, sampling, fast=fast)]


def events(model, steerer, prompt, n=32, sampling=GREEDY, fast=True):
    return list(steerer.generate(api.chat_prompt(model, prompt), n, sampling, fast=fast))


# two contexts with drafts checked in batches; one context, two rows a decode. The joint loop's
# rows share batches, which only batch-invariant kernels (the CPU's, on SmolLM2) keep bit-exact.
ON_GPU = supports_gpu_offload()
NOT_BATCH_INVARIANT = "llama.cpp's GPU kernels are not batch invariant (docs/benchmarks.md, 'On a GPU')"
LOOPS = ["drafted", pytest.param("joint", marks=pytest.mark.skipif(ON_GPU, reason=NOT_BATCH_INVARIANT))]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_topk_of_whole_vocabulary_is_pure_steering(smol, vector, sampling, loop):
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 5.0
    pure = Steerer(smol, v, layers)
    rej = Steerer(smol, v, layers, Rejection(topk=smol.n_vocab, loop=loop), importance=layers)
    for p in PROMPTS:
        assert tokens(smol, rej, p, sampling=sampling) == tokens(smol, pure, p, sampling=sampling)
        assert all(e.status == "steered" for e in events(smol, rej, p, sampling=sampling))


@pytest.mark.skipif(supports_gpu_offload(), reason="llama.cpp's GPU kernels are not batch invariant: "
                    "rejection's plain side decodes pairs, plain decoding single tokens (docs/benchmarks.md, 'On a GPU')")
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_steering_rejected_everywhere_is_plain_decoding(smol, vector, sampling, loop):
    layers = list(range(4, 26))
    v = vector.only_layers(layers) * 600.0  # gibberish when applied as is
    plain = Steerer(smol)
    rej = Steerer(smol, v, layers, Rejection(topk=1, recovery="hold", loop=loop), importance=layers)
    for p in PROMPTS:
        evs = events(smol, rej, p, sampling=sampling)
        assert [e.token for e in evs] == tokens(smol, plain, p, sampling=sampling)
        assert evs[0].status == "plain"
    pure = Steerer(smol, v, layers)
    assert tokens(smol, pure, PROMPTS[0]) != tokens(smol, plain, PROMPTS[0])


@pytest.mark.parametrize("recovery", ["reset", "hold", "gradual"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_drafted_output_equals_token_by_token(smol, vector, sampling, recovery):
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 8.0
    st = Steerer(smol, v, layers, Rejection(topk=8, recovery=recovery, loop="drafted"), importance=layers)
    rejected = 0
    for p in PROMPTS:
        slow = events(smol, st, p, n=48, sampling=sampling, fast=False)
        fast = events(smol, st, p, n=48, sampling=sampling, fast=True)
        assert [e.token for e in fast] == [e.token for e in slow]
        assert [(e.status, e.rounds, e.layers) for e in fast] == [(e.status, e.rounds, e.layers) for e in slow]
        rejected += sum(e.rounds > 0 for e in slow)
    assert rejected > 0  # the comparison exercised rollbacks


@pytest.mark.skipif(ON_GPU, reason=NOT_BATCH_INVARIANT)
@pytest.mark.parametrize("recovery", ["reset", "hold", "gradual"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_joint_loop_makes_the_token_by_token_choices(smol, vector, sampling, recovery):
    """Both sequences in one context, the vector added to the steered row by the eval callback:
    the same tokens, statuses, rounds and layers as the two-context token-by-token loop."""
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 8.0
    two = Steerer(smol, v, layers, Rejection(topk=8, recovery=recovery, loop="drafted"), importance=layers)
    one = Steerer(smol, v, layers, Rejection(topk=8, recovery=recovery, loop="joint"), importance=layers)
    rejected = 0
    for p in PROMPTS:
        slow = events(smol, two, p, n=48, sampling=sampling, fast=False)
        joint = events(smol, one, p, n=48, sampling=sampling)
        assert [(e.token, e.status, e.rounds, e.layers) for e in joint] == [
            (e.token, e.status, e.rounds, e.layers) for e in slow]
        assert [e.plain_prob for e in joint] == pytest.approx([e.plain_prob for e in slow], abs=1e-5)
        rejected += sum(e.rounds > 0 for e in slow)
    assert rejected > 0  # weakened re-evaluations of the steered row were exercised


def test_events_carry_what_a_ui_needs(smol, vector):
    layers = list(range(6, 20))
    st = Steerer(smol, vector.only_layers(layers) * 8.0, layers, Rejection(topk=8), importance=layers)
    evs = events(smol, st, PROMPTS[0], n=24)
    d = evs[0].as_dict()
    assert set(d) >= {"index", "token", "text", "status", "rounds", "layers", "plain_top", "steered_prob",
                      "plain_prob"}
    assert len(d["plain_top"]) == 5 and d["plain_top"][0]["prob"] >= d["plain_top"][1]["prob"]
    assert {e.status for e in evs} <= {"steered", "weakened", "plain"}
    weakened = [e for e in evs if e.status == "weakened"]
    for e in weakened:
        assert e.rounds > 0 and set(e.layers) < set(layers)


def test_sensitivity_ranking_is_stable_and_cached(smol, smol_path, vector, monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 8.0
    fp = models.quick_fingerprint(smol_path)
    first = importance.importance_order(smol, v, layers, fp)
    second = importance.importance_order(smol, v, layers, fp, cache=False)
    assert first == second and sorted(first) == layers
    cached = list((tmp_path / "importance").glob("*.json"))
    assert len(cached) == 1
    kl = json.loads(cached[0].read_text())["kl"]
    assert all(k >= 0 for k in kl.values()) and len(kl) == len(layers)
    # a cache hit does not recompute: poison the KL values and see them used
    data = json.loads(cached[0].read_text())
    data["kl"] = {str(il): float(-il) for il in layers}
    cached[0].write_text(json.dumps(data))
    assert importance.importance_order(smol, v, layers, fp) == sorted(layers, reverse=True)
    # the key is the direction: another strength hits the same entry, the opposite sign does not
    assert importance.importance_order(smol, v * 0.25, layers, fp) == sorted(layers, reverse=True)
    importance.importance_order(smol, v * -1.0, layers, fp)
    assert len(list((tmp_path / "importance").glob("*.json"))) == 2


@pytest.mark.parametrize("schedule", ["halve", "one"])
def test_drafted_equals_token_by_token_on_qwen(qwen05, schedule):
    # Q4_K weights are repacked for llama.cpp's batched kernels: the case where batch size matters
    vec = api.load_vector(Path(__file__).parent.parent / "vectors" / "qwen2.5-coder-0.5b-instruct" / "uppercase-mean.gguf")
    layers = list(vec.suggested_layers)
    st = Steerer(qwen05, vec.only_layers(layers) * 2.0, layers, Rejection(topk=10, schedule=schedule, loop="drafted"),
                 importance=layers)
    slow = events(qwen05, st, PROMPTS[0], n=40, sampling=SAMPLED, fast=False)
    fast = events(qwen05, st, PROMPTS[0], n=40, sampling=SAMPLED, fast=True)
    assert [(e.token, e.status, e.rounds, e.layers) for e in fast] == [(e.token, e.status, e.rounds, e.layers) for e in slow]
    assert any(e.rounds > 0 for e in slow)


def test_halving_schedule_drops_half_the_layers_least_important_first(smol, vector):
    layers = list(range(6, 14))
    order = [9, 6, 13, 7, 8, 12, 10, 11]  # least important first
    st = Steerer(smol, vector.only_layers(layers), layers, Rejection(topk=1, schedule="halve"), importance=order)
    from localsteer.steer import _ActiveLayers
    w = _ActiveLayers(st)
    w.weaken()
    assert w.active == (8, 10, 11, 12)
    w.weaken()
    assert w.active == (10, 11)
    w.weaken()
    assert w.active == (11,)
    w.weaken()
    assert w.active == ()


@pytest.mark.parametrize("fast,loop", [(False, "drafted"), (True, "drafted"), (True, "joint")],
                         ids=["token-by-token", "drafted", "joint"])
def test_reconfiguring_mid_reply_takes_effect(smol, vector, fast, loop):
    layers = list(range(6, 20))
    rej = Rejection(topk=smol.n_vocab, loop=loop)
    st = Steerer(smol, vector.only_layers(layers) * 2.0, layers, rej, importance=layers)
    seen = []
    for ev in st.generate(api.chat_prompt(smol, PROMPTS[0]), 24, GREEDY, fast=fast):
        seen.append(ev.layers)
        if ev.index == 5:
            st.configure(vector.only_layers([8, 9]) * 2.0, [8, 9], rej, [8, 9])
    assert seen[0] == tuple(layers) and seen[-1] == (8, 9)


def test_auto_loop_is_the_one_the_measured_costs_favour(smol, vector, tmp_path, monkeypatch):
    from localsteer import calibrate

    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "_memo", {})
    layers = list(range(6, 20))
    st = Steerer(smol, vector.only_layers(layers), layers, Rejection(topk=20), importance=layers, n_threads=1)
    c = calibrate.costs(smol, 1)
    assert 0 < c.one < c.rows[2] * 2 and c.joint > 0 and c.draft == Rejection().draft
    assert Rejection().loop == "auto" and st.joint_loop() == (c.joint_per_token < c.one + c.rows[3] / 3)
    assert c.drafted_per_token(1.0) == pytest.approx(c.one + c.rows[3] / 3)
    cached = list((tmp_path / "calibration").glob("*.json"))
    assert len(cached) == (0 if c.noisy else 1)  # measured once, then read (unless other work disturbed it)
    if c.noisy:
        return
    monkeypatch.setattr(calibrate, "_memo", {})
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert calibrate.costs(smol, 1) == c
    assert st.joint_loop() == c.joint_wins()
    assert not Steerer(smol, vector.only_layers(layers), layers, Rejection(topk=20, loop="drafted")).joint_loop()
    with pytest.raises(ValueError, match="loop must be one of"):
        Rejection(loop="fast")


def test_drafted_cost_model_at_each_acceptance():
    """All drafts pass: a 3-row check per 3 tokens and 3 steered decodes; none pass: a 2-row check
    and one steered decode per token (nothing drafted before the check)."""
    c = calibrate.Costs(one=1.0, rows={2: 2.0, 3: 2.5}, joint=2.2)
    assert c.drafted_per_token(1.0) == pytest.approx(1 + 2.5 / 3)
    assert c.drafted_per_token(0.0) == pytest.approx(1 + 2.0)
    assert all(c.drafted_per_token(a / 10) >= c.drafted_per_token((a + 1) / 10) for a in range(10))
    assert not c.joint_wins(1.0) and c.joint_wins(0.0)
    assert "joint when at most" in c.describe()


@pytest.mark.skipif(ON_GPU, reason=NOT_BATCH_INVARIANT)
def test_auto_turns_to_the_joint_loop_when_most_tokens_are_rejected(smol, vector, monkeypatch):
    """On a machine where the joint loop wins only when few tokens pass, an oversteered vector
    moves `auto` to it after the first reply; the tokens stay the token-by-token loop's."""
    c = calibrate.Costs(one=1.0, rows={2: 2.0, 3: 2.5}, joint=2.2)
    monkeypatch.setattr(calibrate, "costs", lambda *a, **k: c)
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 200.0
    st = Steerer(smol, v, layers, Rejection(topk=1), importance=layers)
    ref = Steerer(smol, v, layers, Rejection(topk=1, loop="drafted"), importance=layers)
    assert not st.joint_loop()
    first = events(smol, st, PROMPTS[0], n=24)
    assert st.passed < 0.7 and st.joint_loop()
    second = events(smol, st, PROMPTS[1], n=24)
    for p, got in ((PROMPTS[0], first), (PROMPTS[1], second)):
        want = events(smol, ref, p, n=24, fast=False)
        assert [(e.token, e.status, e.rounds) for e in got] == [(e.token, e.status, e.rounds) for e in want]


@pytest.mark.parametrize("rejection", [Rejection(topk=1), Rejection(topk=20, minp=0.5)], ids=["top-1", "min-p"])
def test_skip_test_runs_no_rounds_when_one_token_is_plausible(smol, vector, rejection):
    """Greedy, and the plain model leaves one plausible token: it is the token, as every round
    would end with it, and no weakened set is evaluated (0 rounds). The drafted loop agrees."""
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 40.0
    st = Steerer(smol, v, layers, rejection, importance=layers)
    evs = events(smol, st, PROMPTS[0], n=32, fast=False)
    skipped = [e for e in evs if e.status == "plain" and e.rounds == 0]
    assert skipped and all(e.token == max(e.plain_top, key=lambda t: t[2])[0] for e in skipped)
    if rejection.topk == 1:  # every token is the plain model's choice
        assert [e.token for e in evs] == tokens(smol, Steerer(smol), PROMPTS[0], n=32)
    fast = events(smol, st, PROMPTS[0], n=32)
    assert [(e.token, e.status, e.rounds, e.layers) for e in fast] == [(e.token, e.status, e.rounds, e.layers) for e in evs]
    sampled = events(smol, st, PROMPTS[0], n=32, sampling=SAMPLED, fast=False)
    assert not any(e.status == "plain" and e.rounds == 0 for e in sampled)  # greedy only


@pytest.mark.skipif(ON_GPU, reason=NOT_BATCH_INVARIANT)
@pytest.mark.parametrize("recovery", ["reset", "hold"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_rounds_in_one_decode(smol, vector, sampling, recovery, monkeypatch):
    """The joint loop with a rejected token's weaker layer sets evaluated on sequences of their
    own (`Rejection.rounds="together"`), the chosen row's cache entry then taken by the steered
    sequence: one set per decode, it makes the token-by-token loop's choices, rounds and layer
    sets bit for bit (the cache handling is exact); several per decode, every token passes the
    test its status claims with the layer set of its round (the cells' order in the cache
    differs, so the numerics may part from the token-by-token loop's)."""
    layers = list(range(6, 20))
    v = vector.only_layers(layers) * 60.0
    ref = Steerer(smol, v, layers, Rejection(topk=5, recovery=recovery, loop="drafted"), importance=layers)
    st = Steerer(smol, v, layers, Rejection(topk=5, recovery=recovery, loop="joint", rounds="together"),
                 importance=layers)
    widths = []
    decode = Context.decode

    def spy(ctx, tokens, positions, seq_ids, outputs):
        if min(seq_ids) >= 2:
            widths.append(len(tokens))
        return decode(ctx, tokens, positions, seq_ids, outputs)
    monkeypatch.setattr(Context, "decode", spy)
    monkeypatch.setattr(steer, "ROUNDS_WIDTH", 1)
    for prompt in PROMPTS:
        want = events(smol, ref, prompt, n=32, sampling=sampling, fast=False)
        got = events(smol, st, prompt, n=32, sampling=sampling)
        assert [(e.token, e.status, e.rounds, e.layers) for e in got] == \
            [(e.token, e.status, e.rounds, e.layers) for e in want]
    assert widths and set(widths) == {1} and any(e.rounds > 1 for e in want)
    monkeypatch.setattr(steer, "ROUNDS_WIDTH", 4)
    st = Steerer(smol, v, layers, Rejection(topk=5, recovery=recovery, loop="joint", rounds="together"),
                 importance=layers)  # a context with sequences for 4 rows
    sets = [st.layers] + _ReplyDecoder(st, [], sampling, 1)._weaker_sets(_ActiveLayers(st))
    for prompt in PROMPTS:
        for e in events(smol, st, prompt, n=32, sampling=sampling):
            if e.status in ("steered", "weakened"):
                assert e.token in [t for t, _, _ in e.plain_top]  # the plain top-5: reject top-k 5
                assert e.layers == sets[e.rounds] or recovery == "hold"
            elif e.status == "plain":
                assert e.rounds == 0 or e.layers == ()
    assert max(widths) > 1 and st.reevaluations != 2.0


def test_rounds_together_by_the_costs(smol, vector, monkeypatch):
    """"auto" evaluates the rounds in one decode on a GPU build where that decode costs less than
    the re-evaluations a rejected token is expected to take; never on a CPU build."""
    layers = list(range(6, 20))
    st = Steerer(smol, vector.only_layers(layers), layers, Rejection(loop="joint"), importance=layers)
    run = _ReplyDecoder(st, api.chat_prompt(smol, PROMPTS[0]), GREEDY, 8)
    state = _ActiveLayers(st)
    assert [len(s) for s in run._weaker_sets(state)] == [7, 4, 2, 1]
    cheap = calibrate.Costs(one=1.0, rows={2: 1.2, 3: 1.3, 4: 1.4}, joint=1.3)
    dear = calibrate.Costs(one=1.0, rows={2: 2.0, 3: 2.6, 4: 3.0}, joint=2.1)
    monkeypatch.setattr(calibrate, "costs", lambda *a, **k: cheap)
    assert not run._rounds_together(state) or smol.offloaded  # a CPU build: one by one
    monkeypatch.setattr(smol, "offloaded", True)
    for costs, together in ((cheap, True), (dear, False)):
        monkeypatch.setattr(calibrate, "costs", lambda *a, _c=costs, **k: _c)
        assert run._rounds_together(state) == together  # 2 re-evaluations expected before any reply
    st.reevaluations = 3.5
    assert run._rounds_together(state)  # dear rows, but more rounds expected
    with pytest.raises(ValueError, match="rounds must be one of"):
        Rejection(rounds="wide")
