"""The public API the CLI and the TUI call: load, extract, compose, generate, export, check."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import doctor as _doctor
from . import models as _models
from . import probe as _probe
from . import reply as _reply
from . import shipped
from .dataset import Pair, same_sides
from .dataset import load_pairs as _load_pairs
from .errors import (ContextError, DatasetError, LayerRangeError, LocalsteerError, ModelError, OutputError,
                     OutputExistsError, ProbeError, PullError, VectorError)
from .eval.grid import CONDITIONS as EVAL_CONDITIONS
from .directer import Directer, InstructionError, InstructionSteerer, find_span
from .extract import ExtractResult, suggested_layers
from .extract import extract as _extract
from .fileio import check_finite_tensors, check_output, write_text
from .importance import importance_order
from .models import DEFAULT_MODEL, KNOWN_MODELS, home, quick_fingerprint
from .probe import Decision, Gate, Probe, Scores, Training
from .reply import Reply, acceptance
from .reply import run as run_reply
from .runtime import Lora, Model, backend_devices
from .sampling import DEFAULT_SEED, Sampling
from .steer import Rejection, Status, Steerer, TokenEvent
from .vector import ControlVector, format_layers, parse_layers

Progress = Callable[[int, int], None]


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
    from .eval import verify
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


def vector_spec(spec: str, model: Model | None = None) -> tuple[Path, float | None]:
    """`PATH[:SCALE]` or `NAME[:SCALE]` -> (the vector file, the scale or None). A NAME (no
    folder, no .gguf) is a shipped vector for `model` (`vectors/<model>/NAME.gguf`, for the known
    models) or one of the user's (`$LOCALSTEER_HOME/vectors/NAME.gguf`)."""
    text, scale = parse_spec(spec)
    return vector_file(text, model), scale


def vector_file(name: str, model: Model | None = None) -> Path:
    """The file a vector name or path stands for (see `vector_spec`)."""
    path = Path(name).expanduser()
    if path.exists() or "/" in name or os.sep in name or name.endswith(".gguf") or model is None:
        return path
    places = [_models.home() / "vectors"]
    known = _models.cached_name(model.path)
    if known is not None:
        places.insert(0, shipped.model_dir(known))
    for place in places:
        if (place / f"{name}.gguf").is_file():
            return place / f"{name}.gguf"
    names = sorted({p.stem for place in places if place.is_dir() for p in place.glob("*.gguf")})
    raise VectorError(f"vector {name!r} not found: no such file, and no shipped or user vector of that name for "
                      f"{known or model.info.name} ({', '.join(names) or 'there are none'})")


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
        path, scale = vector_spec(spec, model)
        v = ControlVector.load(path).fit(model.arch, model.n_layer, model.n_embd, str(path))
        scale = v.suggested_scale if scale is None else scale
        if layers is None and v.suggested_layers:
            v = v.only_layers(v.suggested_layers)
        try:
            v = v * scale
            total = v if total is None else total + v
        except VectorError as e:
            raise VectorError(f"{spec}: {e}") from None
        parts.append((str(path), scale))
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


def fold_for(specs: Sequence[str], model: Model | None = None) -> str:
    """The plausibility fold the vectors ask for: "case" when any of them was made as a case
    rewrite (its metadata says `reject_fold: case`), else "none". The fold only forgives a
    difference of letter case, which is what a case vector in a mix asks to be forgiven."""
    folds = {str(load_vector(vector_spec(s, model)[0]).meta.get("reject_fold", "none")) for s in specs}
    return "case" if "case" in folds else "none"


