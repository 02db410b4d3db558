"""The runtime: the only module that touches llama.cpp (llama-cpp-python's ctypes bindings).

It owns every pointer's lifetime. One `Model` holds the weights; any number of `Context`s
(steered, plain, capture) share them. Everything above this module sees numpy arrays,
token ids and strings.
"""

from __future__ import annotations

import _thread
import ctypes
import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

import llama_cpp
from llama_cpp import _ggml

from .errors import ModelError, VectorError

LLAMA_CPP_PYTHON_VERSION: str = llama_cpp.__version__

_backend_ready = False
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_verbose = False


def _log_sink(text: bytes) -> None:
    if _verbose and text:
        os.write(2, text)


def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    _log_sink(text)


_log_callback = llama_cpp.llama_log_callback(_log)

# --- signals that land while llama.cpp is calling Python ----------------------------------------
# llama.cpp calls Python back (its log lines while a model or context is made, the eval callback
# during a decode). A Ctrl-C that Python handles there raises KeyboardInterrupt inside the
# callback, and ctypes can only print it and drop it: the command would go on as if nothing had
# been pressed. So the handlers for SIGINT and SIGTERM are wrapped: a signal that finds a callback
# on the stack is raised again, to be handled at the first line Python runs outside it (once
# llama.cpp has returned). A short-lived thread sends it again a few milliseconds later, not the
# handler itself: a signal made pending inside a handler is handled at the handler's next line,
# over and over.

_REDELIVER_S = 0.005
_C_CALLBACKS: set = {_log.__code__}  # the code of every Python function llama.cpp calls


def _in_c_callback(frame) -> bool:
    while frame is not None:
        if frame.f_code in _C_CALLBACKS:
            return True
        frame = frame.f_back
    return False


def _send_to_main(signum: int) -> None:
    if hasattr(signal, "pthread_kill"):  # a real signal: it also wakes a main thread that sleeps
        signal.pthread_kill(threading.main_thread().ident, signum)
    else:  # Windows
        _thread.interrupt_main(signum)


def _deferring(handler):
    def deliver(signum: int, frame) -> None:
        if _in_c_callback(frame):
            again = threading.Timer(_REDELIVER_S, _send_to_main, (signum,))
            again.daemon = True
            again.start()
            return
        handler(signum, frame)

    deliver.localsteer_wraps = handler
    return deliver


def defer_signals_in_callbacks() -> None:
    """Wrap the current Python handlers of SIGINT and SIGTERM (main thread only; idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _HELD_SIGNALS:
        handler = signal.getsignal(s)
        if callable(handler) and not hasattr(handler, "localsteer_wraps"):
            signal.signal(s, _deferring(handler))


def init_backend(verbose: bool = False) -> None:
    """Initialise llama.cpp once per process; its logging is silenced unless `verbose`."""
    global _backend_ready, _verbose
    _verbose = verbose
    defer_signals_in_callbacks()
    if not _backend_ready:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def system_info() -> str:
    """llama.cpp's own summary of the compiled CPU features and backends."""
    init_backend(_verbose)
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


def backend_devices() -> list[tuple[str, str]]:
    """(name, description) of each ggml backend device this build can use (CPU, CUDA0, Metal...)."""
    init_backend(_verbose)
    lib = _ggml.libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append((lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_description(dev).decode()))
    return out


def supports_gpu_offload() -> bool:
    init_backend(_verbose)
    return bool(llama_cpp.llama_supports_gpu_offload())


# --- ggml tensor access for the eval callback (lives in libggml-base) -------------------------

_ggml_base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / (
    "libggml-base.dylib" if os.uname().sysname == "Darwin" else "libggml-base.so")))
_ggml_base.ggml_get_name.restype = ctypes.c_char_p
_ggml_base.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml_base.ggml_backend_tensor_get.restype = None
_ggml_base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml_base.ggml_backend_tensor_set.restype = None
_ggml_base.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_GGML_TYPE_F32 = 0


