"""Directional ablation / reflection adapters: the math on synthetic arrays, the adapter on the
real Qwen2.5-Coder-0.5B model through llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from localsteer.errors import ModelError, OutputExistsError
from localsteer.refusal.lora import (Weights, ablate, adapter_directions, adapter_tensors, orthonormal,
                             residual_writers, write_adapter)
from localsteer.runtime import Capture, Lora

RNG = np.random.default_rng(0)


def synthetic(n_embd=16, n_vocab=40, tied=False) -> Weights:
    return Weights("qwen2", n_embd, {
        "token_embd.weight": RNG.normal(size=(n_vocab, n_embd)).astype(np.float32),
        "blk.0.attn_output.weight": RNG.normal(size=(n_embd, n_embd)).astype(np.float32),
        "blk.0.ffn_down.weight": RNG.normal(size=(n_embd, 3 * n_embd)).astype(np.float32),
    }, tied)


@pytest.mark.nomodel
def test_ablated_activations_have_no_component_along_the_direction():
    r = RNG.normal(size=16)
    x = RNG.normal(size=(50, 16)) * 10
    out = ablate(x, orthonormal(r))
    assert np.abs(out @ (r / np.linalg.norm(r))).max() < 1e-9
    # and nothing else changes: the orthogonal complement is untouched
    other = np.linalg.qr(np.column_stack([r, RNG.normal(size=(16, 3))]))[0][:, 1:]
    np.testing.assert_allclose(out @ other, x @ other, atol=1e-9)
    # reflection flips the component
    flipped = ablate(x, orthonormal(r), coef=2.0)
    u = r / np.linalg.norm(r)
    np.testing.assert_allclose(flipped @ u, -(x @ u), atol=1e-9)


@pytest.mark.nomodel
def test_adapter_tensors_are_the_weight_orthogonalization():
    w = synthetic()
    dirs = RNG.normal(size=(2, 16))
    q = orthonormal(dirs)
    assert q.shape == (16, 2)
    t = adapter_tensors(w, dirs)
    for name, mat in w.matrices.items():
        a, b = t[f"{name}.lora_a"].astype(np.float64), t[f"{name}.lora_b"].astype(np.float64)
        if name == "token_embd.weight":  # rows are tokens: e' = e + B a_t
            edited = mat + a @ b.T
            np.testing.assert_allclose(edited, mat - (mat @ q) @ q.T, atol=1e-4)
            assert np.abs(edited @ q).max() < 1e-4
        else:  # W' = W + B A
            edited = mat + b @ a
            np.testing.assert_allclose(edited, mat - q @ (q.T @ mat), atol=1e-4)
            assert np.abs(q.T @ edited).max() < 1e-4
    tied = adapter_tensors(synthetic(tied=True), dirs)
    assert not any(k.startswith("token_embd") for k in tied)


@pytest.mark.nomodel
def test_writer_refuses_to_overwrite_and_reads_back(tmp_path):
    w = synthetic()
    r = RNG.normal(size=16)
    path = write_adapter(tmp_path / "a.gguf", w, r, coef=2.0)
    with pytest.raises(OutputExistsError):
        write_adapter(path, w, r)
    dirs, coef = adapter_directions(path)
    assert coef == 2.0 and dirs.shape == (1, 16)
    np.testing.assert_allclose(np.abs(dirs[0]), np.abs(r / np.linalg.norm(r)), atol=1e-6)
    assert not list(tmp_path.glob("*.part"))
    assert path.stat().st_mode & 0o044  # readable by others, as a plain new file (not mkstemp's 0600)
    from localsteer.errors import VectorError
    from localsteer.vector import ControlVector
    with pytest.raises(VectorError, match="LoRA adapter, not a control vector: load it with --lora"):
        ControlVector.load(path)


@pytest.mark.nomodel
def test_post_norm_architectures_are_refused(tmp_path):
    import gguf
    path = tmp_path / "g.gguf"
    wr = gguf.GGUFWriter(str(path), "gemma3")
    wr.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(ModelError, match="post-norm"):
        residual_writers(path)


@pytest.mark.nomodel
def test_each_expert_gets_the_same_edit():
    w = synthetic()
    w.matrices["blk.0.ffn_down_exps.weight"] = RNG.normal(size=(3, 16, 24)).astype(np.float32)  # (E, n_out, n_in)
    dirs = RNG.normal(size=(2, 16))
    q = orthonormal(dirs)
    t = adapter_tensors(w, dirs)
    a, b = t["blk.0.ffn_down_exps.weight.lora_a"], t["blk.0.ffn_down_exps.weight.lora_b"]
    assert a.shape == (3, 2, 24) and b.shape == (3, 16, 2)  # ggml [n_in, k, E] and [k, n_out, E]
    for e, mat in enumerate(w.matrices["blk.0.ffn_down_exps.weight"]):
        np.testing.assert_allclose(mat + b[e] @ a[e], mat - q @ (q.T @ mat), atol=1e-4)


def _gguf(path, arch: str, tensors: dict, n_layer: int = 1):
    import gguf
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(n_layer)
    for name, arr in tensors.items():
        wr.add_tensor(name, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


@pytest.mark.nomodel
def test_what_the_ablation_cannot_edit_is_refused(tmp_path):
    m = np.zeros((8, 8), np.float32)
    layer = {"token_embd.weight": np.zeros((4, 8), np.float32), "blk.0.attn_output.weight": m,
             "blk.0.ffn_down.weight": m}
    residual_writers(_gguf(tmp_path / "ok.gguf", "llama", layer))
    with pytest.raises(ModelError, match="post-norm"):  # by its tensors, whatever the architecture's name
        residual_writers(_gguf(tmp_path / "p.gguf", "newarch", {**layer, "blk.0.post_ffw_norm.weight": m[0]}))
    with pytest.raises(ModelError, match=r"bias to the residual stream \(blk.0.attn_output.bias\)"):
        residual_writers(_gguf(tmp_path / "b.gguf", "llama", {**layer, "blk.0.attn_output.bias": m[0]}))
    with pytest.raises(ModelError, match="layer 1 of this llama model writes"):
        residual_writers(_gguf(tmp_path / "l.gguf", "llama", layer, n_layer=2))


@pytest.fixture(scope="module")
def qwen_weights(qwen05_path):
    return residual_writers(qwen05_path)


def test_real_adapter_loads_and_removes_the_direction_everywhere(qwen05, qwen_weights, tmp_path):
    r = np.random.default_rng(1).normal(size=qwen05.n_embd).astype(np.float32)
    u = r / np.linalg.norm(r)
    path = write_adapter(tmp_path / "ablate.gguf", qwen_weights, r)
    lora = Lora(qwen05, path)
    prompt = qwen05.tokenize(qwen05.apply_chat_template([{"role": "user", "content": "Describe the ocean."}]))
    layers = list(range(1, qwen05.n_layer))

    def run(scale):
        cap = Capture(layers)
        with qwen05.context(n_ctx=256, n_batch=256, capture=cap) as ctx:
            if scale is not None:
                ctx.set_loras([(lora, scale)])
            ctx.decode(prompt, range(len(prompt)), [0] * len(prompt), [True] * len(prompt))
            return ctx.logits_rows(len(prompt)), {il: a.copy() for il, a in cap.layers.items()}

    plain_logits, plain = run(None)
    zero_logits, _ = run(0.0)
    np.testing.assert_array_equal(zero_logits, plain_logits)  # scale 0 is the plain model
    ablated_logits, ablated = run(1.0)
    assert not np.allclose(ablated_logits, plain_logits)
    for il in layers[:-1]:  # every layer's output has (almost) no component along r
        before = np.abs(plain[il][1:] @ u).mean()
        after = np.abs(ablated[il][1:] @ u).mean()
        scale = np.linalg.norm(ablated[il][1:], axis=1).mean()
        assert after < 0.02 * scale and after < 0.2 * before, (il, before, after, scale)
    lora.close()


def test_adapter_for_another_model_is_refused(smol, qwen_weights, tmp_path):
    path = write_adapter(tmp_path / "q.gguf", qwen_weights, np.ones(qwen_weights.n_embd, np.float32))
    with pytest.raises(ModelError, match="could not load the adapter"):
        Lora(smol, path)
