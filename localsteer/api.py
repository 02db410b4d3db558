"""The public API the CLI and the TUI call: load, extract, compose, generate, export, check."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import doctor as _doctor
from . import models as _models
from . import probe as _probe
from .dataset import Pair, same_sides
from .dataset import load_pairs as _load_pairs
from .errors import ContextError, DatasetError, ModelError, VectorError
from .fileio import check_finite_tensors, check_output, write_text
from .extract import ExtractResult
from .extract import extract as _extract
from .importance import importance_order
from .probe import Gate, Probe, Training
from .runtime import Lora, Model
from .sampling import DEFAULT_SEED, Sampling
from .steer import Rejection, Steerer, TokenEvent
from .vector import ControlVector, format_layers, parse_layers

Progress = Callable[[int, int], None]
REPO = Path(__file__).resolve().parent.parent


# --- models -------------------------------------------------------------------------------------

def list_models() -> list[dict]:
    out = []
    for name, spec in _models.KNOWN_MODELS.items():
        path = _models.model_path(name)
        out.append({"name": name, "description": spec.description, "arch": spec.arch,
                    "n_layer": spec.n_layer, "n_embd": spec.n_embd, "path": str(path),
                    "present": path.is_file(), "state": _models.state(name)})
    return out


def pull_model(name: str, progress: Progress | None = None, force: bool = False) -> Path:
    return _models.pull(name, progress=progress, force=force)


def load_model(model: str, gpu_layers: int = 999, verbose: bool = False) -> Model:
    """Load a model by known name or GGUF path."""
    return Model(_models.resolve(model), n_gpu_layers=gpu_layers, verbose=verbose)


# --- vectors ------------------------------------------------------------------------------------

def load_pairs(path: str | os.PathLike) -> list[Pair]:
    return _load_pairs(path)


def load_vector(path: str | os.PathLike) -> ControlVector:
    return ControlVector.load(path)




def extract_vector(model: Model, pairs: Sequence[Pair], method: str = "mean",
                   dataset_name: str = "", progress: Progress | None = None) -> ExtractResult:
    return _extract(model, pairs, method=method, dataset_name=dataset_name,
                    model_sha256=_models.fingerprint(model.path), progress=progress)


def extract_instruction_vector(model: Model, dataset: str | os.PathLike,
                               progress: Progress | None = None):
    """An instruction vector from a `vectors/datasets/instructions/*.jsonl` file (train split),
    its layer chosen on the validation split with the file's checker."""
    from . import verify
    from .instruction import extract_instruction

    items = verify.load_instruction_set(dataset)
    spec = items[0]["check"]

    def pairs(split: str) -> list[Pair]:
        return [Pair(f"{it['prompt']} {it['instruction']}", it["prompt"]) for it in verify.split(items, split)]

    return extract_instruction(model, pairs("train"), pairs("validation"),
                               lambda text: verify.check(spec, text), name=Path(dataset).name,
                               model_sha256=_models.fingerprint(model.path), progress=progress)


