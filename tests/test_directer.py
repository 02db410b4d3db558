"""DIRECTER on llama.cpp (localsteer/directer.py), on the real SmolLM2-135M: the key scaling is
exact where it must be (the plain row untouched, alpha 1 the plain model), and every token the
loop emits passes the test it claims to."""

from __future__ import annotations

import numpy as np
import pytest

from localsteer import api
from localsteer.directer import Directer, InstructionError, InstructionSteerer, find_span
from localsteer.reply import run
from localsteer.runtime import KeyScale, supports_gpu_offload
from localsteer.sampling import softmax
from localsteer.steer import Status

GREEDY = api.sampling_config(temperature=0)
PROMPT, FRENCH = "Describe the ocean in French.", "in French"
ON_GPU = pytest.mark.skipif(supports_gpu_offload(), reason="llama.cpp's GPU kernels are not batch invariant "
                            "(docs/benchmarks.md, 'On a GPU'): a row of two may differ from a lone row")


def templated(model, text):
    full = model.apply_chat_template([{"role": "user", "content": text}])
    return full, model.tokenize(full)


def test_the_span_is_the_instructions_tokens(smol):
    full, toks = templated(smol, PROMPT)
    start, end = find_span(smol, toks, full, FRENCH)
    assert smol.detokenize(toks[start:end]).strip() == FRENCH
    with pytest.raises(InstructionError, match="not in the prompt"):
        find_span(smol, toks, full, "in German")
    with pytest.raises(InstructionError, match="empty"):
        find_span(smol, toks, full, " ")
    for bad in (dict(alpha=0.0), dict(alpha=float("inf")), dict(p=0.0), dict(p=1.5), dict(trials=0)):
        with pytest.raises(InstructionError):
            Directer(**bad)


def key_scaled_rows(model, toks, start, end, alphas, scale=None):
    """For each alpha, the (plain, steered) logits of the last token in one two-row decode, the
    steered row's keys at positions start..end-1 scaled by alpha on every layer."""
    scale = scale or KeyScale()
    out = []
    with model.context(n_ctx=256, n_seq_max=2, capture=scale, flash_attn=False) as ctx:
        for alpha in alphas:
            ctx.clear()
            scale.set([], [], 1.0, [])
            ctx.decode_sequence(toks[:-1], 0, seq_id=0)
            ctx.share(0, 1)
            scale.set(range(model.n_layer), range(start, end), alpha, rows=[1])
            n = len(toks) - 1
            ctx.decode([toks[-1]] * 2, [n, n], [0, 1], [True, True])
            out.append((ctx.logits(0), ctx.logits(1)))
    return out


def test_key_scaling_touches_only_the_steered_row(smol):
    full, toks = templated(smol, PROMPT)
    start, end = find_span(smol, toks, full, FRENCH)
    (plain1, steered1), (plain100, steered100) = key_scaled_rows(smol, toks, start, end, (1.0, 100.0))
    np.testing.assert_array_equal(plain1, steered1)  # alpha 1 is no steering
    np.testing.assert_array_equal(plain1, plain100)  # the plain row never sees the scaling
    assert np.abs(steered100 - plain100).max() > 1.0


def plain_greedy(model, tokens, n, n_ctx=512, kv_f32=False):
    """Greedy decoding, one token per decode, without flash attention as DIRECTER runs (flash
    attention's numerics differ a little: on this prompt its first token is a near-tie, "L"
    25.53 vs "En" 25.38 with it, 25.37 vs 25.48 without)."""
    out = []
    with model.context(n_ctx=n_ctx, flash_attn=False, kv_f32=kv_f32) as ctx:
        ctx.decode_sequence(tokens, 0)
        for _ in range(n):
            tok = int(np.argmax(ctx.logits()))
            out.append(tok)
            if model.is_eog(tok):
                break
            ctx.decode([tok], [len(tokens) + len(out) - 1], [0], [True])
    return out


