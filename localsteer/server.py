"""`localsteer serve`: an OpenAI-compatible HTTP server in which each request chooses its own
steering.

Why Starlette and uvicorn: the smallest maintained ASGI stack that does what the API needs (JSON
routes, server-sent events, disconnect detection); FastAPI would add pydantic models whose error
shapes are not OpenAI's, so requests are validated here and every error is an OpenAI error object
naming the field.

How requests run. One engine thread owns every llama.cpp call. It has `slots` slots, each with
its own context (`steer.Steerer`, and an `InstructionSteerer` made when a request asks for
DIRECTER); a request takes a free slot, or waits in a bounded queue, beyond which it gets 503
with Retry-After. The engine advances the slots in turn, one token each, so requests with
different steering make progress together; a request whose client went away (or that reached a
stop string) is dropped at its next token and its slot freed. The ASGI side never touches the
model: it hands the engine a `Job` and reads its events from an asyncio queue.

The steering of a request is the extra body field `steering` (clients that do not know it send
nothing and get the server's defaults):

    {"vectors": [{"name": "happy-sad", "scale": 4}] | ["happy-sad:4"],
     "layers": "7-24",
     "reject": {"topk": 20, "minp": 0.0, "fold": "auto"} | null,
     "instruction": {"text": "Answer in French.", "alpha": 100, "p": 0.5, "trials": 10},
     "loras": ["refusal-ablate"] | [{"name": "refusal-ablate", "scale": 0.5}],
     "gate": true,
     "events": false}

Vectors are named, never given as paths: the names `/v1/steering/vectors` lists (the shipped
vectors for the model, `$LOCALSTEER_HOME/vectors`, and those given with `serve -v`); LoRA
adapters likewise, from those the server was started with (`serve --lora`). `gate` (default: on
when the server has a probe, `serve --when`) applies the vectors and adapters only if the probe
fires on the prompt. A DIRECTER instruction must occur in the messages (its last occurrence is
amplified). `null` vectors mean no steering; an absent field, the server's defaults.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import codecs

from . import api, calibrate
from .api import LocalsteerError, Model
from .runtime import RowsSteer

MAX_BODY = 1 << 20  # bytes of a request body (413 beyond)


class RequestError(Exception):
    """A bad request: an OpenAI error object with the field (`param`) it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


# --- what the server can apply ------------------------------------------------------------------

@dataclass(frozen=True)
class VectorInfo:
    name: str
    path: Path
    origin: str  # "shipped", "user" or "command line"
    scale: float
    layers: tuple[int, ...]
    fits: bool
    problem: str
    benign_kl: float | None
    measured: str

    def as_dict(self) -> dict:
        return {"id": self.name, "object": "steering.vector", "origin": self.origin, "suggested_scale": self.scale,
                "layers": api.format_layers(self.layers) if self.layers else None, "fits_model": self.fits,
                "problem": self.problem or None, "benign_kl": self.benign_kl, "measured": self.measured or None}


def vector_index(model: Model, model_name: str, given: Sequence[str] = (),
                 user_dir: Path | None = None) -> dict[str, VectorInfo]:
    """Every vector a request may name, by name: those given at start (their file's stem), then
    the shipped ones for the model, then the user's; a name seen first wins."""
    found: dict[str, VectorInfo] = {}

    def add(path: Path, origin: str) -> None:
        if path.stem in found:
            return
        try:
            v = api.load_vector(path)
        except LocalsteerError:
            return
        problem = ""
        try:
            v.fit(model.arch, model.n_layer, model.n_embd, path.name)
        except LocalsteerError as e:
            problem = str(e)
        kl = v.meta.get("benign_kl")
        found[path.stem] = VectorInfo(path.stem, path, origin, float(v.suggested_scale),
                                      tuple(v.suggested_layers or v.layers), not problem, problem,
                                      None if kl is None else float(kl), str(v.meta.get("measured", "")))

    for spec in given:
        path, _ = api.vector_spec(spec, model)
        add(Path(path), "command line")
    shipped = api.shipped.root() / model_name
    for path in sorted(shipped.glob("*.gguf")) if shipped.is_dir() else ():
        add(path, "shipped")
    user = user_dir if user_dir is not None else api.home() / "vectors"
    for path in sorted(user.glob("*.gguf")) if user.is_dir() else ():
        add(path, "user")
    return found


