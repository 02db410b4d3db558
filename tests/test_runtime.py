"""The runtime against the real SmolLM2-135M model: capture, control vectors, batching."""

from __future__ import annotations

import numpy as np
import pytest

from localsteer.activations import collect
from localsteer.errors import ModelError
from localsteer import runtime
from localsteer.runtime import Capture, Model, supports_gpu_offload
from localsteer.sampling import top_indices


def prompt(model, text="Describe the ocean."):
    return model.tokenize(model.apply_chat_template([{"role": "user", "content": text}]))


def capture_layers(model, tokens, directions=None, layers=None):
    layers = list(range(model.n_layer)) if layers is None else layers
    cap = Capture(layers)
    with model.context(n_ctx=512, capture=cap) as ctx:
        if directions is not None:
            ctx.set_control(directions)
        ctx.decode_sequence(tokens, 0)
        return cap.layers


def test_model_facts(smol):
    assert (smol.arch, smol.n_layer, smol.n_embd) == ("llama", 30, 576)
    text = smol.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    toks = smol.tokenize(text)
    assert smol.detokenize(toks).endswith("assistant\n")


def test_capture_reads_every_layer(smol):
    toks = prompt(smol)
    acts = capture_layers(smol, toks)
    assert sorted(acts) == list(range(30))
    assert acts[5].shape == (len(toks), 576)
    assert acts[29].shape == (1, 576)  # llama.cpp computes the last layer for output rows only
    assert np.isfinite(acts[5]).all() and np.abs(acts[5]).sum() > 0


def test_vector_on_layer_n_changes_l_out_n_but_not_before(smol):
    toks = prompt(smol)
    base = capture_layers(smol, toks)
    d = np.zeros((30, 576), dtype=np.float32)
    d[12] = np.random.default_rng(0).normal(size=576) * 4
    steered = capture_layers(smol, toks, d)
    for il in range(12):
        np.testing.assert_array_equal(steered[il], base[il])
    # l_out-12 already includes the vector: exactly base + d at every position
    np.testing.assert_allclose(steered[12], base[12] + d[12], atol=1e-4)
    assert not np.allclose(steered[13], base[13], atol=1e-3)


def test_zero_vector_gives_identical_logits(smol):
    toks = prompt(smol)
    with smol.context(n_ctx=512) as ctx:
        ctx.decode_sequence(toks, 0)
        plain = ctx.logits()
        ctx.clear()
        ctx.set_control(np.zeros((30, 576), dtype=np.float32))
        ctx.decode_sequence(toks, 0)
        np.testing.assert_array_equal(ctx.logits(), plain)


def test_callbacks_give_each_part_its_tensors_and_an_idle_one_changes_nothing(smol):
    """`Callbacks` looks up, before each decode, which part gets which tensor: a `RowSteer` on
    layer 4 and a `Capture` of layers 3 and 6 on one context see what each sees alone (layer 6
    as with llama.cpp's own control vector on layer 4); with nothing wanted, the logits are those
    of a context without a callback."""
    toks = prompt(smol)
    d = np.zeros((30, 576), dtype=np.float32)
    d[4] = np.random.default_rng(1).normal(size=576) * 4
    want = capture_layers(smol, toks, d, layers=[3, 6])
    steer, cap = runtime.RowSteer(), Capture([3, 6])
    steer.rows = None
    with smol.context(n_ctx=512, capture=runtime.Callbacks(steer, cap)) as ctx:
        steer.set(d, [4])
        ctx.decode_sequence(toks, 0)
        assert sorted(cap.layers) == [3, 6]
        np.testing.assert_allclose(cap.layers[3], want[3], atol=1e-5)
        np.testing.assert_allclose(cap.layers[6], want[6], atol=1e-3)
    with smol.context(n_ctx=512) as ctx:
        ctx.decode_sequence(toks, 0)
        plain = ctx.logits()
    idle = runtime.Callbacks(runtime.KeyScale(), runtime.RowsSteer())
    with smol.context(n_ctx=512, capture=idle) as ctx:
        ctx.decode_sequence(toks, 0)
        assert idle.targets() == {}
        np.testing.assert_array_equal(ctx.logits(), plain)


