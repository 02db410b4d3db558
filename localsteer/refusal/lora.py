"""Directional ablation and reflection as GGUF LoRA adapters that llama.cpp loads with `--lora`.

Removing the directions Q (orthonormal columns, n_embd x k) from everything written into the
residual stream, `x <- x - Q Qᵀ x`, is the weight edit `W <- W - Q Qᵀ W` on every matrix that writes
into it: the token embedding, each layer's attention output and FFN down projection
(docs/methods.md, "Refusal direction, ablation and INLP").
That edit is the rank-k product `B·A` with `B = -Q` and `A = Qᵀ W`, which is exactly a LoRA adapter:
llama.cpp adds `scale · B (A x)` to `W x`. Reflection ("counterfactual flipping", `x <- x - 2 Q Qᵀ x`)
is the same with `B = -2Q`. The adapter's scale (`--lora-scaled FILE S`) gives partial edits; 0 is the
plain model. The user's model file is never touched.

Layout llama.cpp expects (llama-adapter.cpp, llama-graph.cpp in the vendored source):
`general.type = adapter`, `adapter.type = lora`, `general.architecture` = the model's;
for a weight `NAME` of ggml shape [n_in, n_out]: `NAME.lora_a` [n_in, k] and `NAME.lora_b` [k, n_out];
for the token embedding ([n_embd, n_vocab], read by row) A and B are flipped: `lora_a` [k, n_vocab],
`lora_b` [k, n_embd]. The effective scale is `scale · alpha / k`, so alpha = k makes it `scale`.

Mixture-of-experts models write into the stream through every expert's down projection, a 3-D tensor
`ffn_down_exps` (ggml [n_ff, n_embd, n_expert]); each expert gets the same edit, `lora_a` [n_in, k,
n_expert] and `lora_b` [k, n_embd, n_expert], which llama.cpp applies per selected expert
(`build_lora_mm_id`). The router's weights are scalars per expert, so the mixture of ablated experts
is the ablated mixture. A shared expert (`ffn_down_shexp`) is one more 2-D writer.

Architectures that normalise a block's output before it joins the stream (Gemma 2/3's post-norms)
cannot be edited this way: the norm sits between W and the residual stream, so `W - Q Qᵀ W` does not
remove Q from what is added. Nor can a bias on a writer (a constant a LoRA cannot edit), nor a layer
whose writers are not the ones named above. Those are refused (`ablation_blocker`). A model whose
output projection is the token embedding (tied weights, no `output.weight`) keeps its embedding:
llama.cpp would apply the embedding's adapter to the output projection too. That is recorded in the
adapter's metadata.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..fileio import add_gguf_value, check_output, write_gguf
from ..errors import ModelError, VectorError

POST_NORM_ARCHS = ("gemma2", "gemma3", "gemma3n", "olmo2", "cohere2")
_WRITERS = r"(attn_output|ffn_down|ffn_down_exps|ffn_down_shexp)"
_TARGET = re.compile(rf"^(token_embd|blk\.\d+\.{_WRITERS})\.weight$")
_WRITER_BIAS = re.compile(rf"^blk\.\d+\.{_WRITERS}\.bias$")
_POST_NORM = re.compile(r"^blk\.\d+\.(post_attention_norm|post_ffw_norm|attn_post_norm|ffn_post_norm)\.weight$")
KEY = "localsteer."


def post_norm_reason(arch: str) -> str:
    return (f"{arch} normalises each block's output before it joins the residual stream (post-norm layers): "
            "a weight edit cannot remove a direction there")


def ablation_blocker(reader) -> str | None:
    """Why a weight edit cannot ablate a direction in this model (a `gguf.GGUFReader` on it), or
    None: post-norm layers, a bias on a residual writer, or a layer without the writers edited."""
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else "this"
    names = {t.name for t in reader.tensors}
    if arch in POST_NORM_ARCHS or any(_POST_NORM.match(n) for n in names):
        return post_norm_reason(arch)
    biases = sorted(n for n in names if _WRITER_BIAS.match(n))
    if biases:
        return (f"{arch} adds a bias to the residual stream ({biases[0]}): a LoRA adapter cannot remove a direction "
                "from a constant")
    count = reader.get_field(f"{arch}.block_count")
    for il in range(int(count.contents()) if count is not None else 0):
        has_ffn = any(f"blk.{il}.{w}.weight" in names for w in ("ffn_down", "ffn_down_exps"))
        if f"blk.{il}.attn_output.weight" not in names or not has_ffn:
            return (f"layer {il} of this {arch} model writes into the residual stream through other weights than "
                    "attn_output and ffn_down (or ffn_down_exps), the ones the ablation edits")
    return None


@dataclass
class Weights:
    """The dequantized matrices that write into the residual stream, float32, numpy shape
    (n_out, n_in) (the token embedding: (n_vocab, n_embd); a layer's experts: (n_expert, n_out,
    n_in)), read once per model file."""

    arch: str
    n_embd: int
    matrices: dict[str, np.ndarray]
    tied_embedding: bool


def residual_writers(model_path: str | os.PathLike,
                     progress: Callable[[int, int], None] | None = None) -> Weights:
    """Dequantize the token embedding, attention output and FFN down weights (experts' too) of a
    GGUF model; a `ModelError` where the ablation does not apply (`ablation_blocker`)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(model_path))
    except (ValueError, OSError) as e:
        raise ModelError(f"cannot read {model_path} as GGUF: {e}") from None
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else ""
    blocker = ablation_blocker(reader)
    if blocker:
        raise ModelError(blocker)
    names = {t.name for t in reader.tensors}
    tensors = [t for t in reader.tensors if _TARGET.match(t.name)]
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if progress:
            progress(i + 1, len(tensors))
    if "token_embd.weight" not in out:
        raise ModelError(f"{model_path} has no token_embd.weight")
    n_embd = out["token_embd.weight"].shape[1]
    return Weights(arch, n_embd, out, tied_embedding="output.weight" not in names)