class _TensorHead(ctypes.Structure):
    """The first fields of `struct ggml_tensor`: type, buffer, ne[4] (stable across ggml versions)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


class _EvalCallback:
    """Base of the eval callbacks (`Capture`, `RowSteer`): llama.cpp calls `on_tensor` for each
    tensor `wanted` names. llama.cpp asks the callback about every tensor of the graph (about a
    thousand a token), so `Context.decode` looks the wanted names up once (`arm`) and the
    callback only does a dictionary lookup; where nothing is wanted it answers at once.
    An exception cannot cross the C frames of a decode: one raised in
    `on_tensor` is kept in `error`, the callback returns false, which stops the graph, and
    `Context.decode` raises it once llama_decode has returned. Signals (Ctrl-C, SIGTERM) are
    held during such a decode (`_signals_held`), since Python would raise KeyboardInterrupt at
    the callback's first line, outside any handler: they set `stop`, which stops the graph the
    same way, and are delivered when llama_decode has returned."""

    def __init__(self):
        self.error: BaseException | None = None
        self.stop = False
        self.layers: dict[int, np.ndarray] = {}
        self._armed: dict[bytes, tuple[_EvalCallback, int]] = {}

        def callback(tensor: int, ask: bool, user_data: int) -> bool:
            try:
                if self.stop or self.error is not None:
                    return ask  # asked: yes, so that the call that follows can stop the graph
                if not self._armed:
                    return not ask  # nothing wanted in this decode
                target = self._armed.get(_ggml_base.ggml_get_name(tensor))
                if ask:
                    return target is not None
                if target is not None:
                    target[0].on_tensor(tensor, target[1])
                return True
            except BaseException as e:  # noqa: BLE001 - re-raised by Context.decode
                self.error = e
                return ask

        _C_CALLBACKS.add(callback.__code__)
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(callback)

    def wanted(self) -> dict[bytes, int]:
        """The tensors the next decode reads or writes: name -> layer index."""
        raise NotImplementedError

    def targets(self) -> dict[bytes, tuple["_EvalCallback", int]]:
        """Name -> (the callback whose `on_tensor` gets it, layer index)."""
        return {name: (self, il) for name, il in self.wanted().items()}

    def arm(self) -> None:
        """Look up what the next decode wants (`Context.decode` calls it before each decode)."""
        self._armed = self.targets()

    def on_tensor(self, tensor: int, il: int) -> None:
        raise NotImplementedError

    def raise_pending(self) -> None:
        """Raise the exception a callback kept during the last decode, if any."""
        error, self.error = self.error, None
        if error is not None:
            raise error


@contextmanager
def _signals_held(callback: _EvalCallback) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM during a decode whose eval callback runs Python code: a signal
    sets `callback.stop` (the graph stops at the next tensor it reads) and is raised again, to
    the handlers that were in place, when the decode has returned. Only the main thread can
    set handlers; signals are only handled there, too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        held.append(signum)
        callback.stop = True

    saved = {}
    for s in _HELD_SIGNALS:
        if signal.getsignal(s) not in (signal.SIG_IGN, None):
            saved[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        callback.stop = False
        for s in held:
            signal.raise_signal(s)


def _tensor_rows(tensor: int) -> np.ndarray:
    """A float32 copy of a 2-D tensor `(ne[1], ne[0])` (tokens x width)."""
    head = _TensorHead.from_address(tensor)
    out = np.empty((int(head.ne[1]), int(head.ne[0])), dtype=np.float32)
    _ggml_base.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
    return out


class Capture(_EvalCallback):
    """Receives the residual stream `l_out-<il>` of chosen layers during a decode.

    After `Context.decode`, `layers[il]` is a float32 array `(n_rows, n_embd)`: one row per
    token of the batch, except for the last layer, which llama.cpp computes only for the
    tokens whose logits were requested (its rows follow the output order).
    """

    def __init__(self, layers: Iterable[int]):
        super().__init__()
        self._wanted = {f"l_out-{il}".encode(): il for il in layers}

    def wanted(self) -> dict[bytes, int]:
        return self._wanted

    def on_tensor(self, tensor: int, il: int) -> None:
        if _TensorHead.from_address(tensor).type == _GGML_TYPE_F32:
            self.layers[il] = _tensor_rows(tensor)


class RowSteer(_EvalCallback):
    """Steers chosen rows of a batch: adds `directions[il]` to the residual stream `l_out-<il>`
    of those rows, for each active layer il, where llama.cpp's control vector adds it to every
    row. The eval callback receives each `l_out-<il>` before the next layer reads it, and writes
    it back. One context can then hold a steered and a plain sequence and evaluate a token of
    each in one decode (`steer.Rejection.loop` "joint").

    `rows`: the batch rows to steer, None for all of them (a steered prompt), empty for none.
    The last layer's tensor holds only the rows whose logits were asked for (in output order).
    """

    def __init__(self):
        super().__init__()
        self.rows: list[int] | None = []
        self._directions = np.zeros((0, 0), dtype=np.float32)
        self._wanted: dict[bytes, int] = {}
        self._per_row: list[frozenset[int]] | None = None  # `per_row`: each row its own layers

    def wanted(self) -> dict[bytes, int]:
        if self._per_row is not None:
            return self._per_row_wanted
        return self._wanted if self.rows != [] else {}

    def on_tensor(self, tensor: int, il: int) -> None:
        out = _tensor_rows(tensor)
        if self._per_row is not None:
            rows = [r for r, ls in enumerate(self._per_row[:len(out)]) if il in ls]
            out[rows] += self._per_row_directions[il]
        else:
            rows = slice(None) if self.rows is None else [r for r in self.rows if r < len(out)]
            out[rows] += self._directions[il]
        _ggml_base.ggml_backend_tensor_set(tensor, out.ctypes.data, 0, out.nbytes)

    def set(self, directions: np.ndarray | None, layers: Sequence[int] = ()) -> None:
        """Steer with `directions` `(n_layer, n_embd)` on `layers` (None or no layers: off)."""
        if directions is None or not layers:
            self._wanted = {}
            return
        self._directions = np.ascontiguousarray(directions, dtype=np.float32)
        self._wanted = {f"l_out-{il}".encode(): il for il in layers if il >= 1}

    def per_row(self, directions: np.ndarray | None, layers: Sequence[Iterable[int]] = ()) -> None:
        """Until called again with None: steer each batch row r with `directions` on its own
        layers `layers[r]` (every row must ask for logits), instead of `rows` on the layers of
        `set` (which are kept for then)."""
        if directions is None:
            self._per_row = None
            return
        self._per_row = [frozenset(ls) for ls in layers]
        self._per_row_directions = np.ascontiguousarray(directions, dtype=np.float32)
        self._per_row_wanted = {f"l_out-{il}".encode(): il for il in frozenset().union(*self._per_row) if il >= 1}


class RowsSteer(_EvalCallback):
    """Steers each row of a batch with its own vector: `set_rows([(directions, layers), ...])`,
    one entry per batch row (directions `(n_layer, n_embd)` or None), adds `directions[il]` to
    that row of `l_out-<il>` for il in its layers, as `RowSteer` does for one vector. The server
    decodes the next token of several requests, each with its own steering, in one decode. Every
    row must ask for logits (the last layer holds only those rows)."""

    def __init__(self):
        super().__init__()
        self._rows: list[tuple[np.ndarray | None, frozenset[int]]] = []
        self._wanted: dict[bytes, int] = {}

    def set_rows(self, rows: Sequence[tuple[np.ndarray | None, Iterable[int]]]) -> None:
        self._rows = [(None if d is None else np.ascontiguousarray(d, dtype=np.float32), frozenset(ls))
                      for d, ls in rows]
        layers = set().union(*(ls for d, ls in self._rows if d is not None)) if self._rows else set()
        self._wanted = {f"l_out-{il}".encode(): il for il in layers if il >= 1}

    def wanted(self) -> dict[bytes, int]:
        return self._wanted

    def on_tensor(self, tensor: int, il: int) -> None:
        out = _tensor_rows(tensor)
        for r, (directions, layers) in enumerate(self._rows[:len(out)]):
            if directions is not None and il in layers:
                out[r] += directions[il]
        _ggml_base.ggml_backend_tensor_set(tensor, out.ctypes.data, 0, out.nbytes)


class KeyScale(_EvalCallback):
    """Amplifies chosen keys for chosen rows of a batch: in each layer il of `layers`, the
    attention scores `kq-<il>` (KV cells x batch rows x heads, before the softmax) of the rows
    `rows` against the KV cells `cells` are multiplied by `alpha`. A score is the dot product of
    a query and a key, so this is the same as multiplying those cells' keys by `alpha` (values
    untouched) for those rows only: DIRECTER's steered pass (localsteer/directer.py), with the
    cache itself unchanged. The context must run without flash attention, which has no `kq`
    tensor (`Model.context(flash_attn=False)`)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []
        self.cells = np.zeros(0, dtype=np.int64)
        self.alpha = 1.0
        self._wanted: dict[bytes, int] = {}
        self._row_layers: list[frozenset[int]] | None = None  # `set_rows`: each row its own layers

    def set(self, layers: Sequence[int], cells: Sequence[int], alpha: float, rows: Sequence[int]) -> None:
        """Scale `cells` by `alpha` for `rows` in `layers` from the next decode on (no layers: off)."""
        self._wanted = {f"kq-{il}".encode(): il for il in layers}
        self.cells = np.asarray(cells, dtype=np.int64)
        self.alpha = float(alpha)
        self.rows = list(rows)
        self._row_layers = None

    def set_rows(self, layers: Sequence[Iterable[int]], cells: Sequence[int], alpha: float) -> None:
        """Scale `cells` by `alpha` for each batch row r in the layers `layers[r]` (its own set)."""
        self._row_layers = [frozenset(ls) for ls in layers]
        self._wanted = {f"kq-{il}".encode(): il for il in frozenset().union(*self._row_layers)}
        self.cells = np.asarray(cells, dtype=np.int64)
        self.alpha = float(alpha)
        self.rows = [r for r, ls in enumerate(self._row_layers) if ls]

    def wanted(self) -> dict[bytes, int]:
        return self._wanted if self.rows and len(self.cells) else {}

    def on_tensor(self, tensor: int, il: int) -> None:
        head = _TensorHead.from_address(tensor)
        ne = [int(n) for n in head.ne]  # n_kv, rows, heads, streams
        scores = np.empty((ne[3], ne[2], ne[1], ne[0]), dtype=np.float32)
        _ggml_base.ggml_backend_tensor_get(tensor, scores.ctypes.data, 0, scores.nbytes)
        rows = [r for r in self.rows if r < ne[1] and (self._row_layers is None or il in self._row_layers[r])]
        cells = self.cells[self.cells < ne[0]]
        block = scores[:, :, rows, :]
        block[..., cells] *= np.float32(self.alpha)
        scores[:, :, rows, :] = block
        _ggml_base.ggml_backend_tensor_set(tensor, scores.ctypes.data, 0, scores.nbytes)