def extract_rewrite_vector(model: Model, dataset: str | os.PathLike, rewrite: str,
                           progress: Progress | None = None):
    """A rewrite-contrast vector (rewrite.py) from the prompts of an instruction dataset
    (`vectors/datasets/instructions/*.jsonl`): train split for the vector, validation split and
    the file's checker for the strength."""
    from .eval import verify
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
class RunResult(Reply):
    """A reply (`reply.Reply`: text, tokens, events, speed, acceptance) with what made it."""

    model: str = ""
    steering: str = ""
    seed: int | None = None

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
        if self.extra.get("directer"):
            n = max(1, len(self.events))
            s += ", tokens " + " ".join(f"{k} {v / n:.0%}" for k, v in self.extra["directer"]["tokens"].items())
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

    def on_token(ev: TokenEvent, end: bool, seconds: float) -> None:
        if stream and not end:
            stream(ev.text)

    try:
        reply = _reply.run(st, tokens, max_tokens, sampling, on_token=on_token)
    finally:
        if own:
            st.close()
        elif restore is not None:
            st.configure(*restore)
            st.set_adapters(kept_adapters)
    extra = {"layers": format_layers(steering.layers), "seed": sampling.seed,
             "rejection": None if rejection is None else
             {"topk": rejection.topk, "minp": rejection.minp, "recovery": rejection.recovery}}
    if decision is not None:
        extra["gate"] = decision.as_dict()
    if reply.context_full:
        extra["context_full"] = True
    return RunResult(reply.text, reply.tokens, reply.events, reply.seconds, reply.n_prompt, reply.stopped,
                     reply.context_full, extra, model=model.info.name, steering=steering.describe())


def generate_directer(model: Model, prompt: str, instruction: str | None = None, mark: str | None = None,
                      settings: Directer = Directer(), sampling: Sampling = Sampling(), max_tokens: int = 128,
                      raw: bool = False, system: str | None = None, n_threads: int | None = None,
                      stream: Callable[[str], None] | None = None, n_ctx: int = 4096,
                      steering: Steering | None = None, loop: str = "auto") -> RunResult:
    """A reply steered by DIRECTER (localsteer/directer.py): `instruction` is appended to the
    prompt and amplified there, or `mark` names a span of the prompt to amplify (one of them).
    With `steering` (control vectors), the steered pass adds them too, and each steered token
    takes DIRECTER's test against the plain model (`directer.InstructionSteerer`)."""
    if (instruction is None) == (mark is None):
        raise InstructionError("give the instruction to append, or the span of the prompt to mark (one of them)")
    text = f"{prompt} {instruction.strip()}" if instruction is not None else prompt
    span_text = instruction if instruction is not None else mark
    messages = [{"role": "user", "content": text}]
    if system:
        messages = [{"role": "system", "content": system}] + messages
    full = text if raw else model.apply_chat_template(messages)
    tokens = model.tokenize(full)
    check_prompt_fits(model, len(tokens), n_ctx)
    span = find_span(model, tokens, full, span_text)
    sampling = sampling.resolved()
    vector = steering.vector if steering is not None else None
    steerer = InstructionSteerer(model, span, settings, n_ctx=n_ctx, n_threads=n_threads,
                                 vector=None if vector is None else vector.directions,
                                 vector_layers=steering.layers if vector is not None else (), loop=loop)

    def on_token(ev: TokenEvent, end: bool, seconds: float) -> None:
        if stream and not end:
            stream(ev.text)

    try:
        reply = _reply.run(steerer, tokens, max_tokens, sampling, on_token=on_token)
    finally:
        steerer.close()
    counts = {s.value: sum(e.status == s for e in reply.events) for s in (Status.SKIPPED, Status.STEERED,
                                                                           Status.WEAKENED, Status.PLAIN)}
    extra = {"seed": sampling.seed, "directer": {"alpha": settings.alpha, "p": settings.p, "trials": settings.trials,
                                                 "span": list(span), "tokens": counts}}
    if reply.context_full:
        extra["context_full"] = True
    described = f"DIRECTER x{settings.alpha:g} on {span_text.strip()!r} (prompt tokens {span[0]}-{span[1] - 1})"
    if vector is not None:
        described += f" + {steering.describe()}"
        extra["vectors"] = [{"file": f, "scale": sc} for f, sc in steering.parts]
    return RunResult(reply.text, reply.tokens, reply.events, reply.seconds, reply.n_prompt, reply.stopped,
                     reply.context_full, extra, model=model.info.name, steering=described)


