"""KL-then-steer (Stickland et al. 2024; docs/methods.md, "KL-then-steer"): a LoRA adapter trained so that the model
*with the control vector applied* keeps the plain model's next-token distributions on benign
prompts; at run time llama.cpp loads it next to the vector (`--lora` + `--control-vector`).

Training only. It needs the `train` extra (PyTorch on the CPU and transformers, which reads the
GGUF model and dequantizes it); the runtime never imports torch, and this module imports it only
inside its functions.

- Model: transformers' GGUF loader, float32. It must read the file as llama.cpp does: a file whose
  weights transformers leaves out or reshapes (a llama file with experts, which it reads as a dense
  Llama; sizes it takes from its defaults), or whose next-token distributions differ from
  llama.cpp's, is refused (`load_hf`, `check_agreement`). The vector is added to the output of
  each of its layers by a forward hook, as llama.cpp adds a control vector to `l_out-<il>`.
- Adapter: rank-r LoRA (`W x + B A x`, B starts at zero) on the linear layers of `MODULES` a layer
  has (value, attention output, FFN gate, up and down; Phi-3's fused gate-up; a shared expert's),
  from the vector's first layer on. Query and key are left alone (llama.cpp's converter permutes
  their rows for some architectures), and so are fused QKV and an MoE's experts (3-D parameters
  in transformers, not linear layers).
- Data: benign prompts in the model's chat template as llama.cpp applies it at run time, with
  llama.cpp's plain greedy reply (`benign_sequences`); loss: KL(plain ‖ steered + LoRA) of the
  next-token distributions over every position, Adam.
- Export: a GGUF LoRA in llama.cpp's layout (see refusal/lora.py): `blk.N.attn_v.weight.lora_a` (r, n_in)
  and `.lora_b` (n_out, r), float16, alpha = r so the adapter's scale is the LoRA's.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import LocalsteerError
from .fileio import add_gguf_value, check_output, write_gguf
from .runtime import Model
from .vector import ControlVector, format_layers

# transformers' module (in a decoder layer) -> llama.cpp's tensor name; a layer gets a LoRA on each of
# these it has as a linear layer. Phi-3's fused gate and up projection is llama.cpp's ffn_up.
MODULES = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
           "mlp.shared_expert.down_proj": "ffn_down_shexp"}
KEY = "localsteer."
# transformers' next-token distributions must match llama.cpp's: KL(llama.cpp || transformers),
# averaged over the check prompts. Models it reads right measured 0.0005-0.017 (quantized in
# llama.cpp, dequantized to float32 in transformers: SmolLM2 Q4_1, Qwen2.5-0.5B Q4_K_M,
# Gemma-3-270m Q4_K_M, the tiny test models).
AGREEMENT_KL = 0.1


class TrainingExtraMissing(LocalsteerError):
    """PyTorch or transformers is not installed."""


@dataclass
class KtsConfig:
    rank: int = 4
    steps: int = 60
    batch: int = 4
    lr: float = 1e-3
    reply_tokens: int = 16
    seed: int = 0
    layers: tuple[int, ...] | None = None  # LoRA layers (default: the vector's first layer on)


@dataclass
class KtsResult:
    path: Path
    losses: list[float] = field(default_factory=list)  # KL per step
    start_kl: float = 0.0  # KL of the steered model without the adapter, on the first batch
    seconds: float = 0.0


def _torch():
    import importlib
    try:
        torch = importlib.import_module("torch")
        importlib.import_module("transformers")
    except ImportError:
        raise TrainingExtraMissing("KL-then-steer training needs PyTorch and transformers: "
                                   "pip install 'localsteer[train]' (see the README)") from None
    # PyTorch counts the host's cores, not a container's CPU quota: more threads than cores spin
    from .runtime import default_threads
    torch.set_num_threads(min(torch.get_num_threads(), default_threads()))
    return torch


def load_hf(model_path: str | os.PathLike):
    """The transformers model (float32, eval mode) read from a GGUF file; a `LocalsteerError` when
    transformers cannot read it, or reads it without some of its weights or with other shapes (it
    then initialises them at random: another model than llama.cpp's)."""
    _torch()
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    path = Path(model_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, in a table, what is checked below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LocalsteerError(f"transformers cannot read {path.name}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    left_out = sorted({re.sub(r"\.\d+\.", ".N.", k) for k in
                       [*info.get("missing_keys", ()), *(m[0] if isinstance(m, tuple) else m
                                                         for m in info.get("mismatched_keys", ()))]})
    if left_out:
        raise LocalsteerError(f"transformers reads {path.name} without {', '.join(left_out[:3])}"
                              f"{' and more' if len(left_out) > 3 else ''} (it does not read this file's layout, e.g. "
                              "a llama file with experts): it would train another model than llama.cpp runs")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def benign_sequences(model: Model, prompts: Sequence[str], reply_tokens: int = 16, n_reference: int = 4
                     ) -> tuple[list[list[int]], list[tuple[list[int], np.ndarray]]]:
    """Each prompt in the model's chat template (as llama.cpp applies it when steering; a model
    without one reads the prompt as plain text) followed by llama.cpp's plain greedy reply (up to
    `reply_tokens`, with the end-of-turn token if it came); and, for the first `n_reference`
    prompts, the prompt's tokens with llama.cpp's next-token logits after it (`check_agreement`)."""
    sequences: list[list[int]] = []
    reference: list[tuple[list[int], np.ndarray]] = []
    with model.context(n_ctx=4096) as ctx:
        for p in prompts:
            toks = model.tokenize(model.apply_chat_template([{"role": "user", "content": p}]))
            ctx.clear()
            ctx.decode_sequence(toks, 0)
            if len(reference) < n_reference:
                reference.append((toks, ctx.logits()))
            reply: list[int] = []
            while True:
                tok = int(np.argmax(ctx.logits()))
                reply.append(tok)
                if model.is_eog(tok) or len(reply) == reply_tokens:
                    break
                ctx.decode([tok], [len(toks) + len(reply) - 1], [0], [True])
            sequences.append(toks + reply)
    return sequences, reference


def check_agreement(model, prompts: Sequence[Sequence[int]], reference: Sequence[np.ndarray], name: str) -> float:
    """KL(llama.cpp || transformers) of the next-token distributions after `prompts` (token ids;
    `reference`: llama.cpp's logits there), averaged; a `LocalsteerError` above AGREEMENT_KL."""
    import torch

    kls = []
    with torch.no_grad():
        for toks, ref in zip(prompts, reference):
            hf = torch.log_softmax(model(input_ids=torch.tensor([list(toks)])).logits[0, -1].double(), -1)
            lp = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1)
            if hf.shape != lp.shape:
                raise LocalsteerError(f"transformers reads {name} with {hf.shape[0]} tokens, llama.cpp with {lp.shape[0]}")
            kls.append(float((lp.exp() * (lp - hf)).sum()))
    kl = float(np.mean(kls))
    if not kl <= AGREEMENT_KL:
        raise LocalsteerError(f"transformers computes another model than llama.cpp from {name} (KL {kl:.3f} between "
                              f"their next-token distributions, more than {AGREEMENT_KL:g}): it does not read this "
                              "architecture's file as llama.cpp does")
    return kl


