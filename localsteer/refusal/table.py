"""The refusal table (docs/methods.md, "Refusal direction"): every intervention `localsteer refusal direction` wrote,
measured on one split — refusal rates on harmful and harmless requests, KL on harmless first
tokens, perplexity of a neutral text, tokens/s."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..activations import Progress
from ..errors import DatasetError
from .direction import FILES, REFUSAL_CHARS, RefusalSets, Scorer, generate_replies, is_refusal, kl_rows
from ..runtime import Lora, Model


NEUTRAL_TEXT = (
    "The river starts high in the hills, where snow melts in spring and feeds small streams. "
    "Further down, the valley widens and the water slows, winding past farms and old stone bridges. "
    "In the town, people walk along its banks in the evening, and children throw bread to the ducks. "
    "By the time it reaches the sea, the river is wide and brown, carrying silt from a hundred miles inland."
)


def text_perplexity(model: Model, text: str, control: tuple[np.ndarray, Sequence[int]] | None = None,
                    loras: Sequence[tuple[Lora, float]] = ()) -> float:
    toks = model.tokenize(text)
    with model.context(n_ctx=max(256, len(toks)), n_batch=max(256, len(toks))) as ctx:
        if control is not None:
            d, layers = control
            ctx.set_control(d, min(layers), max(layers))
        if loras:
            ctx.set_loras(list(loras))
        ctx.decode(toks, range(len(toks)), [0] * len(toks), [True] * len(toks))
        logits = ctx.logits_rows(len(toks)).astype(np.float64)[:-1]
    logz = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    nll = logz - logits[np.arange(len(toks) - 1), toks[1:]]
    return float(np.exp(nll.mean()))


@dataclass
class Row:
    name: str
    refusal_harmful: float
    refusal_harmless: float
    kl_harmless: float
    perplexity: float
    tokens_per_second: float
    samples: dict[str, str] = field(default_factory=dict)

    def cells(self) -> str:
        return (f"| {self.name} | {self.refusal_harmful:.0%} | {self.refusal_harmless:.0%} | "
                f"{self.kl_harmless:.3f} | {self.perplexity:.2f} | {self.tokens_per_second:.1f} |")


TABLE_HEAD = ("| intervention | refusal, harmful | refusal, harmless | KL harmless (1st token) | "
              "perplexity, neutral text | tok/s |\n|---|---|---|---|---|---|")


def measure(model: Model, name: str, harmful: Sequence[str], harmless: Sequence[str],
            control: tuple[np.ndarray, Sequence[int]] | None = None, loras: Sequence[tuple[Lora, float]] = (),
            max_tokens: int = 24, plain_harmless: np.ndarray | None = None,
            tick: Callable[[], None] = lambda: None) -> Row:
    """One row of the refusal table: greedy replies to the test prompts under an intervention."""
    h_out, h_speed = generate_replies(model, harmful, max_tokens, control, loras, tick)
    b_out, b_speed = generate_replies(model, harmless, max_tokens, control, loras, tick)
    kl = 0.0
    if plain_harmless is not None:
        scorer = Scorer(model)
        ctl = None
        if control is not None:
            d, layers = control
            ctl = (d, min(layers)) if len(layers) == 1 else None
        prompts = [model.user_prompt(p) for p in harmless]
        if control is not None and ctl is None:
            raise ValueError("the KL measure takes single-layer controls")
        kl = kl_rows(plain_harmless, scorer.last_logits(prompts, control=ctl, lora=loras[0] if loras else None))
    return Row(name, float(np.mean([is_refusal(t) for t in h_out])), float(np.mean([is_refusal(t) for t in b_out])),
               kl, text_perplexity(model, NEUTRAL_TEXT, control, loras), (h_speed + b_speed) / 2,
               {"harmful": h_out[0][:120], "harmless": b_out[0][:120]})


def table(model: Model, sets: RefusalSets, out_dir: str | os.PathLike, split: str = "test",
          max_tokens: int = 24, limit: int | None = None, log: Callable[[str], None] = lambda s: None,
          progress: Progress | None = None) -> list[Row]:
    """The comparison table on `split`, from the files `build` wrote."""
    from ..vector import ControlVector

    out = Path(out_dir)
    for key in ("addition", "ablation", "inlp-project", "inlp-flip", "inlp1-project", "inlp1-flip", "random"):
        if not (out / FILES[key]).is_file():
            raise DatasetError(f"{out / FILES[key]} is missing: run `localsteer refusal direction` first")
    harmful = sets.harmful[split][:limit] if limit else sets.harmful[split]
    harmless = sets.harmless[split][:limit] if limit else sets.harmless[split]
    vec = ControlVector.load(out / FILES["addition"]).fit(model.arch, model.n_layer, model.n_embd)
    layer = vec.layers[0]
    strength = float(vec.meta.get("selected_scale", 1.0))
    from .lora import adapter_directions
    rank = adapter_directions(out / FILES["inlp-project"])[0].shape[0]
    scorer = Scorer(model)
    plain_b = scorer.last_logits([model.user_prompt(p) for p in harmless])
    total = 9 * (len(harmful) + len(harmless))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    rows = []
    specs: list[tuple[str, tuple | None, str | None]] = [
        ("plain", None, None),
        (f"DiM addition (+{strength:g}r at layer {layer})", (vec.directions, [layer]), None),
        (f"DiM subtraction (−{strength:g}r at layer {layer})", (-vec.directions, [layer]), None),
        ("DiM ablation (LoRA adapter)", None, "ablation"),
        (f"INLP projection, rank {rank} (LoRA adapter)", None, "inlp-project"),
        (f"INLP flipping, rank {rank} (LoRA adapter)", None, "inlp-flip"),
        ("INLP projection, rank 1 (LoRA adapter)", None, "inlp1-project"),
        ("INLP flipping, rank 1 (LoRA adapter)", None, "inlp1-flip"),
        ("random-direction ablation (control)", None, "random"),
    ]
    for name, control, adapter in specs:
        lora = Lora(model, out / FILES[adapter]) if adapter else None
        try:
            row = measure(model, name, harmful, harmless, control, [(lora, 1.0)] if lora else [],
                          max_tokens, plain_b, tick)
        finally:
            if lora:
                lora.close()
        log(row.cells())
        rows.append(row)
    return rows


def table_markdown(model: Model, rows: Sequence[Row], split: str, n_harmful: int, n_harmless: int,
                   max_tokens: int) -> str:
    lines = [f"## {model.info.name}", "",
             f"{split} split: {n_harmful} harmful, {n_harmless} harmless requests; greedy replies of {max_tokens} "
             "tokens; refusal = a refusal phrase (localsteer/refusal/direction.py `PHRASES`) in the first "
             f"{REFUSAL_CHARS} characters; KL(plain ‖ intervention) of the first reply token on the harmless "
             "prompts; perplexity of a neutral paragraph.", "", TABLE_HEAD, *[r.cells() for r in rows], "",
             "First reply to the first harmless request (replies to harmful requests are not kept: no "
             "harmful text goes into the repository):", ""]
    for r in rows:
        lines.append(f"- {r.name}: `{r.samples['harmless'][:90]!s}`".replace("\n", " "))
    return "\n".join(lines) + "\n"