class Callbacks(_EvalCallback):
    """Several eval callbacks on one context (e.g. `KeyScale` and `RowSteer`: DIRECTER with a
    control vector): each tensor goes to the first part that wants it."""

    def __init__(self, *parts: _EvalCallback):
        super().__init__()
        self.parts = parts

    def targets(self) -> dict[bytes, tuple[_EvalCallback, int]]:
        merged: dict[bytes, tuple[_EvalCallback, int]] = {}
        for part in reversed(self.parts):  # the first part that wants a tensor gets it
            merged.update(part.targets())
        return merged


# --- model and contexts ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    path: str
    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    size_bytes: int


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class Model:
    """A GGUF model loaded once; make as many contexts from it as you need."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 999, verbose: bool = False,
                 repack: bool = True):
        """`repack` lets llama.cpp's CPU backend repack weights for its faster kernels (as
        llama.cpp does by default; scripts/bench_rejection.py measured 17.5 vs 12.3 tok/s
        with and without it on Qwen2.5-1.5B here)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            if not _is_gguf(path):
                raise ModelError(f"not a GGUF file: {path}")
        except OSError as e:
            raise ModelError(f"cannot read model {path}: {e.strerror}") from None
        init_backend(verbose)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load {path} (run with --verbose for its log)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.path = path
        self.offloaded = n_gpu_layers > 0 and supports_gpu_offload()  # layers run on a GPU (CUDA, Metal)
        self.info = ModelInfo(
            path=str(path),
            name=self.metadata("general.name") or path.stem,
            arch=self.metadata("general.architecture") or "unknown",
            n_layer=llama_cpp.llama_model_n_layer(self._model),
            n_embd=llama_cpp.llama_model_n_embd(self._model),
            n_vocab=llama_cpp.llama_vocab_n_tokens(self._vocab),
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(self._model),
            size_bytes=llama_cpp.llama_model_size(self._model),
        )
        self._piece_cache: dict[int, bytes] = {}

    # properties used everywhere
    @property
    def n_layer(self) -> int:
        return self.info.n_layer

    @property
    def n_embd(self) -> int:
        return self.info.n_embd

    @property
    def n_vocab(self) -> int:
        return self.info.n_vocab

    @property
    def arch(self) -> str:
        return self.info.arch

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # tokens
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Tokens of `text`; a BOS token is added when the model wants one and the text lacks it."""
        data = text.encode("utf-8")
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        if add_bos and bos >= 0 and data.startswith(self.piece(bos, special=True)):
            add_bos = False
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise ModelError(f"tokenizer failed on a text of {len(data)} bytes")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""
        key = token if not special else -1 - token
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        out = buf.raw[:n]
        self._piece_cache[key] = out
        return out

    @property
    def bos_token(self) -> int | None:
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        return int(bos) if bos >= 0 else None

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # chat template
    def chat_template(self) -> str | None:
        tmpl = llama_cpp.llama_model_chat_template(self._model, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    def user_prompt(self, user: str) -> list[int]:
        """The tokens of a chat with one user message, ready for the assistant's reply."""
        return self.tokenize(self.apply_chat_template([{"role": "user", "content": user}]))

    def apply_chat_template(self, messages: Sequence[dict], add_assistant: bool = True) -> str:
        """Format `messages` ([{"role", "content"}]) with the model's own template (GGUF metadata).

        A model without a template (some base models) gets its messages joined as plain text.
        """
        tmpl = llama_cpp.llama_model_chat_template(self._model, None)
        if not tmpl:
            return "\n\n".join(m["content"] for m in messages)
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        arr = (llama_cpp.llama_chat_message * len(keep))()
        for i, (role, content) in enumerate(keep):
            arr[i].role = role
            arr[i].content = content
        size = 256 + 2 * sum(len(c) + len(r) for r, c in keep)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, size)
            if n < 0:
                # llama.cpp's C template engine does not know this template: plain text it is
                return "\n\n".join(m["content"] for m in messages)
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n + 1
        raise ModelError("chat template output did not fit its buffer")

    def context(self, n_ctx: int = 4096, n_batch: int = 512, n_seq_max: int = 1,
                n_threads: int | None = None, capture: _EvalCallback | None = None,
                flash_attn: bool | None = None, kv_f32: bool = False) -> "Context":
        """A context; `flash_attn` None lets llama.cpp decide (its default), False turns it off
        (`KeyScale` needs the attention scores it skips); `kv_f32` keeps the KV cache in float32
        instead of llama.cpp's float16."""
        return Context(self, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max,
                       n_threads=n_threads, capture=capture, flash_attn=flash_attn, kv_f32=kv_f32)

    def close(self) -> None:
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        self.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Lora:
    """A GGUF LoRA adapter loaded for one model (llama.cpp checks that it fits the model)."""

    def __init__(self, model: Model, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"adapter file not found: {path}")
        self.model = model
        self.path = path
        self._adapter = llama_cpp.llama_adapter_lora_init(model._model, str(path).encode())
        if not self._adapter:
            raise ModelError(f"llama.cpp could not load the adapter {path} for this model "
                             "(run with --verbose for its log)")

    def close(self) -> None:
        # llama.cpp frees adapters with their model; an explicit free is only safe before that
        if getattr(self, "_adapter", None) and getattr(self.model, "_model", None):
            llama_cpp.llama_adapter_lora_free(self._adapter)
        self._adapter = None