def parse_spec(spec: str) -> tuple[str, float | None]:
    """"path.gguf:2.5" -> ("path.gguf", 2.5); a path alone has no scale. A scale that is not a
    finite number is a `VectorError` naming it (unless the whole spec is an existing file)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not path or Path(spec).exists():
        return spec, None
    try:
        value = float(scale)
    except ValueError:
        if not Path(path).exists():
            return spec, None  # no scale was meant: the file is missing, which the loader reports
        raise VectorError(f"bad scale {scale!r} in {spec!r}: use PATH[:SCALE] with a number") from None
    if not math.isfinite(value):
        raise VectorError(f"bad scale {scale!r} in {spec!r}: the scale must be a finite number")
    return path, value


@dataclass(frozen=True)
class Steering:
    """A composed control vector and the layers it is active on (empty: no steering)."""

    vector: ControlVector | None
    layers: tuple[int, ...]
    parts: tuple[tuple[str, float], ...] = ()  # (file, scale) it was made of

    def describe(self) -> str:
        if self.vector is None:
            return "none"
        mix = " + ".join(f"{s:g} x {Path(p).name}" for p, s in self.parts)
        return f"{mix} on layers {format_layers(self.layers)}"


def steering_from_specs(model: Model, specs: Sequence[str], layers: str | None = None) -> Steering:
    """Compose `PATH[:SCALE]` vectors for `model`: each is scaled (default: its suggested scale)
    and limited to its suggested layers; `layers` then sets the active layers of the mix."""
    if not specs:
        if layers is not None:
            parse_layers(layers, model.n_layer)
        return Steering(None, ())
    parts = []
    total = None
    for spec in specs:
        path, scale = parse_spec(spec)
        v = ControlVector.load(path).fit(model.arch, model.n_layer, model.n_embd, path)
        scale = v.suggested_scale if scale is None else scale
        if layers is None and v.suggested_layers:
            v = v.only_layers(v.suggested_layers)
        try:
            v = v * scale
            total = v if total is None else total + v
        except VectorError as e:
            raise VectorError(f"{spec}: {e}") from None
        parts.append((path, scale))
    active = parse_layers(layers, model.n_layer) if layers is not None else total.layers
    return Steering(total.only_layers(active), tuple(active), tuple(parts))


def bake(specs: Sequence[str], scale: float = 1.0, layers: str | None = None) -> ControlVector:
    """One vector from a weighted mix, for any llama.cpp frontend (`export`)."""
    total = None
    for spec in specs:
        path, s = parse_spec(spec)
        v = ControlVector.load(path)
        try:
            v = v * (1.0 if s is None else s)
            total = v if total is None else total + v
        except VectorError as e:
            raise VectorError(f"{spec}: {e}") from None
    total = total * scale
    if layers is not None:
        total = total.only_layers(parse_layers(layers, total.n_layer))
    return total.with_meta(method="export", scale=1.0, layers=format_layers(total.layers))


# --- generation ---------------------------------------------------------------------------------

def sampling_config(temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                    min_p: float = 0.05, seed: int | None = None) -> Sampling:
    """Sampling settings, checked (ValueError naming the setting); `seed` None or -1 is random,
    as in llama.cpp."""
    for name, value, lo, hi in (("temperature", temperature, 0.0, math.inf), ("top-p", top_p, 0.0, 1.0),
                                ("min-p", min_p, 0.0, 1.0)):
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], not {value}")
    if top_k < 0:
        raise ValueError(f"top-k must be 0 (off) or more, not {top_k}")
    if seed is not None and not -1 <= seed <= DEFAULT_SEED:
        raise ValueError(f"seed must be -1 (random) or in [0, {DEFAULT_SEED}], not {seed}")
    return Sampling(temperature, top_k, top_p, min_p, DEFAULT_SEED if seed in (None, -1) else seed)


def rejection_config(topk: int | None, minp: float = 0.0, recovery: str = "reset",
                     draft: int = Rejection.draft, schedule: str = Rejection.schedule,
                     fold: str = "none", loop: str = Rejection.loop) -> Rejection | None:
    if topk is None:
        return None
    if topk < 1:
        raise ValueError(f"rejection top-k must be at least 1, not {topk}")
    if not (math.isfinite(minp) and 0 <= minp <= 1):
        raise ValueError(f"rejection min-p must be a finite number in [0, 1], not {minp}")
    return Rejection(topk=topk, minp=minp, recovery=recovery, draft=draft, schedule=schedule, fold=fold,
                     loop=loop)


def fold_for(specs: Sequence[str]) -> str:
    """The plausibility fold the vectors ask for: "case" when any of them was made as a case
    rewrite (its metadata says `reject_fold: case`), else "none". The fold only forgives a
    difference of letter case, which is what a case vector in a mix asks to be forgiven."""
    folds = {str(load_vector(parse_spec(s)[0]).meta.get("reject_fold", "none")) for s in specs}
    return "case" if "case" in folds else "none"


def extract_rewrite_vector(model: Model, dataset: str | os.PathLike, rewrite: str,
                           progress: Progress | None = None):
    """A rewrite-contrast vector (rewrite.py) from the prompts of an instruction dataset
    (`vectors/datasets/instructions/*.jsonl`): train split for the vector, validation split and
    the file's checker for the strength."""
    from . import verify
    from .rewrite import extract_rewrite

    items = verify.load_instruction_set(dataset)
    spec = items[0]["check"]
    return extract_rewrite(model, [it["prompt"] for it in verify.split(items, "train")],
                           [it["prompt"] for it in verify.split(items, "validation")], rewrite,
                           lambda text: verify.check(spec, text), name=Path(dataset).name,
                           model_sha256=_models.fingerprint(model.path), progress=progress)


