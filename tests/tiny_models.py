"""Tiny synthetic GGUF models, one per architecture llama.cpp runs that people steer: a few layers,
a small width, seeded random weights, and a real tokenizer (vocabulary, merges, special tokens and
chat template copied from a shipped model). Their text is gibberish; what they prove is that every
command that reads or edits a model's insides works on that architecture's layout (tensor names,
fused projections, Q/K norms, post-norms, 3-D expert tensors) in the real llama.cpp.

`make(name, dest)` writes one (deterministic: the same bytes every time); `ensure(name)` makes it
in the model cache (`$LOCALSTEER_HOME/models/tiny/`) unless it is already there.
`scripts/tiny_models.py` runs it from the command line. Never committed: tests build them.

The tensor names and shapes are llama.cpp's (`src/models/<arch>.cpp`, `load_arch_tensors`), in
numpy order (ggml's reversed): a matrix ggml calls [n_in, n_out] is an array (n_out, n_in).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from localsteer import models
from localsteer.fileio import write_gguf


@dataclass(frozen=True)
class Tiny:
    """One synthetic model: its llama.cpp architecture, shape and the known model it takes its
    tokenizer and chat template from."""

    name: str
    arch: str  # general.architecture
    stands_for: str  # the real models with this layout
    donor: str  # a known model (localsteer.models) whose tokenizer and chat template are copied
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 128
    tied: bool = True  # no output.weight: the output projection is the token embedding
    qkv: str = "split"  # "split" (attn_q, attn_k, attn_v), "fused" (attn_qkv: Phi-3)
    qkv_bias: bool = False  # Qwen2's biases on q, k, v
    qk_norm: bool = False  # attn_q_norm, attn_k_norm (Qwen3, Gemma 3)
    post_norm: bool = False  # post_attention_norm, post_ffw_norm (Gemma 2, 3)
    gated_ffn: bool = True  # ffn_gate + ffn_up; False: one fused ffn_up of 2 x n_ff (Phi-3)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_shexp: int = 0  # a shared expert (Qwen2-MoE)
    sliding_window: int = 0


TINY: dict[str, Tiny] = {t.name: t for t in (
    Tiny("llama", "llama", "Llama 3.x, Mistral 7B / Nemo, SmolLM2", "smollm2-135m-instruct", tied=False),
    Tiny("qwen2", "qwen2", "Qwen2.5", "qwen2.5-coder-0.5b-instruct", qkv_bias=True),
    # head_dim 128 (q is wider than the stream), as every Qwen3 (transformers assumes it)
    Tiny("qwen3", "qwen3", "Qwen3 (dense)", "qwen2.5-coder-0.5b-instruct", n_head=2, n_head_kv=1, head_dim=128,
         qk_norm=True),
    # head_dim 256 as Gemma 2 2B/9B and Gemma 3 (transformers' default query scaling assumes it)
    Tiny("gemma2", "gemma2", "Gemma 2", "smollm2-135m-instruct", n_head=2, n_head_kv=1, head_dim=256,
         post_norm=True, sliding_window=16),
    Tiny("gemma3", "gemma3", "Gemma 3 (text)", "smollm2-135m-instruct", n_layer=6, n_head=2, n_head_kv=1,
         head_dim=256, qk_norm=True, post_norm=True, sliding_window=16),
    Tiny("phi3", "phi3", "Phi-3, Phi-3.5 mini", "smollm2-135m-instruct", n_embd=96, n_head=3, n_head_kv=3,
         head_dim=32, tied=False, qkv="fused", gated_ffn=False),
    # the expert widths of Qwen1.5-MoE-A2.7B (transformers takes them from its defaults, not the file)
    Tiny("qwen2moe", "qwen2moe", "Qwen1.5-MoE, Qwen2-MoE (shared expert)", "qwen2.5-coder-0.5b-instruct",
         tied=False, qkv_bias=True, n_ff=1408, n_expert=4, n_expert_used=2, n_ff_shexp=5632),
    Tiny("mixtral", "llama", "Mixtral", "smollm2-135m-instruct", tied=False, n_ff=64,
         n_expert=4, n_expert_used=2),
)}

# Stand-ins: random weights in the shape of a shipped model (its layer count, widths, heads and
# vocabulary), for timing decode shapes where the real file cannot be taken (a machine with no model
# hub; scripts/bench_shapes.py). Their speed is the real model's up to the weights' quantization
# (Q8_0 here; the shipped files mix Q4/Q5/Q6/Q8); never used by the tests.
SHAPES: dict[str, Tiny] = {t.name: t for t in (
    Tiny("like-smollm2-135m", "llama", "SmolLM2-135M's shape", "smollm2-135m-instruct", n_layer=30, n_embd=576,
         n_head=9, n_head_kv=3, head_dim=64, n_ff=1536),
    Tiny("like-qwen2.5-0.5b", "qwen2", "Qwen2.5-0.5B's shape", "qwen2.5-coder-0.5b-instruct", n_layer=24,
         n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864, tied=False, qkv_bias=True),
)}


def spec_of(name: str) -> Tiny:
    return TINY[name] if name in TINY else SHAPES[name]


RMS_EPS = 1e-6
# logits have a spread of a few units (std ~ 0.5 x sqrt(n_embd)): greedy choices are not near-ties
EMBED_STD = 0.5


def cache_dir() -> Path:
    return models.home() / "models" / "tiny"


def _digest(spec: Tiny) -> str:
    """Names the file: what it is made from (this module's source too, so that a change to the
    weights or the layout makes new files)."""
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    donor = models.KNOWN_MODELS[spec.donor].sha256
    return hashlib.sha256(json.dumps([source, asdict(spec), donor]).encode()).hexdigest()[:10]


def path_for(name: str) -> Path:
    return cache_dir() / f"tiny-{name}-{_digest(spec_of(name))}.gguf"


def ensure(name: str) -> Path:
    """The cached tiny model `name`, made first if missing (older versions of it are removed).
    The donor model must be pulled (`localsteer models pull <donor>`)."""
    path = path_for(name)
    if not path.is_file():
        for old in cache_dir().glob(f"tiny-{name}-*.gguf"):
            old.unlink(missing_ok=True)
        make(name, path)
    return path


@lru_cache(maxsize=2)  # reading Qwen's 151k-token vocabulary takes seconds: once per donor
def _donor_tokenizer(donor: str) -> dict:
    """The tokenizer keys of a known model's GGUF file, as plain values."""
    from gguf import GGUFReader

    path = models.model_path(donor)
    if not path.is_file():
        raise FileNotFoundError(f"{donor} is not pulled: run `localsteer models pull {donor}`")
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _write_tokenizer(w, tok: dict) -> None:
    from gguf import GGUFValueType

    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in tok:
        w.add_token_merges(tok["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in tok:
        w.add_token_scores(tok["tokenizer.ggml.scores"])
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in tok:
            w.add_uint32(f"tokenizer.ggml.{key}", int(tok[f"tokenizer.ggml.{key}"]))
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        if f"tokenizer.ggml.{key}" in tok:
            w.add_key_value(f"tokenizer.ggml.{key}", bool(tok[f"tokenizer.ggml.{key}"]), GGUFValueType.BOOL)
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])