@ON_GPU
def test_alpha_one_is_the_plain_model(smol):
    """Steering by a factor of 1 changes nothing: every token is the plain row's choice, through
    the shared cache, the dropped steered entries and the re-evaluations; and that is the plain
    model's greedy reply up to batch invariance (a token decoded in a batch of two rows may get
    logits a little off a lone decode's on some CPUs): the first token where the two differ,
    if any, is a near-tie of the plain model."""
    one = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=Directer(alpha=1.0), sampling=GREEDY,
                                max_tokens=40)
    assert {e.status for e in one.events} <= {Status.SKIPPED, Status.STEERED}
    assert all(e.token == e.plain_top[0][0] for e in one.events)
    ref = plain_greedy(smol, api.chat_prompt(smol, PROMPT), 40)
    first = next((i for i, (a, b) in enumerate(zip(one.tokens, ref)) if a != b), None)
    assert first is None or first >= 5, (first, one.tokens[:first + 1], ref[:first + 1])
    if first is not None:
        (_, _, p1), (t2, _, p2) = one.events[first].plain_top[:2]
        assert t2 == ref[first] and p2 > 0.9 * p1  # the lone decode chose the runner-up of a near-tie
    assert {e.status for e in one.events} <= {Status.SKIPPED, Status.STEERED}


def check_events(events, settings: Directer, greedy: bool):
    """Every token passes the test its status claims."""
    for e in events:
        top = e.plain_top[0][2]  # the plain maximum
        assert e.rounds < settings.trials + 1
        if e.status in (Status.STEERED, Status.WEAKENED):
            assert e.plain_prob > settings.p * top, e
            assert (e.rounds == 0) == (e.status == Status.STEERED)
        elif e.status == Status.SKIPPED:
            assert greedy and e.token == e.plain_top[0][0] and e.plain_top[1][2] < settings.p * top
        else:
            assert e.status == Status.PLAIN and e.rounds >= 1
            if greedy:
                assert e.token == e.plain_top[0][0]


def test_every_token_passes_its_test_greedy(smol):
    settings = Directer()
    out = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=GREEDY, max_tokens=32)
    statuses = {e.status for e in out.events}
    assert Status.WEAKENED in statuses or Status.PLAIN in statuses  # the loop was exercised
    check_events(out.events, settings, greedy=True)
    plain = api.generate(smol, PROMPT, api.Steering(None, ()), GREEDY, max_tokens=32)
    assert out.text != plain.text  # amplifying "in French" changes the reply
    assert out.extra["directer"]["span"] == list(find_span(smol, *reversed(templated(smol, PROMPT)), FRENCH))


def test_one_trial_means_no_weakening_and_sampling_is_seeded(smol):
    settings = Directer(trials=1)
    sampled = api.sampling_config(temperature=0.8, seed=11)
    a = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=sampled, max_tokens=24)
    b = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=sampled, max_tokens=24)
    assert a.tokens == b.tokens
    assert Status.WEAKENED not in {e.status for e in a.events}
    assert Status.SKIPPED not in {e.status for e in a.events}  # the skip test is for greedy decoding
    check_events(a.events, settings, greedy=False)


def test_the_reply_loop_drives_it(smol):
    full, toks = templated(smol, PROMPT)
    steerer = InstructionSteerer(smol, find_span(smol, toks, full, FRENCH))
    try:
        reply = run(steerer, toks, 8, GREEDY, cancelled=lambda: True)
    finally:
        steerer.close()
    assert len(reply.tokens) == 1 and reply.stopped  # stopped after the first token, as asked


def _first_pass(model, span, toks, alpha, steering):
    """Both rows of the first reply token, from a steerer with `steering`'s vector if any."""
    vector = steering.vector
    st = InstructionSteerer(model, span, Directer(alpha=alpha), n_ctx=256,
                            vector=None if vector is None else vector.directions, vector_layers=steering.layers)
    try:
        st._ctx.clear()
        st._steer((), rows=[])
        st._ctx.decode_sequence(toks[:-1], 0, seq_id=0)
        st._ctx.share(0, 1)
        return st._both(toks[-1], len(toks) - 1)
    finally:
        st.close()


@ON_GPU
def test_a_vector_joins_the_steered_pass_only(smol):
    """DIRECTER with a control vector: the plain row sees neither the scaled keys nor the vector;
    at alpha 1 the steered row is the vector alone, as llama.cpp's own control vector gives it
    (on the token being decoded: the prompt's cache is the plain one)."""
    happy = api.steering_from_specs(smol, ["happy-sad:4"])
    none = api.Steering(None, ())
    full, toks = templated(smol, PROMPT)
    span = find_span(smol, toks, full, FRENCH)
    plain, keys_only = _first_pass(smol, span, toks, 100.0, none)
    plain_v, both = _first_pass(smol, span, toks, 100.0, happy)
    plain_v1, vector_only = _first_pass(smol, span, toks, 1.0, happy)
    np.testing.assert_array_equal(plain, plain_v)
    np.testing.assert_array_equal(plain, plain_v1)
    with smol.context(n_ctx=256, flash_attn=False) as ctx:  # the prompt plain, the last token with the vector
        ctx.decode_sequence(toks[:-1], 0)
        ctx.set_control(happy.vector.directions, min(happy.layers), max(happy.layers))
        ctx.decode([toks[-1]], [len(toks) - 1], [0], [True])
        reference = ctx.logits()
    np.testing.assert_allclose(softmax(vector_only), softmax(reference), atol=1e-6)
    assert np.abs(softmax(vector_only) - softmax(plain)).max() > 1e-3  # the vector does something here
    assert np.abs(both - keys_only).max() > 0.5 and np.abs(both - vector_only).max() > 0.5


