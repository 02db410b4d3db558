"""KL-then-steer (Stickland et al. 2024; docs/methods.md, "KL-then-steer"): a LoRA adapter trained so that the model
*with the control vector applied* keeps the plain model's next-token distributions on benign
prompts; at run time llama.cpp loads it next to the vector (`--lora` + `--control-vector`).

Training only. It needs the `train` extra (PyTorch on the CPU and transformers, which reads the
GGUF model and dequantizes it); the runtime never imports torch, and this module imports it only
inside its functions.

- Model: transformers' GGUF loader, float32. The vector is added to the output of each of its
  layers by a forward hook, as llama.cpp adds a control vector to `l_out-<il>`.
- Adapter: rank-r LoRA (`W x + B A x`, B starts at zero) on the value, attention-output and FFN
  (gate, up, down) projections of the layers from the vector's first layer on. Query and key are
  left alone: llama.cpp's converter permutes their rows for some architectures.
- Data: chat-templated benign prompts with the plain model's greedy reply; loss: KL(plain ‖
  steered + LoRA) of the next-token distributions over every position, Adam.
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
from .vector import ControlVector, format_layers

# transformers' module name -> llama.cpp's tensor name
MODULES = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
KEY = "localsteer."


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
    return torch


def load_hf(model_path: str | os.PathLike):
    """transformers model (float32, eval mode) and tokenizer read from a GGUF file."""
    _torch()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


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


def train(model_path: str | os.PathLike, arch: str, vector: ControlVector, prompts: Sequence[str],
          out: str | os.PathLike, config: KtsConfig = KtsConfig(), force: bool = False,
          log: Callable[[str], None] = print, meta: dict | None = None) -> KtsResult:
    """Train the adapter for `vector` (already scaled and limited to its layers) on the benign
    `prompts` (user messages) and write it to `out`."""
    torch = _torch()
    out = Path(out)
    check_output(out, force)
    if not vector.layers:
        raise LocalsteerError("the vector is zero on every layer")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    log("loading the model into transformers (dequantized)…")
    model, tok = load_hf(model_path)
    blocks = model.model.layers
    if vector.n_embd != model.config.hidden_size or len(blocks) != vector.n_layer:
        raise LocalsteerError(f"the vector ({vector.n_layer} x {vector.n_embd}) does not fit the model "
                              f"({len(blocks)} x {model.config.hidden_size})")
    lora_layers = config.layers or tuple(range(min(vector.layers), len(blocks)))
    loras: dict[str, _Lora] = {}
    for il in lora_layers:
        for mod, name in MODULES.items():
            loras[f"blk.{il}.{name}"] = _Lora(torch, blocks[il].get_submodule(mod), config.rank, gen)
    steer = _Steer(torch, blocks, vector)

    def switch(on: bool) -> None:
        steer.on = on
        for lo in loras.values():
            lo.on = on

    # data: each prompt with the plain model's greedy reply
    log(f"plain replies to {len(prompts)} benign prompts…")
    texts = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=config.reply_tokens, do_sample=False,
                                  pad_token_id=tok.eos_token_id)
        texts.append(full[0].tolist())

    params = [p for lo in loras.values() for p in (lo.a, lo.b)]
    opt = torch.optim.Adam(params, lr=config.lr)
    rng = np.random.default_rng(config.seed)
    result = KtsResult(out)

    def batch_kl(batch: list[list[int]], with_lora: bool) -> "torch.Tensor":
        n = max(len(t) for t in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([t + [pad] * (n - len(t)) for t in batch])
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
            "steps": config.steps, "lr": config.lr, "n_prompts": len(prompts),
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