def instruction_span(model: Model, prompt: Sequence[int], instruction: str) -> tuple[int, int]:
    """The tokens [start, end) of the `prompt` tokens that spell `instruction` (its last
    occurrence): what DIRECTER amplifies. An `InstructionError` if it is not there."""
    text = b"".join(model.piece(t, special=True) for t in prompt).decode("utf-8", "replace")
    return find_span(model, prompt, text, instruction)


# --- serving ------------------------------------------------------------------------------------

def serve(model: Model, model_name: str, host: str = "127.0.0.1", port: int = 8080, slots: int = 2,
          queue: int = 16, n_ctx: int = 4096, api_key: str | None = None, vectors: Sequence[str] = (),
          layers: str | None = None, reject_topk: int | None = None, n_threads: int | None = None,
          loras: Sequence[str] = (), when: str | None = None, batch: str = "auto",
          log: Callable[[str], None] = print, verbose: bool = False) -> None:
    """`localsteer serve` (localsteer/server.py): an OpenAI-compatible server on `host:port`
    until interrupted; `vectors`, `layers`, `reject_topk`: the steering of requests that send
    none; `loras` (`PATH[:SCALE]`): the adapters requests may name (by file stem), on by
    default; `when`: a probe file, the gate requests use by default; `batch` ("auto", "on",
    "off"): decode the requests steered by vectors alone in one batch (`server.Engine`). Needs
    the serve extra (starlette, uvicorn)."""
    try:
        import uvicorn

        from . import server
    except ImportError as e:
        raise LocalsteerError(f"serve needs the serve extra ({e.name} is missing): "
                              "bash scripts/install.sh --serve, or pip install 'localsteer[serve]'") from None
    steering_from_specs(model, list(vectors), layers)  # bad defaults: one line, before binding
    index = server.vector_index(model, model_name, vectors)
    adapters = {Path(lora.path).stem: (lora, scale) for lora, scale in load_adapters(model, loras)}
    gate = load_gate(model, when) if when else None
    defaults = server.Defaults(tuple(vectors), layers, reject_topk, adapters, gate)
    engine = server.Engine(model, slots=slots, queue=queue, n_ctx=n_ctx, n_threads=n_threads,
                           batch={"on": True, "off": False}.get(batch, "auto"))
    try:
        app = server.make_app(server.Service(model, model_name, engine, index, defaults, api_key))
        log(f"localsteer serve: {model_name}, {slots} slot(s) of {n_ctx} tokens "
            f"({engine.mode}), {len(index)} vectors; "
            f"http://{host}:{port}/v1 (ctrl-c stops)")
        uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning")
    finally:
        engine.close()


# --- side effects -------------------------------------------------------------------------------

BENIGN = shipped.datasets() / "benign.jsonl"


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

IFEVAL_CONDITIONS = ("plain", "directer", "vector+rej")


def evaluate_ifeval(models: Sequence[tuple[str, Model]], out_dir: str | os.PathLike,
                    conditions: Sequence[str] = IFEVAL_CONDITIONS, sample: int = 200, limit: int | None = None,
                    max_tokens: int = 1024, settings: Directer = Directer(), log: Callable[[str], None] = print,
                    command: str | None = None) -> dict:
    """`localsteer eval --benchmark ifeval` (localsteer/eval/ifeval_run.py): resumable; returns
    results.json's content (`command`, if given, is recorded in it as what made the results)."""
    from .eval import ifeval_run
    return ifeval_run.run(models, Path(out_dir), conditions, sample=sample, limit=limit, max_tokens=max_tokens,
                          settings=settings, log=log, command=command)


def check_eval_settings(out_dir: str | os.PathLike, settings: dict) -> None:
    """A ValueError if `out_dir` holds results made with other settings (a rerun resumes them)."""
    import json
    from .eval.grid import check_settings
    path = Path(out_dir) / "results.json"
    try:
        old = json.loads(path.read_text()).get("settings", {}) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    check_settings(old, settings, Path(out_dir))
    for name in ("results.json", "results.md", "results.png"):
        check_output(Path(out_dir) / name, force=True)  # resumed, but they must be writable files