# --- a request, parsed ----------------------------------------------------------------------------

@dataclass
class Plan:
    """What a request asks the engine for."""

    prompt: list[int]
    max_tokens: int
    sampling: api.Sampling
    steering: api.Steering
    rejection: api.Rejection | None
    directer: api.Directer | None = None
    span: tuple[int, int] | None = None
    stop: tuple[str, ...] = ()
    events: bool = False
    described: str = "none"
    loras: tuple = ()  # (Lora, scale), from the server's list
    gate: Any = None  # the server's probe gate, when this request uses it


@dataclass
class Defaults:
    """The server's steering for requests that do not send the `steering` field."""

    vectors: tuple[str, ...] = ()
    layers: str | None = None
    reject_topk: int | None = None
    loras: dict = field(default_factory=dict)  # name -> (Lora, scale): what requests may name; on by default
    gate: Any = None  # the probe gate (`serve --when`); on by default


def _number(body: dict, key: str, lo: float, hi: float, default, integer: bool = False, param: str | None = None):
    value = body.get(key, default)
    name = param or key
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RequestError(f"{name} must be between {lo:g} and {hi:g}, not {value}", name)
    return int(value) if integer else float(value)


def _named(raw: Any, field: str) -> list[tuple[str, str, float | None]]:
    """The items of a list field of names with optional scales (`"name"`, `"name:scale"` or
    `{"name": ..., "scale": ...}`): (where, name, scale or None)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RequestError(f"{field} must be a list", field)
    out = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            name, sep, scale_text = item.partition(":")
            try:
                scale = float(scale_text) if sep else None
            except ValueError:
                raise RequestError(f"{where}: bad scale {scale_text!r}", where) from None
        elif isinstance(item, dict):
            name = item.get("name")
            if not isinstance(name, str):
                raise RequestError(f"{where}.name must be a string", f"{where}.name")
            scale = _number(item, "scale", -1e6, 1e6, None, param=f"{where}.scale")
        else:
            raise RequestError(f"{where} must be a name or an object with name and scale", where)
        if scale is not None and not math.isfinite(scale):
            raise RequestError(f"{where}: the scale must be finite", f"{where}.scale")
        out.append((where, name, scale))
    return out


def _vector_specs(raw: Any, index: dict[str, VectorInfo]) -> list[str]:
    specs = []
    for where, name, scale in _named(raw, "steering.vectors"):
        info = index.get(name)
        if info is None:
            raise RequestError(f"{where}: unknown vector {name!r} (GET /v1/steering/vectors lists them)", f"{where}.name")
        if not info.fits:
            raise RequestError(f"{where}: {info.problem}", f"{where}.name")
        specs.append(f"{info.path}:{info.scale if scale is None else scale!r}")
    return specs


def plan(model: Model, body: dict, prompt: list[int], index: dict[str, VectorInfo],
         defaults: Defaults, n_ctx: int) -> Plan:
    """The engine's plan for a request body (after its prompt is made); a `RequestError` naming
    the field for anything wrong."""
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1 (one choice per request)", "n")
    if len(prompt) >= n_ctx - 1:
        raise RequestError(f"the prompt is {len(prompt)} tokens, the context {n_ctx}: no room for a reply",
                           "messages", kind="context_length_exceeded")
    room = n_ctx - len(prompt)
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, None, integer=True)
    max_tokens = min(max_tokens or room, room)
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1, None, integer=True)
    sampling = api.sampling_config(temperature, top_k=0, top_p=top_p, min_p=0.0,
                                   seed=-1 if seed is None else seed % (1 << 32))
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop or ()
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a string or a list of at most 4 non-empty strings", "stop")

    raw = body.get("steering")
    loras = tuple(defaults.loras.values())
    use_gate = defaults.gate is not None
    if raw is None and "steering" not in body:
        specs, layers, topk, minp, fold = list(defaults.vectors), defaults.layers, defaults.reject_topk, 0.0, "auto"
        instruction, events = None, False
    else:
        raw = raw if raw is not None else {"vectors": None}
        if not isinstance(raw, dict):
            raise RequestError("steering must be an object", "steering")
        unknown = set(raw) - {"vectors", "layers", "reject", "instruction", "events", "loras", "gate"}
        if unknown:
            raise RequestError(f"steering: unknown field(s) {', '.join(sorted(unknown))}", f"steering.{sorted(unknown)[0]}")
        specs = _vector_specs(raw.get("vectors"), index)
        layers = raw.get("layers")
        if layers is not None and not isinstance(layers, str):
            raise RequestError("steering.layers must be a string such as \"7-24\"", "steering.layers")
        reject = raw.get("reject")
        topk, minp, fold = None, 0.0, "auto"
        if reject is not None:
            if not isinstance(reject, dict):
                raise RequestError("steering.reject must be an object (topk, minp, fold) or null", "steering.reject")
            topk = _number(reject, "topk", 1, 1 << 20, 20, integer=True, param="steering.reject.topk")
            minp = _number(reject, "minp", 0, 1, 0.0, param="steering.reject.minp")
            fold = reject.get("fold", "auto")
            if fold not in ("auto", "none", "case", "recase"):
                raise RequestError("steering.reject.fold must be auto, none, case or recase", "steering.reject.fold")
        instruction = raw.get("instruction")
        events = raw.get("events", False)
        if not isinstance(events, bool):
            raise RequestError("steering.events must be true or false", "steering.events")
        loras = _loras(raw.get("loras"), defaults.loras) if "loras" in raw else ()
        use_gate = raw.get("gate", use_gate)
        if not isinstance(use_gate, bool):
            raise RequestError("steering.gate must be true or false", "steering.gate")
        if use_gate and defaults.gate is None:
            raise RequestError("steering.gate: the server has no probe (serve --when PROBE)", "steering.gate")
    try:
        steering = api.steering_from_specs(model, specs, layers)
    except LocalsteerError as e:
        raise RequestError(f"steering: {e}", "steering.layers" if layers is not None else "steering.vectors") from None
    directer = span = None
    if instruction is not None:
        if isinstance(instruction, str):
            instruction = {"text": instruction}
        if not isinstance(instruction, dict) or not isinstance(instruction.get("text"), str):
            raise RequestError("steering.instruction must be a string or an object with text", "steering.instruction")
        try:
            directer = api.Directer(_number(instruction, "alpha", 1e-6, 1e6, 100.0, param="steering.instruction.alpha"),
                                    _number(instruction, "p", 1e-6, 1, 0.5, param="steering.instruction.p"),
                                    _number(instruction, "trials", 1, 64, 10, integer=True,
                                            param="steering.instruction.trials"))
            span = api.instruction_span(model, prompt, instruction["text"])
        except LocalsteerError as e:
            raise RequestError(f"steering.instruction: {e}", "steering.instruction.text") from None
        if topk is not None:
            raise RequestError("steering.reject does not combine with steering.instruction (DIRECTER has its own "
                               "test)", "steering.reject")
        if loras or use_gate:
            raise RequestError("steering.instruction does not combine with LoRA adapters or the probe gate "
                               "(send \"loras\": [], \"gate\": false)", "steering.instruction")
    rejection = None
    if topk is not None and steering.vector is not None:
        if fold == "auto":
            fold = api.fold_for(specs, model)
        rejection = api.rejection_config(topk, minp, fold=fold)
    described = steering.describe()
    if directer is not None:
        described = f"DIRECTER x{directer.alpha:g} on prompt tokens {span[0]}-{span[1] - 1}" + (
            "" if steering.vector is None else f" + {described}")
    elif rejection is not None:
        described += f"; reject top-{rejection.topk}"
    if loras:
        described += "; LoRA " + ", ".join(f"{scale:g} x {Path(lora.path).stem}" for lora, scale in loras)
    gate = defaults.gate if use_gate and (steering.vector is not None or loras) else None
    return Plan(prompt, max_tokens, sampling, steering, rejection, directer, span, tuple(stop), events, described,
                tuple(loras), gate)


def _loras(raw: Any, known: dict) -> tuple:
    out = []
    for where, name, scale in _named(raw, "steering.loras"):
        if name not in known:
            listed = ", ".join(sorted(known)) or "none: serve --lora PATH"
            raise RequestError(f"{where}: unknown adapter {name!r} (the server has {listed})", f"{where}.name")
        lora, default = known[name]
        out.append((lora, default if scale is None else scale))
    return tuple(out)


# --- the engine -----------------------------------------------------------------------------------

@dataclass
class Job:
    """One request in the engine. The engine calls `emit(kind, payload)` from its thread:
    ("token", TokenEvent) for each token when `streamed`, then ("end", summary) or ("error",
    RequestError); the summary holds every event (a request not streamed is woken once)."""

    plan: Plan
    emit: Any  # Callable[[str, Any], None], thread-safe
    streamed: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


class Busy(Exception):
    """No free slot and the queue is full."""


class _Slot:
    """A request's place in the engine: its own contexts (a `Steerer`, an `InstructionSteerer`),
    or, in batched mode, sequence `index` of the engine's shared context."""

    def __init__(self, model: Model, n_ctx: int, n_threads: int | None, index: int = 0):
        self.model, self.n_ctx, self.n_threads, self.index = model, n_ctx, n_threads, index
        self.batched = False  # this request's tokens go into the shared batch
        self.logits = None
        self.pos = self.step = 0
        self.directions = None
        self.layers: tuple[int, ...] = ()
        self.sampling = None
        self.utf8 = None
        self.steerer = api.make_steerer(model, api.Steering(None, ()), None, n_threads=n_threads, n_ctx=n_ctx)
        self.directer: api.InstructionSteerer | None = None
        self.job: Job | None = None
        self.decision = None  # the probe gate's, for the request in this slot
        self.stream = None
        self.events: list = []
        self.text = ""
        self.sent = 0  # characters of `text` sent to a streamed request
        self.t0 = 0.0

    def start(self, job: Job, fingerprint: str, shared=None, rows: RowsSteer | None = None) -> None:
        """Begin `job`; with a `shared` batched context (and its `rows` callback), a request
        steered by vectors alone is prefilled into sequence `index` there and decoded with the
        others (`Engine._batched_round`)."""
        p = job.plan
        self.batched = False
        if p.directer is not None:
            if self.directer is None:
                self.directer = api.InstructionSteerer(self.model, p.span, p.directer, n_ctx=self.n_ctx,
                                                       n_threads=self.n_threads)
            st = self.directer
            st.span, st.settings = p.span, p.directer
            v = p.steering.vector
            st.set_steering(True, None if v is None else v.directions, p.steering.layers)
            self.decision = None
        else:
            st = self.steerer
            self.decision = p.gate.decide(p.prompt) if p.gate is not None else None
            vector, loras = p.steering.vector, p.loras
            if self.decision is not None and not self.decision.steer:
                vector, loras = None, ()  # not a prompt the probe flags: the plain model
            if shared is not None and (p.rejection is None or vector is None) and not loras:
                self.job, self.events, self.text, self.sent, self.t0 = job, [], "", 0, time.perf_counter()
                self._prefill(shared, rows, vector, p.steering.layers, p)
                return
            importance = None
            if p.rejection is not None and vector is not None:
                importance = api.importance_order(self.model, vector, p.steering.layers, fingerprint)
            st.configure(vector, p.steering.layers or None, p.rejection if vector is not None else None, importance)
            if list(loras) != st.adapters:
                st.set_adapters(list(loras))
        self.job, self.events, self.text, self.sent, self.t0 = job, [], "", 0, time.perf_counter()
        self.stream = st.generate(p.prompt, p.max_tokens, p.sampling)

    def _prefill(self, shared, rows: RowsSteer, vector, layers: Sequence[int], p: Plan) -> None:
        self.batched = True
        self.directions = None if vector is None else vector.directions
        self.layers = tuple(layers) if vector is not None else ()
        self.sampling = p.sampling.resolved()
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.step = 0
        shared.remove(self.index)
        rows.set_rows([(self.directions, self.layers)] * min(len(p.prompt), shared.n_batch))
        shared.decode_sequence(p.prompt, 0, seq_id=self.index)
        self.logits = shared.logits()
        self.pos = len(p.prompt)

    def next_event(self) -> api.TokenEvent:
        """Batched mode: the token chosen from the last logits, as `Steerer` chooses it."""
        tok = self.sampling.choose(self.logits, self.step)
        status = api.Status.STEERED if self.directions is not None else api.Status.UNSTEERED
        ev = api.TokenEvent(self.step, tok, self.utf8.decode(self.model.piece(tok)), status, 0, self.layers)
        self.step += 1
        return ev

    def close(self) -> None:
        self.steerer.close()
        if self.directer is not None:
            self.directer.close()