def chat_prompt(model: Model, prompt: str | Sequence[dict], raw: bool = False,
                system: str | None = None) -> list[int]:
    """Tokens of a prompt: a user message (or a whole message list) in the model's template."""
    if raw:
        return model.tokenize(prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    return model.tokenize(model.apply_chat_template(messages))


def check_prompt_fits(model: Model, n_prompt: int, n_ctx: int) -> None:
    """A `ContextError` (with both counts) unless a prompt of `n_prompt` tokens leaves room for a
    reply in a context of `n_ctx` tokens, and the context is one the model was trained for."""
    trained = model.info.n_ctx_train
    if trained > 0 and n_ctx > trained:
        raise ContextError(f"a context of {n_ctx} tokens is more than {model.info.name} was trained for "
                           f"({trained} tokens)")
    if n_prompt >= n_ctx:
        more = f" or raise --ctx (up to {trained})" if trained > n_ctx else ""
        raise ContextError(f"the prompt is {n_prompt} tokens but the context holds {n_ctx}: shorten it{more}")


def load_adapters(model: Model, specs: Sequence[str]) -> list[tuple[Lora, float]]:
    """LoRA adapters from "path.gguf[:SCALE]" specs (scale 1 when none is given), e.g. the refusal
    ablation adapter of `localsteer refusal direction`."""
    out = []
    for spec in specs:
        path, scale = parse_spec(spec)
        if Path(path).is_file():
            check_finite_tensors(path, ModelError, "adapter")
        out.append((Lora(model, path), 1.0 if scale is None else scale))  # parse_spec: finite
    return out


def make_steerer(model: Model, steering: Steering, rejection: Rejection | None = None,
                 n_threads: int | None = None, n_ctx: int = 4096,
                 adapters: Sequence[tuple[Lora, float]] = ()) -> Steerer:
    importance = None
    if rejection is not None and steering.vector is not None:
        importance = importance_order(model, steering.vector, steering.layers,
                                      _models.quick_fingerprint(model.path))
    return Steerer(model, steering.vector, steering.layers or None, rejection, importance,
                   n_ctx=n_ctx, n_threads=n_threads, adapters=adapters)


@dataclass
class RunResult:
    text: str
    tokens: list[int]
    events: list[TokenEvent]
    seconds: float
    n_prompt: int
    model: str
    steering: str
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        n = len(self.events)
        return sum(e.status in ("steered", "unsteered") for e in self.events) / n if n else 1.0

    def as_dict(self, events: bool = False) -> dict:
        d = {"text": self.text, "tokens": self.tokens, "n_prompt_tokens": self.n_prompt,
             "n_tokens": len(self.tokens), "seconds": round(self.seconds, 4),
             "tokens_per_second": round(self.tokens_per_second, 2), "model": self.model,
             "steering": self.steering, "acceptance": round(self.acceptance, 4), **self.extra}
        if events:
            d["events"] = [e.as_dict() for e in self.events]
        return d

    def summary(self) -> str:
        s = (f"[{len(self.tokens)} tokens, {self.tokens_per_second:.1f} tok/s, "
             f"steering: {self.steering}")
        if self.extra.get("rejection"):
            s += f", full-steering acceptance {self.acceptance:.0%}"
        if self.extra.get("context_full"):
            s += ", stopped: the context is full (--ctx)"
        gate = self.extra.get("gate")
        if gate:
            s += (f", probe p={gate['probability']:.2f} {'>=' if gate['steer'] else '<'} "
                  f"{gate['threshold']:.2f}: {'steered' if gate['steer'] else 'not steered'}")
        return s + "]"


def generate(model: Model, prompt: str | Sequence[dict], steering: Steering,
             sampling: Sampling = Sampling(), max_tokens: int = 128,
             rejection: Rejection | None = None, raw: bool = False, system: str | None = None,
             n_threads: int | None = None, stream: Callable[[str], None] | None = None,
             steerer: Steerer | None = None, adapters: Sequence[tuple[Lora, float]] = (),
             gate: Gate | None = None, n_ctx: int = 4096) -> RunResult:
    """Generate a reply; `stream` receives text pieces as they come. With a `gate`, the steering
    (vectors and adapters) applies only if the gate's probe fires on the prompt; otherwise the
    reply is the plain model's. The prompt and the reply share a context of `n_ctx` tokens (a
    given `steerer`'s own size); a prompt that does not fit is a `ContextError` before any
    decode, and the reply stops when the context is full (`extra["context_full"]`)."""
    import time

    tokens = chat_prompt(model, prompt, raw=raw, system=system)
    n_ctx = steerer.n_ctx if steerer is not None else n_ctx
    check_prompt_fits(model, len(tokens), n_ctx)
    steers = steering.vector is not None or bool(adapters) or bool(steerer and steerer.adapters)
    decision = gate.decide(tokens) if gate is not None and steers else None
    gated_off = decision is not None and not decision.steer
    if gated_off:  # not a target prompt: plain decoding
        steering, rejection, adapters = Steering(None, ()), None, ()
    restore = None
    if gated_off and steerer is not None:
        restore = (steerer.vector, steerer.layers, steerer.rejection, steerer.importance)
        kept_adapters = steerer.adapters
        steerer.configure(None)
        steerer.set_adapters([])
    own = steerer is None
    st = steerer or make_steerer(model, steering, rejection, n_threads=n_threads, n_ctx=n_ctx, adapters=adapters)
    sampling = sampling.resolved()
    events: list[TokenEvent] = []
    t0 = time.perf_counter()
    try:
        for ev in st.generate(tokens, max_tokens, sampling):
            events.append(ev)
            if stream and not model.is_eog(ev.token):
                stream(ev.text)
    finally:
        if own:
            st.close()
        elif restore is not None:
            st.configure(*restore)
            st.set_adapters(kept_adapters)
    dt = time.perf_counter() - t0
    out = [e.token for e in events]
    text = model.detokenize([t for t in out if not model.is_eog(t)])
    extra = {"layers": format_layers(steering.layers), "seed": sampling.seed,
             "rejection": None if rejection is None else
             {"topk": rejection.topk, "minp": rejection.minp, "recovery": rejection.recovery}}
    if decision is not None:
        extra["gate"] = decision.as_dict()
    if len(out) < max_tokens and not (out and model.is_eog(out[-1])) and len(tokens) + len(out) >= n_ctx:
        extra["context_full"] = True
    return RunResult(text, out, events, dt, len(tokens), model.info.name, steering.describe(),
                     extra=extra)


# --- side effects -------------------------------------------------------------------------------

BENIGN = REPO / "vectors" / "datasets" / "benign.jsonl"


def benign_kl(model: Model, steering: Steering, adapters: Sequence[tuple[Lora, float]] = (),
              prompts: str | os.PathLike = BENIGN, split: str = "test", n_tokens: int = 16,
              progress: Progress | None = None) -> tuple[float, int]:
    """KL(plain ‖ steered) on the benign prompt set (measure.BenignKL), and how many prompts."""
    from .dataset import load_split_prompts
    from .measure import BenignKL

    texts = load_split_prompts(prompts)
    chosen = [p for s in texts for p in texts[s]] if split == "all" else texts.get(split, [])
    if not chosen:
        raise DatasetError(f"{prompts} has no prompts in the {split} split")
    bk = BenignKL(model, [chat_prompt(model, p) for p in chosen], n_tokens, progress=progress)
    v = steering.vector
    return bk.measure(None if v is None else v.directions, steering.layers, adapters), len(chosen)


# --- probes -------------------------------------------------------------------------------------

def train_probe(model: Model, positive: str | os.PathLike, negative: str | os.PathLike,
                progress: Progress | None = None) -> Training:
    """A probe for prompts like those in `positive` vs `negative` (JSONL files with `prompt` and
    `split`), read at the last token of the chat-templated prompt."""
    from .dataset import load_split_prompts
    return train_probe_sets(model, load_split_prompts(positive), load_split_prompts(negative),
                            name=f"{Path(positive).stem} vs {Path(negative).stem}", progress=progress)


def train_probe_sets(model: Model, positive: dict, negative: dict, name: str = "",
                     progress: Progress | None = None) -> Training:
    from .refusal import post_instruction_count
    return _probe.train(model, positive, negative, lambda p: chat_prompt(model, p),
                        positions=post_instruction_count(model), name=name, progress=progress)


def load_gate(model: Model, path: str | os.PathLike) -> Gate:
    """A gate for `--when PROBE`: steering only where the probe fires."""
    return Gate(model, Probe.load(path), str(path))


# --- evaluation ---------------------------------------------------------------------------------

def evaluate(models: Sequence[tuple[str, Model]], types: Sequence[str], out_dir: str | os.PathLike,
             limit: int | None = None, max_tokens: int = 48, topk: int = 20,
             compose: Sequence[tuple[str, str]] = (), log: Callable[[str], None] = print,
             datasets: str | os.PathLike = REPO / "vectors" / "datasets",
             vectors: str | os.PathLike = REPO / "vectors", oversteer: float | None = None,
             conditions: Sequence[str] | None = None, minp: float = 0.0, fold: str = "auto"):
    """The `localsteer eval` grid (see localsteer/evaluate.py)."""
    from .evaluate import CONDITIONS, OVERSTEER, run_grid
    return run_grid(models, types, Path(out_dir), Path(datasets), Path(vectors), limit=limit,
                    max_tokens=max_tokens, topk=topk, compose=compose, log=log,
                    oversteer=OVERSTEER if oversteer is None else oversteer,
                    conditions=tuple(conditions or CONDITIONS), minp=minp, fold=fold)


# --- environment --------------------------------------------------------------------------------

def doctor(model: str = _models.DEFAULT_MODEL) -> _doctor.Report:
    return _doctor.check(model)


__all__ = [
    "ControlVector", "Model", "Pair", "Rejection", "Sampling", "Steerer", "Steering", "VectorError",
    "bake", "chat_prompt", "check_output", "doctor", "extract_vector", "generate", "list_models",
    "load_model", "load_pairs", "load_vector", "make_steerer", "parse_spec", "pull_model",
    "rejection_config", "same_sides", "sampling_config", "steering_from_specs", "write_text",
]