def test_directer_with_a_vector_end_to_end(smol):
    settings = Directer()
    happy = api.steering_from_specs(smol, ["happy-sad:4"])
    out = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=GREEDY, max_tokens=32,
                                steering=happy)
    check_events(out.events, settings, greedy=True)
    alone = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=GREEDY, max_tokens=32)
    # the vector moves the steered pass: the steered probabilities of the tokens that had one
    assert [e.steered_prob for e in out.events] != [e.steered_prob for e in alone.events]
    assert out.extra["vectors"] == [{"file": happy.parts[0][0], "scale": 4.0}]
    assert "DIRECTER x100" in out.steering and "4 x happy-sad.gguf" in out.steering


def test_directer_loop_cost_model():
    """Split pays a plain row for every token and a steered row for those the skip test does not
    spare; joint, one decode of both rows. Where a second row costs little, joint; where it costs
    about a first, split as soon as any token is skipped."""
    from localsteer import calibrate

    cheap = calibrate.Costs(one=1.0, rows={2: 1.2, 3: 1.4}, joint=1.3, keys_plain=1.0, keys_one=1.1, keys_two=1.3)
    dear = calibrate.Costs(one=1.0, rows={2: 2.0, 3: 2.6}, joint=2.1, keys_plain=1.1, keys_one=1.2, keys_two=2.4)
    assert cheap.directer_joint_wins(0.0) and cheap.directer_joint_wins(0.5) and not cheap.directer_joint_wins(0.9)
    assert cheap.directer_joint_below() == pytest.approx(1 - 0.3 / 1.1)
    assert not dear.directer_joint_wins(0.0) and dear.directer_joint_below() == 0.0
    assert "DIRECTER" in cheap.describe() and "DIRECTER" not in calibrate.Costs(1.0, {2: 2.0, 3: 2.5}, 2.1).describe()


@pytest.mark.parametrize("loop", ["split", "joint"])
def test_both_loops_keep_the_method(smol, loop):
    """Each loop's tokens pass the test their status claims; at alpha 1 every token is the plain
    row's choice; joint decodes the plain and steered rows of every token in one decode (the
    steered row computed even where the skip test spares it), split only where it is needed."""
    settings = Directer()
    out = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=settings, sampling=GREEDY, max_tokens=32,
                                loop=loop)
    check_events(out.events, settings, greedy=True)
    assert {Status.SKIPPED, Status.WEAKENED} <= {e.status for e in out.events}
    one = api.generate_directer(smol, PROMPT, mark=FRENCH, settings=Directer(alpha=1.0), sampling=GREEDY,
                                max_tokens=24, loop=loop)
    assert all(e.token == e.plain_top[0][0] for e in one.events)
    full, toks = templated(smol, PROMPT)
    st = InstructionSteerer(smol, find_span(smol, toks, full, FRENCH), settings, loop=loop)
    calls = {"both": 0, "plain": 0}
    for name in calls:
        method = getattr(st, f"_{name}")

        def counted(*a, _m=method, _n=name):
            calls[_n] += 1
            return _m(*a)
        setattr(st, f"_{name}", counted)
    try:
        evs = list(st.generate(toks, 16, GREEDY))
    finally:
        st.close()
    assert calls == ({"both": len(evs), "plain": 0} if loop == "joint" else {"both": 0, "plain": len(evs)})
    with pytest.raises(InstructionError, match="loop must be one of"):
        InstructionSteerer(smol, (0, 1), settings, loop="fast")