class _Lora:
    """The LoRA factors of one linear layer and the switch that turns them on."""

    def __init__(self, torch, linear, rank: int, gen):
        n_in, n_out = linear.in_features, linear.out_features
        bound = 1.0 / math.sqrt(n_in)
        self.a = torch.nn.Parameter((torch.rand(rank, n_in, generator=gen) * 2 - 1) * bound)
        self.b = torch.nn.Parameter(torch.zeros(n_out, rank))
        self.on = False
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not self.on:
            return output
        return output + (inputs[0] @ self.a.T) @ self.b.T


class _Steer:
    """Adds the control vector to the output of its layers while `on`."""

    def __init__(self, torch, layers, vector: ControlVector):
        self.on = False
        self.handles = []
        for il in vector.layers:
            d = torch.tensor(vector.directions[il], dtype=torch.float32)
            self.handles.append(layers[il].register_forward_hook(self._make(d)))

    def _make(self, d):
        def hook(module, inputs, output):
            if not self.on:
                return output
            if isinstance(output, tuple):
                return (output[0] + d,) + tuple(output[1:])
            return output + d
        return hook


def _linear(torch, block, name: str):
    try:
        mod = block.get_submodule(name)
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.nn.Linear) else None


def train(model_path: str | os.PathLike, arch: str, vector: ControlVector, texts: Sequence[Sequence[int]],
          out: str | os.PathLike, config: KtsConfig = KtsConfig(), force: bool = False,
          log: Callable[[str], None] = print, meta: dict | None = None,
          reference: Sequence[tuple[Sequence[int], np.ndarray]] = ()) -> KtsResult:
    """Train the adapter for `vector` (already scaled and limited to its layers) on the benign
    `texts` (token ids: templated prompt and plain reply, `benign_sequences`) and write it to
    `out`. `reference`: (prompt tokens, llama.cpp's next-token logits) that transformers must
    match (`check_agreement`)."""
    torch = _torch()
    out = Path(out)
    check_output(out, force)
    if not vector.layers:
        raise LocalsteerError("the vector is zero on every layer")
    if not texts:
        raise LocalsteerError("no benign prompts to train on")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    log("loading the model into transformers (dequantized)…")
    model = load_hf(model_path)
    if reference:
        kl = check_agreement(model, [toks for toks, _ in reference], [lg for _, lg in reference], Path(model_path).name)
        log(f"transformers reads it as llama.cpp does (KL {kl:.4f} on {len(reference)} prompts)")
    blocks = model.model.layers
    if vector.n_embd != model.config.hidden_size or len(blocks) != vector.n_layer:
        raise LocalsteerError(f"the vector ({vector.n_layer} x {vector.n_embd}) does not fit the model "
                              f"({len(blocks)} x {model.config.hidden_size})")
    lora_layers = config.layers or tuple(range(min(vector.layers), len(blocks)))
    loras: dict[str, _Lora] = {}
    for il in lora_layers:
        for mod, name in MODULES.items():
            linear = _linear(torch, blocks[il], mod)
            if linear is not None:
                loras[f"blk.{il}.{name}"] = _Lora(torch, linear, config.rank, gen)
    if not loras:
        raise LocalsteerError(f"no layer of this {arch} model has the projections the adapter trains "
                              f"({', '.join(MODULES)})")
    steer = _Steer(torch, blocks, vector)

    def switch(on: bool) -> None:
        steer.on = on
        for lo in loras.values():
            lo.on = on

    texts = [list(t) for t in texts]
    params = [p for lo in loras.values() for p in (lo.a, lo.b)]
    opt = torch.optim.Adam(params, lr=config.lr)
    rng = np.random.default_rng(config.seed)
    result = KtsResult(out)

    def batch_kl(batch: list[list[int]], with_lora: bool) -> "torch.Tensor":
        n = max(len(t) for t in batch)
        ids = torch.tensor([t + [0] * (n - len(t)) for t in batch])  # padding: masked out
        mask = torch.tensor([[1] * len(t) + [0] * (n - len(t)) for t in batch])
        switch(False)
        with torch.no_grad():
            plain = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
        steer.on = True
        for lo in loras.values():
            lo.on = with_lora
        steered = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, dim=-1)
        switch(False)
        kl = (plain.exp() * (plain - steered)).sum(-1)
        return (kl * mask).sum() / mask.sum()

    log(f"training: rank {config.rank} on layers {format_layers(lora_layers)}, {config.steps} steps…")
    order = rng.permutation(len(texts))
    with torch.no_grad():
        result.start_kl = float(batch_kl([texts[i] for i in order[:config.batch]], with_lora=False))
    for step in range(config.steps):
        idx = [order[(step * config.batch + j) % len(texts)] for j in range(config.batch)]
        loss = batch_kl([texts[i] for i in idx], with_lora=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step == 0:
            log(f"  step {step + 1}/{config.steps}: KL {result.losses[-1]:.4f}")
    tensors: dict[str, np.ndarray] = {}
    for name, lo in loras.items():
        tensors[f"{name}.weight.lora_a"] = lo.a.detach().numpy().astype(np.float16)
        tensors[f"{name}.weight.lora_b"] = lo.b.detach().numpy().astype(np.float16)
    result.seconds = time.perf_counter() - t0
    info = {"method": "kl-then-steer", "rank": config.rank, "lora_layers": format_layers(lora_layers),
            "steps": config.steps, "lr": config.lr, "n_prompts": len(texts),
            "vector_layers": format_layers(vector.layers), "start_kl": result.start_kl,
            "final_kl": float(np.mean(result.losses[-10:])), **(meta or {})}

    def fill(w) -> None:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(config.rank))
        for key, value in info.items():
            add_gguf_value(w, KEY + key, value)
        for name, arr in tensors.items():
            w.add_tensor(name, np.ascontiguousarray(arr))

    write_gguf(out, arch, fill)
    return result