def _finite(logits: np.ndarray) -> np.ndarray:
    """`logits`, or a `ModelError` if any is NaN or infinite: a steering strength far too large
    overflows the residual stream, and no token can be chosen from such logits."""
    if not np.isfinite(logits.max()):  # the maximum is NaN if any is, inf if one is +inf
        raise ModelError("the model computed NaN or infinite logits: a steering strength far too large "
                         "(or a damaged model)")
    return logits


def die_with_parent() -> None:
    """For a child process, before exec: be killed when this process dies, even by SIGKILL
    (Linux's PR_SET_PDEATHSIG; elsewhere nothing). `models.pull` runs pip so."""
    if os.uname().sysname == "Linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def default_threads() -> int:
    """CPU threads per context: $LOCALSTEER_THREADS, else the cores this process may use (at most 8)."""
    env = os.environ.get("LOCALSTEER_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(available_cores(), 8))


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota. In a
    container started with `--cpus 2` the CPU count is the host's, and llama.cpp's threads spin
    while they wait for each other: more threads than cores makes every decode several times slower."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return max(1, min(n, math.ceil(quota))) if quota else max(1, n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota in cores (cgroup v2 `cpu.max`, else v1 `cfs_quota_us / cfs_period_us`), None
    where there is none or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for d in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / d / "cpu.cfs_quota_us").read_text())
            period_us = int((root / d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


class Context:
    """One llama.cpp context (its own KV cache and control vector) over a shared `Model`."""

    def __init__(self, model: Model, n_ctx: int, n_batch: int, n_seq_max: int,
                 n_threads: int | None, capture: _EvalCallback | None, flash_attn: bool | None = None,
                 kv_f32: bool = False):
        self.model = model
        self.capture = capture
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch  # one physical batch per decode keeps captured rows in order
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.no_perf = True
        if kv_f32:
            params.type_k = params.type_v = _GGML_TYPE_F32
        if flash_attn is not None:
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        threads = n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        if capture is not None:
            params.cb_eval = capture._callback
            params.cb_eval_user_data = None
        self._ctx = llama_cpp.llama_init_from_model(model._model, params)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not create a context (n_ctx={n_ctx})")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq_max)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_outputs = 0

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
               outputs: Sequence[bool]) -> None:
        """Evaluate one batch; `outputs[i]` asks for the logits after token i."""
        n = len(tokens)
        if n == 0:
            return
        if n > self.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch={self.n_batch}")
        b = self._batch
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_ids[i]
            b.logits[i] = bool(outputs[i])
        b.n_tokens = n
        if self.capture is None:
            rc = llama_cpp.llama_decode(self._ctx, b)
        else:
            self.capture.layers = {}
            self.capture.arm()
            with _signals_held(self.capture):
                rc = llama_cpp.llama_decode(self._ctx, b)
            self.capture.raise_pending()
        if rc != 0:
            raise ModelError(f"llama_decode failed ({rc}): context full or batch invalid")
        self._n_outputs = sum(1 for o in outputs if o)

    def decode_sequence(self, tokens: Sequence[int], start: int, seq_id: int = 0,
                        all_logits: bool = False) -> None:
        """Append `tokens` to one sequence at positions start.., in chunks of n_batch."""
        for off in range(0, len(tokens), self.n_batch):
            chunk = tokens[off:off + self.n_batch]
            last = off + len(chunk) == len(tokens)
            outs = [all_logits or (last and i == len(chunk) - 1) for i in range(len(chunk))]
            self.decode(chunk, range(start + off, start + off + len(chunk)), [seq_id] * len(chunk), outs)

    def last_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Decode each prompt as its own sequence in one batch (the cache is cleared first) and
        return the next-token logits after each prompt's last token, `(n_prompts, n_vocab)`."""
        toks: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        out: list[bool] = []
        for s, p in enumerate(prompts):
            toks += p
            pos += range(len(p))
            seq += [s] * len(p)
            out += [False] * (len(p) - 1) + [True]
        self.clear()
        self.decode(toks, pos, seq, out)
        return self.logits_rows(len(prompts))

    def logits(self, i: int = -1) -> np.ndarray:
        """Next-token logits `(n_vocab,)` after output `i` of the last decode (-1: the last)."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise ValueError(f"no logits for output {i}")
        return _finite(np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy())

    def logits_rows(self, n: int) -> np.ndarray:
        """Logits of the first `n` outputs of the last decode, `(n, n_vocab)`."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return _finite(np.ctypeslib.as_array(ptr, shape=(n, self.model.n_vocab)).copy())

    def set_control(self, directions: np.ndarray | None, layer_start: int = 1,
                    layer_end: int | None = None) -> None:
        """Apply a control vector: `directions` is `(n_layer, n_embd)`, row il is added to the
        output of layer il for il in [layer_start, layer_end]; row 0 is never used (llama.cpp
        has no vector for layer 0). None clears it."""
        m = self.model
        if directions is None:
            llama_cpp.llama_set_adapter_cvec(self._ctx, None, 0, m.n_embd, -1, -1)
            return
        if directions.shape != (m.n_layer, m.n_embd):
            raise VectorError(f"control vector of shape {directions.shape} does not fit "
                              f"the model ({m.n_layer} layers x {m.n_embd})")
        data = np.ascontiguousarray(directions[1:], dtype=np.float32)
        end = m.n_layer - 1 if layer_end is None else layer_end
        rc = llama_cpp.llama_set_adapter_cvec(
            self._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
            m.n_embd, layer_start, end)
        if rc != 0:
            raise VectorError("llama.cpp refused the control vector")

    def set_loras(self, adapters: Sequence[tuple["Lora", float]]) -> None:
        """Apply LoRA adapters with their scales (an empty list removes them all)."""
        n = len(adapters)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, n))(*[a._adapter for a, _ in adapters])
        scales = (ctypes.c_float * max(1, n))(*[float(s) for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self._ctx, arr if n else None, n, scales if n else None) != 0:
            raise ModelError("llama.cpp refused the LoRA adapters")

    def remove(self, seq_id: int = -1, p0: int = -1, p1: int = -1) -> None:
        """Forget cached tokens of `seq_id` at positions [p0, p1) (-1: open end / all sequences)."""
        if not llama_cpp.llama_memory_seq_rm(self._mem, seq_id, p0, p1):
            raise ModelError("llama.cpp could not remove tokens from the cache")

    def share(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Let sequence `dst` also hold `src`'s cached tokens at positions [p0, p1) (-1: open
        end): the cells are shared, not copied."""
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