def test_auto_takes_the_loop_the_costs_favour_at_the_share_skipped(smol, monkeypatch):
    """"auto" asks the calibration at the share of tokens the last greedy replies skipped: joint
    while few are skipped, split once enough are (here: joint below 40%)."""
    from localsteer import calibrate

    rows = {k: 1.0 + 0.4 * (k - 1) for k in range(2, 2 * smol.n_layer)}  # each row more costs 0.4 of one
    c = calibrate.Costs(one=1.0, rows=rows, joint=1.6, keys_plain=1.0, keys_one=1.0, keys_two=1.6)
    monkeypatch.setattr(calibrate, "costs", lambda *a, **k: c)
    full, toks = templated(smol, PROMPT)
    st = InstructionSteerer(smol, find_span(smol, toks, full, FRENCH), Directer())
    try:
        assert st.loop == "auto" and st.skipped == 0.0 and st.joint()
        evs = list(st.generate(toks, 24, GREEDY))
        share = sum(e.status == Status.SKIPPED for e in evs) / len(evs)
        assert st.skipped == pytest.approx(len(evs) * share / (4 + len(evs)))
        assert st.joint() == (st.skipped < 0.4)
        assert st.joint(greedy=False)  # a sampled reply skips nothing
        assert st._together(smol.n_layer, smol.n_layer)  # the ranking's rows: 12.6 rows' worth for 30
        assert st._together(5, 2.0) is False and st._together(3, 2.0)  # 2.6 and 1.8 rows' worth for 2 expected
    finally:
        st.close()


def test_the_ranking_evaluates_the_layers_together_or_one_by_one_alike(smol):
    """The sensitivity ranking's layers in one decode of a row per layer (each row its own
    sequence over the plain history, its keys scaled in its layer only) measure what one decode
    per layer does, up to batch numerics: the same layers kept at the first weakening."""
    full, toks = templated(smol, PROMPT)
    span = find_span(smol, toks, full, FRENCH)
    effects = {}
    for rank in ("together", "one-by-one"):
        st = InstructionSteerer(smol, span, Directer(), batch=rank, n_ctx=256)
        try:
            st._ctx.clear()
            st._steer((), rows=[])
            st._ctx.decode_sequence(toks[:-1], 0, seq_id=0)
            st._ctx.share(0, 1)
            plain = st._plain(toks[-1], len(toks) - 1)
            effects[rank] = st.layer_effects(toks[-1], len(toks) - 1, plain)
            import llama_cpp
            assert all(llama_cpp.llama_memory_seq_pos_max(st._ctx._mem, seq) == -1 for seq in range(2, 2 + st._width))
            st._ctx.remove(-1, len(toks) - 1, -1)
            again = st._plain(toks[-1], len(toks) - 1)  # the extra sequences are gone: the plain row is as before
            np.testing.assert_array_equal(plain, again)
        finally:
            st.close()
    together, single = effects["together"], effects["one-by-one"]
    assert list(together) == list(single) == list(range(smol.n_layer))
    np.testing.assert_allclose(list(together.values()), list(single.values()), atol=0.02)
    half = smol.n_layer // 2
    assert set(sorted(together, key=together.get)[half:]) == set(sorted(single, key=single.get)[half:])
    assert max(together.values()) > 0.1  # the layers do differ
    with pytest.raises(InstructionError, match="batch must be one of"):
        InstructionSteerer(smol, span, Directer(), batch="batched")


def test_the_weakened_trials_evaluated_together_choose_as_one_by_one(smol):
    """A token's weakened trials from one decode of a row per layer set (`batch="together"`)
    against one decode per trial: the same tokens, statuses and trials, up to batch numerics (the
    first difference, if any, a near-tie of the test); and the decodes really were batched."""
    settings = Directer()
    full, toks = templated(smol, PROMPT)
    span = find_span(smol, toks, full, FRENCH)
    got = {}
    for batch in ("together", "one-by-one"):
        st = InstructionSteerer(smol, span, settings, batch=batch, loop="split")
        sizes = []
        each = st._steered_each

        def spy(token, pos, sets, _each=each):
            sizes.append(len(sets))
            return _each(token, pos, sets)
        st._steered_each = spy
        try:
            got[batch] = [(e.token, e.status, e.rounds, e.layers) for e in st.generate(toks, 32, GREEDY)]
        finally:
            st.close()
        weakened = [e for e in got[batch] if e[2] > 0]
        assert weakened
        if batch == "together":  # the ranking's decode, then one decode per token that needed trials
            assert sizes[0] == smol.n_layer and len(sizes) == 1 + len(weakened) and max(sizes[1:]) > 1
        else:
            assert sizes == []
        assert st.extra_trials != 2.0  # the running mean moved
    a, b = got["together"], got["one-by-one"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    assert first is None or first >= 8, (first, a[:first + 1], b[:first + 1])