def orthonormal(directions: np.ndarray) -> np.ndarray:
    """Orthonormal columns (n_embd, k) spanning the rows of `directions` (k, n_embd) (or one vector)."""
    d = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    if not np.all(np.isfinite(d)) or np.linalg.norm(d) == 0:
        raise VectorError("the direction is zero or not finite")
    q, r = np.linalg.qr(d.T)
    keep = np.abs(np.diag(r)) > 1e-8 * np.abs(r).max()
    return q[:, keep]


def ablate(x: np.ndarray, q: np.ndarray, coef: float = 1.0) -> np.ndarray:
    """`x - coef · Q Qᵀ x` for row vectors x (..., n_embd): what the adapter does to the stream."""
    return x - coef * (x @ q) @ q.T


def adapter_tensors(weights: Weights, directions: np.ndarray, coef: float = 1.0) -> dict[str, np.ndarray]:
    """LoRA tensors (numpy layout, shapes reversed from ggml's) removing `coef` x the component of
    what each matrix writes along the directions: coef 1 = ablation, 2 = reflection."""
    q = orthonormal(directions).astype(np.float32)  # (n_embd, k)
    if q.shape[0] != weights.n_embd:
        raise VectorError(f"direction of size {q.shape[0]} does not fit the model (n_embd {weights.n_embd})")
    b = (-coef * q).astype(np.float32)  # (n_embd, k) = ggml [k, n_embd]
    out: dict[str, np.ndarray] = {}
    for name, w in weights.matrices.items():
        base = name[: -len(".weight")]
        if name == "token_embd.weight":
            if weights.tied_embedding:
                continue
            out[f"{name}.lora_a"] = np.ascontiguousarray(w @ q)  # (n_vocab, k) = ggml [k, n_vocab]
            out[f"{name}.lora_b"] = np.ascontiguousarray(b)
        elif w.ndim == 3:  # experts (n_expert, n_out, n_in): the same edit on each
            out[f"{base}.weight.lora_a"] = np.ascontiguousarray(q.T @ w)  # (E, k, n_in) = ggml [n_in, k, E]
            out[f"{base}.weight.lora_b"] = np.ascontiguousarray(np.broadcast_to(b, (w.shape[0], *b.shape)))
        else:
            out[f"{base}.weight.lora_a"] = np.ascontiguousarray(q.T @ w)  # (k, n_in) = ggml [n_in, k]
            out[f"{base}.weight.lora_b"] = np.ascontiguousarray(b)  # (n_out, k) = ggml [k, n_out]
    return out


def write_adapter(path: str | os.PathLike, weights: Weights, directions: np.ndarray, coef: float = 1.0,
                  meta: dict | None = None, force: bool = False) -> Path:
    """Write the ablation (coef 1) or reflection (coef 2) adapter for `directions` as a GGUF LoRA."""
    path = Path(path)
    check_output(path, force)
    tensors = adapter_tensors(weights, directions, coef)
    k = orthonormal(directions).shape[1]
    q = orthonormal(directions)

    def fill(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(k))
        w.add_string(KEY + "edit", "ablation" if coef == 1 else f"x - {coef:g} QQ^T x")
        w.add_float32(KEY + "coef", float(coef))
        w.add_uint32(KEY + "rank", k)
        w.add_bool(KEY + "token_embd_edited", not weights.tied_embedding)
        w.add_array(KEY + "directions", [float(x) for x in q.T.ravel()])
        for key, value in (meta or {}).items():
            add_gguf_value(w, KEY + key, value)
        for name, arr in tensors.items():
            w.add_tensor(name, arr)

    write_gguf(path, weights.arch, fill)
    return path


def adapter_directions(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The orthonormal directions (k, n_embd) and the coefficient stored in a localsteer adapter."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    f_dirs, f_coef, f_rank = (reader.get_field(KEY + k) for k in ("directions", "coef", "rank"))
    if f_dirs is None or f_coef is None or f_rank is None:
        raise VectorError(f"{path} is not a localsteer adapter")
    k = int(f_rank.contents())
    dirs = np.asarray(f_dirs.contents(), dtype=np.float32)
    return dirs.reshape(k, -1), float(f_coef.contents())
