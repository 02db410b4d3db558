"""`ControlVector`: a steering direction per layer, as an immutable value with arithmetic,
and its GGUF file format (the one llama.cpp's `--control-vector` loader reads)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .fileio import add_gguf_value, check_output, read_gguf, write_gguf
from .errors import LayerRangeError, VectorError

ARCH = "controlvector"
_KEY_PREFIX = "localsteer."
MAX_LAYERS = 1024  # far above any model's depth; a larger layer index in a file is damage, not a model


def parse_layers(spec: str, n_layer: int) -> tuple[int, ...]:
    """Layers named by "8-16", "12" or "4-6,10" (inclusive), checked against the model.

    Layer 0 has no control vector in llama.cpp, so valid layers are 1..n_layer-1.
    """
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise LayerRangeError(f"bad layer range {spec!r}: use e.g. 8-16 or 4-6,10") from None
        if a > b:
            raise LayerRangeError(f"bad layer range {spec!r}: {a} > {b}")
        if a < 1 or b > n_layer - 1:
            raise LayerRangeError(
                f"layer range {spec!r} is outside the model: steerable layers are 1-{n_layer - 1}")
        out.update(range(a, b + 1))
    if not out:
        raise LayerRangeError(f"bad layer range {spec!r}")
    return tuple(sorted(out))


def format_layers(layers: Iterable[int]) -> str:
    """The shortest "a-b,c" spelling of a set of layers."""
    ls = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        parts.append(str(ls[i]) if i == j else f"{ls[i]}-{ls[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class ControlVector:
    """Per-layer directions `(n_layer, n_embd)` float32; row `il` is added to layer il's output.

    Row 0 is always zero: llama.cpp has no control vector for layer 0.
    `arch` is the model architecture it was made for (llama, qwen2, ...); `meta` holds the rest
    (method, source model, dataset, suggested scale and layers, ...).
    """

    directions: np.ndarray
    arch: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        d = np.array(self.directions, dtype=np.float32, copy=True)
        if d.ndim != 2 or d.shape[0] < 2:
            raise VectorError(f"directions must be (n_layer, n_embd), got shape {d.shape}")
        if not np.isfinite(d).all():
            raise VectorError("the vector has NaN or infinite values (a scale too large for float32?)")
        d[0] = 0.0
        d.setflags(write=False)
        object.__setattr__(self, "directions", d)
        object.__setattr__(self, "meta", dict(self.meta))

    # shape
    @property
    def n_layer(self) -> int:
        return self.directions.shape[0]

    @property
    def n_embd(self) -> int:
        return self.directions.shape[1]

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers with a non-zero direction."""
        return tuple(int(i) for i in np.flatnonzero(np.any(self.directions != 0, axis=1)))

    def norms(self) -> np.ndarray:
        """L2 norm of each layer's direction, `(n_layer,)`."""
        return np.linalg.norm(self.directions, axis=1)

    @property
    def suggested_scale(self) -> float:
        return float(self.meta.get("scale", 1.0))

    @property
    def suggested_layers(self) -> tuple[int, ...] | None:
        spec = self.meta.get("layers")
        return parse_layers(spec, self.n_layer) if spec else None

    # arithmetic: vectors compose by weighted sum
    def _padded(self, n_layer: int) -> np.ndarray:
        if n_layer == self.n_layer:
            return self.directions
        out = np.zeros((n_layer, self.n_embd), dtype=np.float32)
        out[: self.n_layer] = self.directions
        return out

    def __add__(self, other: "ControlVector") -> "ControlVector":
        if isinstance(other, (int, float)) and other == 0:
            return self  # so that sum() works
        if not isinstance(other, ControlVector):
            return NotImplemented
        if other.n_embd != self.n_embd:
            raise VectorError(f"cannot add vectors of width {self.n_embd} and {other.n_embd}")
        if other.arch != self.arch:
            raise VectorError(f"cannot add a {self.arch} vector and a {other.arch} vector")
        n = max(self.n_layer, other.n_layer)
        meta = {k: v for k, v in self.meta.items() if k in ("model_name", "model_sha256", "n_layer")}
        meta["method"] = "sum"
        if "case" in (self.meta.get("reject_fold"), other.meta.get("reject_fold")):
            meta["reject_fold"] = "case"  # a mix with a case rewrite in it changes letter case (api.fold_for)
        return ControlVector(self._padded(n) + other._padded(n), self.arch, meta)

    __radd__ = __add__

    def __mul__(self, scale: float) -> "ControlVector":
        if not isinstance(scale, (int, float, np.floating)):
            return NotImplemented
        if not np.isfinite(scale):
            raise VectorError(f"scale {scale} is not a finite number")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported as a VectorError
            directions = self.directions * np.float32(scale)
        return replace(self, directions=directions)

    __rmul__ = __mul__

    def __neg__(self) -> "ControlVector":
        return self * -1.0

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        return self + (-other)

    def only_layers(self, layers: Iterable[int]) -> "ControlVector":
        """The same vector with every layer outside `layers` set to zero."""
        keep = np.zeros(self.n_layer, dtype=bool)
        keep[[i for i in layers if 0 < i < self.n_layer]] = True
        return replace(self, directions=np.where(keep[:, None], self.directions, 0.0),
                       meta={**self.meta, "layers": format_layers(np.flatnonzero(keep))})

    def with_meta(self, **meta: Any) -> "ControlVector":
        return replace(self, meta={**self.meta, **meta})

    def fit(self, arch: str, n_layer: int, n_embd: int, source: str = "vector") -> "ControlVector":
        """This vector shaped for a model, or a `VectorError` saying why it does not fit."""
        if self.n_embd != n_embd:
            raise VectorError(f"{source} has n_embd={self.n_embd} but the model has n_embd={n_embd}")
        if self.arch not in ("", "unknown") and arch and self.arch != arch:
            raise VectorError(f"{source} was made for a {self.arch} model, not {arch}")
        used = self.layers
        if used and used[-1] >= n_layer:
            raise VectorError(f"{source} steers layer {used[-1]} but the model has {n_layer} layers")
        out = np.zeros((n_layer, n_embd), dtype=np.float32)
        k = min(n_layer, self.n_layer)
        out[:k] = self.directions[:k]
        return replace(self, directions=out)

    # files
    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write a GGUF control vector llama.cpp loads with --control-vector; atomic."""
        path = Path(path)
        check_output(path, force)

        def fill(w) -> None:
            w.add_string(f"{ARCH}.model_hint", self.arch)
            w.add_int32(f"{ARCH}.layer_count", self.n_layer - 1)
            w.add_uint32(_KEY_PREFIX + "n_embd", self.n_embd)
            w.add_uint32(_KEY_PREFIX + "n_layer", self.n_layer)
            for k, v in sorted(self.meta.items()):
                if k in ("n_embd", "n_layer") or v is None:
                    continue
                add_gguf_value(w, _KEY_PREFIX + k, v)
            for il in range(1, self.n_layer):
                w.add_tensor(f"direction.{il}", np.ascontiguousarray(self.directions[il]))

        write_gguf(path, ARCH, fill)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ControlVector":
        """Read a GGUF control vector: ours, repeng's or llama.cpp cvector-generator's."""
        path = Path(path)
        reader, fields = read_gguf(path, VectorError, "vector")
        arch = fields.get("general.architecture")
        dirs: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            prefix, _, idx = t.name.partition(".")
            if prefix != "direction":
                continue
            if not idx.isdigit() or int(idx) == 0:
                raise VectorError(f"{path}: bad tensor name {t.name!r} (layers start at 1)")
            il = int(idx)
            if il >= MAX_LAYERS:
                raise VectorError(f"{path}: tensor {t.name!r} names layer {il}; no model has that many")
            data = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if not np.isfinite(data).all():
                raise VectorError(f"{path}: {t.name} has NaN or infinite values")
            dirs[il] = dirs.get(il, 0) + data  # several tensors for one layer are summed, as in llama.cpp
        if arch != ARCH and not dirs:
            if fields.get("general.type") == "adapter":
                raise VectorError(f"{path} is a LoRA adapter, not a control vector: load it with --lora")
            raise VectorError(f"{path} is a GGUF file but not a control vector (architecture {arch!r})")
        if not dirs:
            raise VectorError(f"{path} has no direction tensors")
        widths = {v.shape[0] for v in dirs.values()}
        if len(widths) != 1:
            raise VectorError(f"{path}: direction tensors have different sizes {sorted(widths)}")
        n_embd = widths.pop()
        meta = {k[len(_KEY_PREFIX):]: v for k, v in fields.items() if k.startswith(_KEY_PREFIX)}
        try:
            n_layer = max(int(meta.get("n_layer", 0)), max(dirs) + 1)
        except (TypeError, ValueError):
            raise VectorError(f"{path}: bad localsteer.n_layer {meta.get('n_layer')!r}") from None
        if n_layer > MAX_LAYERS:
            raise VectorError(f"{path}: localsteer.n_layer is {n_layer}; no model has that many layers")
        directions = np.zeros((n_layer, n_embd), dtype=np.float32)
        for il, v in dirs.items():
            directions[il] = v
        meta.setdefault("source_file", path.name)
        return cls(directions, str(fields.get(f"{ARCH}.model_hint", "") or ""), meta)