def evaluate(models: Sequence[tuple[str, Model]], types: Sequence[str], out_dir: str | os.PathLike,
             limit: int | None = None, max_tokens: int = 48, topk: int = 20,
             compose: Sequence[tuple[str, str]] = (), log: Callable[[str], None] = print,
             datasets: str | os.PathLike = shipped.datasets(),
             vectors: str | os.PathLike = shipped.root(), oversteer: float | None = None,
             conditions: Sequence[str] | None = None, minp: float = 0.0, fold: str = "auto"):
    """The `localsteer eval` grid (see localsteer/eval/grid.py)."""
    from .eval.grid import CONDITIONS, OVERSTEER, run_grid
    return run_grid(models, types, Path(out_dir), Path(datasets), Path(vectors), limit=limit,
                    max_tokens=max_tokens, topk=topk, compose=compose, log=log,
                    oversteer=OVERSTEER if oversteer is None else oversteer,
                    conditions=tuple(conditions or CONDITIONS), minp=minp, fold=fold)


# --- refusal --------------------------------------------------------------------------------------

def refusal_direction(model: Model, dataset_dir: str | os.PathLike, out: str | os.PathLike, inlp_rounds: int = 8,
                      kl_max: float = 0.1, force: bool = False, log: Callable[[str], None] = print,
                      progress: Progress | None = None) -> dict[str, Path]:
    """Select the refusal direction and write the interventions into `out` (refusal.build);
    returns {kind: file}. Every output is checked before the work (`check_output`)."""
    from . import refusal as rf
    rf.check_applies(model)
    sets = rf.load_sets(dataset_dir)
    out = Path(out)
    for f in rf.FILES.values():
        check_output(out / f, force)
    rf.build(model, sets, out, model_sha256=_models.fingerprint(model.path), force=force,
             inlp_rounds=inlp_rounds, kl_max=kl_max, log=log, progress=progress)
    return {kind: out / f for kind, f in rf.FILES.items()}


def refusal_table(model: Model, dataset_dir: str | os.PathLike, directory: str | os.PathLike, split: str = "test",
                  limit: int | None = None, max_tokens: int = 24, log: Callable[[str], None] = print,
                  progress: Progress | None = None) -> str:
    """Refusal rates, harmless KL, perplexity and speed of every intervention in `directory` (what
    `refusal_direction` wrote), as Markdown; `log` receives the table's rows as they come."""
    from . import refusal as rf
    from .refusal import table as rt
    sets = rf.load_sets(dataset_dir)
    directory = Path(directory)
    missing = [f for k, f in rf.FILES.items() if k != "selection" and not (directory / f).is_file()]
    if missing:
        raise ModelError(f"{directory} lacks {', '.join(missing)}: run `localsteer refusal direction` first")
    log(rt.TABLE_HEAD)
    rows = rt.table(model, sets, directory, split=split, max_tokens=max_tokens, limit=limit, log=log,
                    progress=progress)
    n_h = len(sets.harmful[split][:limit] if limit else sets.harmful[split])
    n_b = len(sets.harmless[split][:limit] if limit else sets.harmless[split])
    return rt.table_markdown(model, rows, split, n_h, n_b, max_tokens)


def score_probe(model: Model, probe: str | os.PathLike, positive: str | os.PathLike, negative: str | os.PathLike,
               split: str = "test", progress: Progress | None = None) -> tuple[Gate, Scores]:
    """How a probe's decisions match labelled prompts (JSONL: prompt, split; split "all": every one)."""
    from .dataset import load_split_prompts
    gate = load_gate(model, probe)
    pos, neg = load_split_prompts(positive), load_split_prompts(negative)

    def pick(d: dict) -> list[str]:
        return [p for s in d for p in d[s]] if split == "all" else d[split]

    if not pick(pos) or not pick(neg):
        raise DatasetError(f"need positive and negative prompts in the {split} split")
    prompts = pick(pos) + pick(neg)
    probs = gate.probe.prompt_probability(model, [chat_prompt(model, p) for p in prompts], progress=progress)
    labels = [True] * len(pick(pos)) + [False] * len(pick(neg))
    return gate, Scores.of(probs >= gate.probe.threshold, labels)