class Engine:
    """The thread that owns the model: `submit(job)` (raises `Busy`), `close()`.

    `batch`: the requests steered by vectors alone (no rejection, DIRECTER or adapters) live in
    one context shared by the slots, each row with its own vector (`RowsSteer`); with True their
    next tokens go into one `llama_decode` together; the others keep their own contexts and take
    turns. "auto" (with 2 slots or more): a request joins the shared context when the requests
    running or starting with it are as many as the machine's measured decode costs say a batch pays for (a
    decode of that many rows costs less than as many one-row decodes, `calibrate.Costs.batch_wins`:
    on a GPU 2 already; on the AMD EPYC hosts 3 or 4 but not 2), else it runs in its own context;
    a round of the shared context whose rows have become too few decodes them one by one. A lone
    request thus keeps llama.cpp's own control vector (the callback and the shared cache cost a
    lone row about 17% on a CPU). False: no shared context."""

    def __init__(self, model: Model, slots: int = 1, queue: int = 8, n_ctx: int = 4096, n_threads: int | None = None,
                 batch: bool | str = "auto"):
        self.model = model
        self.n_ctx = n_ctx
        self._slots = [_Slot(model, n_ctx, n_threads, i) for i in range(slots)]
        self.batched = slots > 1 if batch == "auto" else bool(batch)
        # "auto": whether k rows go into one decode is decided by the measured decode costs
        # "auto": measured on the engine thread (the one thread that decodes: a second thread
        # decoding in the process slows both, docs/methods.md "One decoding thread")
        self._auto = batch == "auto" and self.batched
        self._costs: calibrate.Costs | None = None
        self._n_threads = n_threads
        self._ready = threading.Event()
        self._rows = RowsSteer() if self.batched else None
        self.widest = 0  # the most rows one batched decode has had (for tests and /health)
        self._shared = (model.context(n_ctx=slots * n_ctx, n_batch=max(512, slots), n_seq_max=slots,
                                      n_threads=n_threads, capture=self._rows) if self.batched else None)
        self._queue: collections.deque[Job] = collections.deque()
        self._queue_max = queue
        self._wake = threading.Condition()
        self._closing = False
        self._fingerprint = api.quick_fingerprint(model.path)
        self._thread = threading.Thread(target=self._run, name="localsteer-engine", daemon=True)
        self._thread.start()

    def _together(self, n: int) -> bool:
        """Whether `n` rows go into one decode."""
        return not self._auto or (self._costs is not None and self._costs.batch_wins(n))

    @property
    def mode(self) -> str:
        """How the requests steered by vectors alone are decoded, in words."""
        if not self.batched:
            return "taking turns"
        if not self._auto:
            return "batched"
        self._ready.wait(60)
        if self._costs is None:
            return "one row a decode (the measurement failed)"
        n = next((k for k in range(2, len(self._slots) + 1) if self._costs.batch_wins(k)), None)
        return (f"batched from {n} requests on, measured" if n is not None else
                "one row a decode, measured: a batch costs more than its rows one by one here")

    @property
    def busy_slots(self) -> int:
        return sum(s.job is not None for s in self._slots)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._wake:
            free = sum(s.job is None for s in self._slots) - len(self._queue)
            if free <= 0 and len(self._queue) >= self._queue_max:
                raise Busy()
            self._queue.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for s in self._slots:
            s.close()
        if self._shared is not None:
            self._shared.close()

    def _run(self) -> None:
        try:
            if self._auto:
                self._costs = calibrate.costs(self.model, self._n_threads, widths=range(2, len(self._slots) + 1))
        except Exception:  # noqa: BLE001 - unmeasured, every row is decoded alone; the engine runs on
            self._costs = None
        self._ready.set()
        while True:
            with self._wake:
                while not self._closing and not self._queue and all(s.job is None for s in self._slots):
                    self._wake.wait()
                if self._closing:
                    for s in self._slots:
                        if s.job is not None:
                            _send(s.job, "error", RequestError("the server is shutting down", status=503,
                                                             kind="server_error"))
                    for job in self._queue:
                        _send(job, "error", RequestError("the server is shutting down", status=503, kind="server_error"))
                    return
                starting = []
                for s in self._slots:
                    if s.job is None and self._queue:
                        starting.append((s, self._queue.popleft()))
            # "auto": into the shared context only when as many requests at once pay for a batch;
            # a lone request keeps llama.cpp's own control vector in its own context
            together = self.busy_slots + len(starting)
            shared = self._shared if self._together(together) else None
            for s, job in starting:
                if job.cancelled.is_set():
                    continue
                try:
                    s.start(job, self._fingerprint, shared, self._rows)
                except Exception as e:  # noqa: BLE001 - a request never takes the server down
                    self._fail(s, job, e)
            for s in self._slots:
                if s.job is not None and not s.batched:
                    try:
                        self._step(s)
                    except Exception as e:  # noqa: BLE001 - the engine outlives any request
                        self._fail(s, s.job, e)
            if self._shared is not None:
                try:
                    self._batched_round()
                except Exception as e:  # noqa: BLE001
                    for s in self._slots:
                        if s.job is not None and s.batched:
                            self._fail(s, s.job, e)

    def _batched_round(self) -> None:
        """One token of every batched request, then one decode of all their rows (or, where the
        measured costs say so, one decode per row)."""
        going = []
        for s in self._slots:
            if s.job is None or not s.batched:
                continue
            if s.job.cancelled.is_set():
                self._finish(s, "cancelled")
                continue
            try:
                ev = s.next_event()
            except Exception as e:  # noqa: BLE001
                self._fail(s, s.job, e)
                continue
            if self._took(s, ev):
                going.append((s, ev.token))
        if not going:
            return
        together = self._together(len(going))
        self.widest = max(self.widest, len(going) if together else 1)
        try:
            for part in ([going] if together else [[g] for g in going]):
                self._rows.set_rows([(s.directions, s.layers) for s, _ in part])
                self._shared.decode([t for _, t in part], [s.pos for s, _ in part], [s.index for s, _ in part],
                                    [True] * len(part))
                for i, (s, _) in enumerate(part):
                    s.logits = self._shared.logits(i)
                    s.pos += 1
        except Exception as e:  # noqa: BLE001
            for s, _ in going:
                self._fail(s, s.job, e)

    def _step(self, s: _Slot) -> None:
        job = s.job
        if job.cancelled.is_set():
            self._finish(s, "cancelled")
            return
        try:
            ev = next(s.stream)
        except StopIteration:
            self._finish(s, "length")
            return
        except Exception as e:  # noqa: BLE001
            self._fail(s, job, e)
            return
        self._took(s, ev)

    def _took(self, s: _Slot, ev) -> bool:
        """Record a slot's new token; False when that ended the request. A streamed request is
        sent its text as far as no stop string can begin in it: a stop string split across
        tokens is never sent in part."""
        job = s.job
        s.events.append(ev)
        if self.model.is_eog(ev.token):
            self._finish(s, "stop", ev)
            return False
        before = len(s.text)
        s.text += ev.text
        hit = _stop_at(s.text, job.plan.stop, before)
        if hit is not None:
            s.text = s.text[:hit]
            self._finish(s, "stop", ev)
            return False
        if len(s.events) >= job.plan.max_tokens or len(job.plan.prompt) + len(s.events) >= self.n_ctx:
            self._finish(s, "length", ev)
            return False
        if job.streamed:
            safe = len(s.text) - _held(s.text, job.plan.stop)
            _send(job, "token", _cut(ev, s.text[s.sent:safe]))
            s.sent = safe
        return True

    def _finish(self, s: _Slot, reason: str, last=None) -> None:
        job, events = s.job, s.events
        last = last if last is not None else (events[-1] if events else None)
        if job.streamed and last is not None and s.sent < len(s.text):
            _send(job, "token", _cut(last, s.text[s.sent:]))  # what was held back for a stop string
        if s.stream is not None:
            s.stream.close()
        s.job = s.stream = None
        s.batched = False
        seconds = time.perf_counter() - s.t0
        n = sum(not self.model.is_eog(e.token) for e in events)
        _send(job, "end", {"finish_reason": reason, "completion_tokens": len(events), "text_tokens": n,
                         "seconds": seconds, "acceptance": api.acceptance(events), "events": events,
                         "text": s.text,
                         "gate": None if s.decision is None else s.decision.as_dict(),
                         "statuses": dict(collections.Counter(e.status.value for e in events))})

    def _fail(self, s: _Slot, job: Job | None, e: BaseException) -> None:
        if s.stream is not None:
            try:
                s.stream.close()
            except Exception:  # noqa: BLE001
                pass
        s.job = s.stream = None
        s.batched = False
        if isinstance(e, (LocalsteerError, ValueError)):
            err = RequestError(str(e))
        else:
            err = RequestError(f"internal error: {type(e).__name__}: {e}", status=500, kind="server_error")
        _send(job, "error", err)