def tensors(spec: Tiny, n_vocab: int) -> dict[str, np.ndarray]:
    """Every weight of the model, float32, numpy order, seeded by the model's name."""
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    d, hd, ff = spec.n_embd, spec.head_dim, spec.n_ff

    def mat(n_out: int, n_in: int, *lead: int) -> np.ndarray:
        return (rng.standard_normal((*lead, n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {"token_embd.weight": (EMBED_STD * rng.standard_normal((n_vocab, d))).astype(np.float32),
           "output_norm.weight": norm(d)}
    if not spec.tied:
        out["output.weight"] = (EMBED_STD * rng.standard_normal((n_vocab, d))).astype(np.float32)
    n_q, n_kv = spec.n_head * hd, spec.n_head_kv * hd
    for il in range(spec.n_layer):
        b = f"blk.{il}."
        out[b + "attn_norm.weight"] = norm(d)
        if spec.qkv == "fused":
            out[b + "attn_qkv.weight"] = mat(n_q + 2 * n_kv, d)
        else:
            out[b + "attn_q.weight"], out[b + "attn_k.weight"], out[b + "attn_v.weight"] = (
                mat(n_q, d), mat(n_kv, d), mat(n_kv, d))
        if spec.qkv_bias:
            for name, n in (("attn_q", n_q), ("attn_k", n_kv), ("attn_v", n_kv)):
                out[b + f"{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if spec.qk_norm:
            out[b + "attn_q_norm.weight"], out[b + "attn_k_norm.weight"] = norm(hd), norm(hd)
        out[b + "attn_output.weight"] = mat(d, n_q)
        if spec.post_norm:
            # Gemma scales the embedding by sqrt(n_embd): blocks that add only unit-size outputs would
            # leave the stream (and the tied output) to the input token alone
            out[b + "post_attention_norm.weight"], out[b + "post_ffw_norm.weight"] = 4 * norm(d), 4 * norm(d)
        out[b + "ffn_norm.weight"] = norm(d)
        if spec.n_expert:
            e = spec.n_expert
            out[b + "ffn_gate_inp.weight"] = mat(e, d)
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = mat(ff, d, e), mat(ff, d, e)
            out[b + "ffn_down_exps.weight"] = mat(d, ff, e)
            if spec.n_ff_shexp:
                sh = spec.n_ff_shexp
                out[b + "ffn_gate_inp_shexp.weight"] = mat(1, d)[0]
                out[b + "ffn_gate_shexp.weight"], out[b + "ffn_up_shexp.weight"] = mat(sh, d), mat(sh, d)
                out[b + "ffn_down_shexp.weight"] = mat(d, sh)
        elif spec.gated_ffn:
            out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = mat(ff, d), mat(ff, d)
            out[b + "ffn_down.weight"] = mat(d, ff)
        else:
            out[b + "ffn_up.weight"] = mat(2 * ff, d)  # gate and up, fused
            out[b + "ffn_down.weight"] = mat(d, ff)
    return out


def _quantized(name: str, arr: np.ndarray):
    """Matrices in Q8_0 (as shipped models are quantized; localsteer dequantizes what it edits),
    vectors (norms, biases, the shared-expert gate) and the router in F32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if arr.ndim == 1 or "ffn_gate_inp" in name or arr.shape[-1] % 32:
        return arr, None
    return quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def token_embedding(name: str, n_vocab: int) -> np.ndarray:
    """The token embedding `(n_vocab, n_embd)` of tiny model `name` as llama.cpp reads it (after
    its Q8_0 round trip), without reading the file."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    emb = tensors(spec_of(name), n_vocab)["token_embd.weight"]
    data, qtype = _quantized("token_embd.weight", emb)
    return emb if qtype is None else dequantize(data, GGMLQuantizationType.Q8_0)


def make(name: str, dest: str | os.PathLike) -> Path:
    """Write the tiny model `name` (a key of TINY) to `dest`, whole (a temporary file, renamed)."""
    spec = spec_of(name)
    tok = _donor_tokenizer(spec.donor)
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    weights = tensors(spec, n_vocab)

    def fill(w) -> None:
        # not the architecture's name: llama.cpp sets Phi-3 token attributes by the model name
        w.add_name("localsteer tiny model")
        w.add_description(f"synthetic random weights in the layout of {spec.stands_for}; made by tests/tiny_models.py")
        w.add_context_length(8192)
        w.add_embedding_length(spec.n_embd)
        w.add_block_count(spec.n_layer)
        w.add_feed_forward_length(spec.n_ff)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(RMS_EPS)
        if spec.arch == "llama":
            w.add_vocab_size(n_vocab)
        if spec.sliding_window:
            w.add_sliding_window(spec.sliding_window)
        if spec.arch == "gemma2":
            w.add_attn_logit_softcapping(50.0)
            w.add_final_logit_softcapping(30.0)
        if spec.n_expert:
            w.add_expert_count(spec.n_expert)
            w.add_expert_used_count(spec.n_expert_used)
            if spec.arch != "llama":
                w.add_expert_feed_forward_length(spec.n_ff)
        if spec.n_ff_shexp:
            w.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
        _write_tokenizer(w, tok)
        for tname, arr in weights.items():
            data, qtype = _quantized(tname, arr)
            if qtype is None:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, data, raw_dtype=qtype)

    return write_gguf(dest, spec.arch, fill)