# --- KL-then-steer --------------------------------------------------------------------------------

def train_kts(model: str, vector: str, out: str | os.PathLike, prompt_files: Sequence[str | os.PathLike] = (),
              rank: int = 4, steps: int = 60, batch: int = 4, lr: float = 1e-3, force: bool = False,
              log: Callable[[str], None] = print):
    """A KL-then-steer LoRA for `vector` (`VECTOR[:SCALE]`) on `model` (kts.train; needs the
    training extra). Prompts: the train split of `prompt_files` (default: the benign set and the
    harmless refusal requests)."""
    from . import kts
    from .dataset import load_split_prompts
    check_output(out, force)
    kts._torch()  # the training extra, before anything is loaded
    files = list(prompt_files) or [BENIGN, shipped.datasets() / "refusal" / "harmless.jsonl"]
    prompts = [p for f in files for p in load_split_prompts(f)["train"]]
    if not prompts:
        raise DatasetError("no prompts in the train split of the prompt files")
    lm = load_model(model)
    path, scale = vector_spec(vector, lm)
    v = ControlVector.load(path).fit(lm.arch, lm.n_layer, lm.n_embd, str(path))
    scale = v.suggested_scale if scale is None else scale
    if v.suggested_layers:
        v = v.only_layers(v.suggested_layers)
    config = kts.KtsConfig(rank=rank, steps=steps, batch=batch, lr=lr)
    log(f"plain replies to {len(prompts)} benign prompts…")
    texts, reference = kts.benign_sequences(lm, prompts, config.reply_tokens)
    arch, model_path, name = lm.arch, lm.path, lm.info.name
    lm.close()  # transformers loads its own copy
    return kts.train(model_path, arch, v * scale, texts, out, config, force=force, log=log,
                     meta={"vector": path.name, "vector_scale": scale, "model": name}, reference=reference)


# --- environment --------------------------------------------------------------------------------

def doctor(model: str = _models.DEFAULT_MODEL) -> _doctor.Report:
    return _doctor.check(model)


__all__ = [
    # values and records
    "ControlVector", "Decision", "ExtractResult", "Gate", "Lora", "Model", "Pair", "Probe", "Rejection", "RunResult",
    "Sampling", "Scores", "Steerer", "Steering", "TokenEvent", "Training",
    # errors (each a LocalsteerError: a one-line message for the user)
    "ContextError", "DatasetError", "LayerRangeError", "LocalsteerError", "ModelError", "OutputError",
    "OutputExistsError", "ProbeError", "PullError", "VectorError",
    # models
    "DEFAULT_MODEL", "KNOWN_MODELS", "backend_devices", "doctor", "home", "list_models", "load_model", "pull_model",
    "quick_fingerprint",
    # vectors
    "bake", "extract_instruction_vector", "extract_rewrite_vector", "extract_vector", "format_layers", "load_pairs",
    "load_vector", "parse_layers", "parse_spec", "same_sides", "shipped", "steering_from_specs", "suggested_layers",
    "vector_file", "vector_spec",
    # generation
    "Directer", "InstructionError", "InstructionSteerer", "generate_directer", "instruction_span",
    "Reply", "Status", "acceptance", "chat_prompt", "check_prompt_fits", "fold_for", "generate", "importance_order",
    "load_adapters", "make_steerer", "rejection_config", "run_reply", "sampling_config",
    # side effects, probes, refusal, KTS, evaluation
    "BENIGN", "EVAL_CONDITIONS", "IFEVAL_CONDITIONS", "benign_kl", "check_eval_settings", "evaluate",
    "evaluate_ifeval", "load_gate", "refusal_direction", "serve",
    "refusal_table", "score_probe", "train_kts", "train_probe", "train_probe_sets",
    # files
    "check_output", "write_text",
]