def _send(job: Job | None, kind: str, payload) -> None:
    """`job.emit`, which never takes the engine down: if the request's side is gone (its event
    loop closed), the job is cancelled and dropped at its next token."""
    if job is None:
        return
    try:
        job.emit(kind, payload)
    except Exception:  # noqa: BLE001
        job.cancelled.set()


def _stop_at(text: str, stops: Sequence[str], before: int) -> int | None:
    """Where the first stop string that ends after `before` starts in `text`, if any."""
    best = None
    for s in stops:
        at = text.find(s, max(0, before - len(s) + 1))
        if at >= 0 and (best is None or at < best):
            best = at
    return best


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could begin a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _cut(ev, text: str):
    """`ev` carrying `text` (what is sent of it)."""
    return dataclasses.replace(ev, text=text)


# --- HTTP ---------------------------------------------------------------------------------------

def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


class Service:
    """What the routes share: the model, its name, the vectors, the defaults and the engine."""

    def __init__(self, model: Model, model_name: str, engine: Engine, index: dict[str, VectorInfo],
                 defaults: Defaults = Defaults(), api_key: str | None = None, max_body: int = MAX_BODY):
        self.model, self.model_name, self.engine, self.index = model, model_name, engine, index
        self.defaults, self.api_key, self.max_body = defaults, api_key, max_body
        self.created = int(time.time())