@pytest.mark.nomodel
def test_top_indices_are_the_largest_values_in_order():
    rng = np.random.default_rng(0)
    for trial in range(400):
        size = 151936 if trial % 4 == 0 else int(rng.integers(1, 70000))
        x = rng.standard_normal(size).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x, 1)  # many ties
        n = int(rng.integers(1, 60))
        got = top_indices(x, n)
        assert len(set(got.tolist())) == len(got) == min(n, size)
        np.testing.assert_array_equal(x[got], np.sort(x)[::-1][:n])
    assert len(top_indices(np.ones(3, dtype=np.float32), 0)) == 0


@pytest.mark.skipif(supports_gpu_offload(), reason="llama.cpp's GPU kernels are not batch invariant: "
                    "several prompts in one batch give other activations (docs/benchmarks.md, 'On a GPU')")
def test_batched_capture_equals_one_prompt_at_a_time(smol):
    texts = ["Describe the ocean.", "What is two plus two?", "Name a color.", "Write a haiku about snow."]
    prompts = [prompt(smol, t) for t in texts]
    batched = collect(smol, prompts, layers=[3, 15, 29], last_n=1)
    alone = np.stack([collect(smol, [p], layers=[3, 15, 29], last_n=1)[0] for p in prompts])
    np.testing.assert_allclose(batched[:, [3, 15, 29]], alone[:, [3, 15, 29]], atol=2e-3, rtol=1e-3)


def test_pooled_capture_is_the_mean_of_the_last_positions(smol):
    prompts = [prompt(smol, "Describe the ocean.")]
    acts = capture_layers(smol, prompts[0], layers=[15])
    pooled = collect(smol, [prompts[0]], layers=[15], last_n=3)[0, 15]
    np.testing.assert_allclose(pooled, acts[15][-3:].mean(axis=0), atol=2e-3)


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        Model(junk)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(ModelError, match="could not load"):
        Model(truncated)


def test_an_exception_in_the_eval_callback_stops_the_decode_and_is_raised_after_it(smol):
    """It cannot cross llama.cpp's C frames: the callback keeps it, returns false (the graph stops
    at that tensor: the layers after it are never computed), and decode raises it afterwards."""

    class Failing(Capture):
        fail = True

        def on_tensor(self, tensor, il):
            super().on_tensor(tensor, il)
            if il == 5 and self.fail:
                raise RuntimeError("boom at layer 5")

    cap = Failing(range(1, smol.n_layer))
    with smol.context(n_ctx=512, capture=cap) as ctx:
        with pytest.raises(RuntimeError, match="boom at layer 5"):
            ctx.decode_sequence(prompt(smol), 0)
        assert sorted(cap.layers) == [1, 2, 3, 4, 5]  # stopped there
        assert cap.error is None  # raised once, then cleared
        cap.fail = False
        ctx.clear()
        ctx.decode_sequence(prompt(smol), 0)  # the context works on
        assert len(cap.layers) == smol.n_layer - 1


@pytest.mark.nomodel
@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "200000 100000\n"}, 2.0),                      # cgroup v2, docker --cpus 2
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),                        # no quota
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 0.5),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_the_cgroup_cpu_quota_caps_the_default_threads(tmp_path, monkeypatch, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runtime.cgroup_cpu_quota(tmp_path) == quota
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    want = 64 if quota is None else max(1, -(-quota // 1))
    assert runtime.available_cores(tmp_path) == want
    monkeypatch.setattr(runtime, "available_cores", lambda: 64 if quota is None else int(want))
    monkeypatch.delenv("LOCALSTEER_THREADS", raising=False)
    assert runtime.default_threads() == min(8, int(want))