def make_app(service: Service):
    """The Starlette application."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorized(request: Request) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {service.api_key}":
            raise RequestError("a valid API key is required (Authorization: Bearer KEY)", status=401,
                               kind="authentication_error")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.max_body:
            raise RequestError(f"the body is over {service.max_body} bytes", status=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > service.max_body:
                raise RequestError(f"the body is over {service.max_body} bytes", status=413)
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("model must be a string", "model")
        return body

    async def health(request: Request):
        e = service.engine
        return JSONResponse({"status": "ok", "slots": len(e._slots), "busy": e.busy_slots, "queued": e.queued,
                             "batched": e.batched, "batching": e.mode})

    async def models(request: Request):
        try:
            authorized(request)
        except RequestError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                         "created": service.created, "owned_by": "localsteer"}]})

    async def vectors(request: Request):
        try:
            authorized(request)
        except RequestError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [v.as_dict() for v in service.index.values()]})

    async def completions(request: Request, chat: bool):
        try:
            authorized(request)
            body = await read_json(request)
            if chat:
                messages = _messages(body)
                prompt = api.chat_prompt(service.model, messages)
            else:
                text = body.get("prompt")
                if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
                    text = text[0]
                if not isinstance(text, str) or not text:
                    raise RequestError("prompt must be a non-empty string", "prompt")
                prompt = api.chat_prompt(service.model, text, raw=True)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream must be true or false", "stream")
            p = plan(service.model, body, prompt, service.index, service.defaults, service.engine.n_ctx)
        except RequestError as e:
            return error(e)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(p, lambda kind, payload: loop.call_soon_threadsafe(queue.put_nowait, (kind, payload)), stream)
        try:
            service.engine.submit(job)
        except Busy:
            return error(RequestError("all slots are busy and the queue is full: retry later", status=503,
                                      kind="server_error", headers={"Retry-After": "1"}))
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": service.model_name}

        def summary(end: dict, events: list) -> dict:
            applied = p.described if end["gate"] is None or end["gate"].get("steer") else "none (the probe gate is off)"
            s = {"applied": applied, "gate": end["gate"], "acceptance": round(end["acceptance"], 4),
                 "statuses": end["statuses"],
                 "tokens_per_second": round(end["completion_tokens"] / end["seconds"], 2) if end["seconds"] else None}
            if p.events:
                s["events"] = [e.as_dict() for e in events]
            return s

        def usage(end: dict) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": end["completion_tokens"],
                    "total_tokens": len(prompt) + end["completion_tokens"]}

        if not stream:
            try:
                while True:
                    try:
                        kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                        break
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled.set()
                            return JSONResponse({}, status_code=499)
            finally:
                job.cancelled.set()  # no-op once finished; stops the job if this task was cancelled
            if kind == "error":
                return error(payload)
            end = payload
            events = [e for e in end["events"] if not service.model.is_eog(e.token)]
            text = [end["text"]]
            reason = "length" if end["finish_reason"] == "length" else "stop"
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": reason}
                      if chat else {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None})
            return JSONResponse({**head, "choices": [choice], "usage": usage(end), "steering": summary(end, events)})

        async def sse():
            events = []
            try:
                if chat:
                    yield _sse({**head, "object": "chat.completion.chunk",
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
                while True:
                    kind, payload = await queue.get()
                    if kind == "token":
                        events.append(payload)
                        if not payload.text:
                            continue
                        choice = ({"index": 0, "delta": {"content": payload.text}, "finish_reason": None} if chat
                                  else {"index": 0, "text": payload.text, "finish_reason": None, "logprobs": None})
                        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "choices": [choice]}
                        if p.events:
                            chunk["steering"] = {"event": payload.as_dict()}
                        yield _sse(chunk)
                    elif kind == "error":
                        yield _sse(payload.body())
                        break
                    else:
                        reason = "length" if payload["finish_reason"] == "length" else "stop"
                        choice = ({"index": 0, "delta": {}, "finish_reason": reason} if chat
                                  else {"index": 0, "text": "", "finish_reason": reason, "logprobs": None})
                        yield _sse({**head, "object": "chat.completion.chunk" if chat else "text_completion",
                                    "choices": [choice], "usage": usage(payload),
                                    "steering": summary(payload, events)})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away: the engine drops the job at its next token

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def on_error(request: Request, exc: Exception):
        return error(RequestError(f"internal error: {type(exc).__name__}", status=500, kind="server_error"))

    async def not_found(request: Request, exc: Exception):
        return error(RequestError(f"no route {request.method} {request.url.path}", status=404))

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/steering/vectors", vectors),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={Exception: on_error, 404: not_found, 405: not_found})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
