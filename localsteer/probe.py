"""Linear probes on prompt activations, and the gate that steers only when a probe fires
(selective steering, as in CAST; docs/methods.md, "Probes and gated steering").

A probe reads the residual stream after one layer, averaged over the prompt's last tokens (the
chat template's tokens after the user message, where the model has read the whole request and
is about to answer), and says how likely the prompt belongs to the target class:
`sigmoid(w · x + b) >= threshold`.

Training (`train`): activations of every layer for the positive and negative prompts (one
llama.cpp pass, `activations.collect`), a logistic regression per layer, the layer and threshold
with the best cross-validated accuracy on train + validation, and precision / recall / accuracy on
the test split, stored in the file.

File: GGUF, architecture `probe`: tensor `probe.weight` (n_embd, f32); keys `probe.layer`,
`probe.bias`, `probe.threshold`, `probe.model_hint` (architecture), `probe.n_layer`,
`probe.n_embd`, `probe.positions`, and `localsteer.*` for the measured figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .activations import Progress, collect
from .errors import DatasetError, ProbeError
from .fileio import add_gguf_value, check_output, read_gguf, write_gguf
from .linear import log_loss, logistic_fit, sigmoid
from .runtime import Model
from .vector import MAX_LAYERS

ARCH = "probe"
_META = "localsteer."


@dataclass(frozen=True)
class Scores:
    """How a probe's decisions match the labels of a set of prompts."""

    accuracy: float
    precision: float
    recall: float
    n: int

    @classmethod
    def of(cls, fired: np.ndarray, labels: np.ndarray) -> "Scores":
        fired, labels = np.asarray(fired, bool), np.asarray(labels, bool)
        tp = int(np.sum(fired & labels))
        precision = tp / int(fired.sum()) if fired.any() else 1.0
        recall = tp / int(labels.sum()) if labels.any() else 1.0
        return cls(float(np.mean(fired == labels)), precision, recall, len(labels))

    def line(self) -> str:
        return f"accuracy {self.accuracy:.1%}, precision {self.precision:.1%}, recall {self.recall:.1%} (n={self.n})"


@dataclass(frozen=True)
class Probe:
    weight: np.ndarray  # (n_embd,) float32
    bias: float
    threshold: float  # on the probability
    layer: int  # the residual stream after this layer (llama.cpp's l_out-<layer>)
    arch: str
    n_layer: int
    positions: int = 1  # read: the mean over the prompt's last `positions` tokens
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return int(self.weight.shape[0])

    def probability(self, activations: np.ndarray) -> np.ndarray:
        """P(target) for activations `(n, n_embd)` at the probe's layer."""
        return sigmoid(np.asarray(activations, dtype=np.float64) @ self.weight.astype(np.float64) + self.bias)

    def check_fits(self, model: Model, source: str = "probe") -> None:
        if self.n_embd != model.n_embd:
            raise ProbeError(f"{source} has n_embd={self.n_embd} but the model has n_embd={model.n_embd}")
        if self.arch and model.arch and self.arch != model.arch:
            raise ProbeError(f"{source} was made for a {self.arch} model, not {model.arch}")
        if self.layer >= model.n_layer:
            raise ProbeError(f"{source} reads layer {self.layer} but the model has {model.n_layer} layers")
        if self.n_layer != model.n_layer:
            raise ProbeError(f"{source} was made for a model with {self.n_layer} layers, not {model.n_layer}")

    def prompt_probability(self, model: Model, prompts: Sequence[Sequence[int]],
                           progress: Progress | None = None) -> np.ndarray:
        """P(target) of each token-id prompt, read through llama.cpp."""
        acts = collect(model, prompts, layers=[self.layer], last_n=self.positions, progress=progress)[:, self.layer]
        return self.probability(acts)

    def with_meta(self, **meta: Any) -> "Probe":
        return replace(self, meta={**self.meta, **meta})

    # files
    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        path = Path(path)
        check_output(path, force)

        def fill(w) -> None:
            w.add_string(f"{ARCH}.model_hint", self.arch)
            w.add_uint32(f"{ARCH}.layer", self.layer)
            w.add_uint32(f"{ARCH}.n_layer", self.n_layer)
            w.add_uint32(f"{ARCH}.n_embd", self.n_embd)
            w.add_uint32(f"{ARCH}.positions", self.positions)
            w.add_float32(f"{ARCH}.bias", float(self.bias))
            w.add_float32(f"{ARCH}.threshold", float(self.threshold))
            for k, v in sorted(self.meta.items()):
                if v is not None:
                    add_gguf_value(w, _META + k, v)
            w.add_tensor(f"{ARCH}.weight", np.ascontiguousarray(self.weight, dtype=np.float32))

        return write_gguf(path, ARCH, fill)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Probe":
        path = Path(path)
        reader, fields = read_gguf(path, ProbeError, "probe")
        if fields.get("general.architecture") != ARCH:
            raise ProbeError(f"{path} is a GGUF file but not a probe (architecture "
                             f"{fields.get('general.architecture')!r}): make one with `localsteer probe train`")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
        try:
            weight = tensors[f"{ARCH}.weight"]
            layer, bias, threshold = (fields[f"{ARCH}.{k}"] for k in ("layer", "bias", "threshold"))
            n_layer = int(fields.get(f"{ARCH}.n_layer") or layer + 1)
            positions = int(fields.get(f"{ARCH}.positions") or 1)
        except KeyError as e:
            raise ProbeError(f"{path}: missing {e.args[0]}") from None
        if not (np.isfinite(weight).all() and np.isfinite([bias, threshold]).all()):
            raise ProbeError(f"{path}: the probe has NaN or infinite values")
        if not 0 <= int(layer) < n_layer <= MAX_LAYERS or not 1 <= positions <= 4096:
            raise ProbeError(f"{path}: layer {layer} of {n_layer}, {positions} positions: not a probe for any model")
        meta = {k[len(_META):]: v for k, v in fields.items() if k.startswith(_META)}
        meta.setdefault("source_file", path.name)
        return cls(weight.copy(), float(bias), float(threshold), int(layer),
                   str(fields.get(f"{ARCH}.model_hint") or ""), n_layer, positions, meta)


# --- training -----------------------------------------------------------------------------------

@dataclass
class Training:
    probe: Probe
    cv_accuracy: list[float]  # per layer, cross-validated on train + validation (NaN: layer 0)
    validation: Scores  # out-of-fold decisions at the chosen layer and threshold
    test: Scores | None

    def report(self) -> str:
        best = self.probe.layer
        lines = ["cross-validated accuracy by layer: " + " ".join(
            f"{il}:{a:.0%}" + ("*" if il == best else "") for il, a in enumerate(self.cv_accuracy) if not np.isnan(a))]
        lines.append(f"layer {best}, mean of the last {self.probe.positions} prompt tokens, "
                     f"threshold {self.probe.threshold:.2f}")
        lines.append(f"cross-validation (train + validation): {self.validation.line()}")
        if self.test is not None:
            lines.append(f"test: {self.test.line()}")
        return "\n".join(lines)


def best_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold on probabilities with the best accuracy; among ties, the one nearest 0.5."""
    ps = np.sort(p)
    cands = np.unique(np.concatenate([[0.5], (ps[1:] + ps[:-1]) / 2]))
    accs = np.array([np.mean((p >= t) == (y == 1)) for t in cands])
    best = cands[accs >= accs.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, l2: float) -> np.ndarray:
    """Each sample's probability from the classifier fitted on the other folds."""
    p = np.zeros(len(y))
    for f in np.unique(folds):
        held = folds == f
        w, b = logistic_fit(x[~held], y[~held], l2)
        p[held] = sigmoid(x[held].astype(np.float64) @ w + b)
    return p


def train(model: Model, positive: Mapping[str, Sequence[str]], negative: Mapping[str, Sequence[str]],
          template: Callable[[str], list[int]], positions: int = 1, name: str = "", l2: float = 1e-2,
          n_folds: int = 5, progress: Progress | None = None) -> Training:
    """A probe separating `positive` from `negative` prompts (dicts split -> prompts; `template`
    turns a prompt into token ids), reading the mean of the last `positions` tokens.

    The data are small (a few hundred prompts), so one validation split picks layers by noise:
    the layer and threshold are chosen by `n_folds`-fold cross-validation on train + validation
    together, the probe is then fitted on both and scored on test."""
    fit_pos = [p for s in ("train", "validation") for p in positive.get(s, ())]
    fit_neg = [p for s in ("train", "validation") for p in negative.get(s, ())]
    if len(fit_pos) < n_folds or len(fit_neg) < n_folds:
        raise DatasetError(f"a probe needs at least {n_folds} positive and {n_folds} negative prompts "
                           "in the train and validation splits")
    test_pos, test_neg = list(positive.get("test", ())), list(negative.get("test", ()))
    texts = fit_pos + fit_neg + test_pos + test_neg
    acts = collect(model, [template(t) for t in texts], last_n=positions, progress=progress)
    n_fit = len(fit_pos) + len(fit_neg)
    x, x_test = acts[:n_fit], acts[n_fit:]
    y = np.array([1.0] * len(fit_pos) + [0.0] * len(fit_neg))
    y_test = np.array([1.0] * len(test_pos) + [0.0] * len(test_neg))
    # stratified folds, fixed seed: the same data give the same probe
    folds = np.empty(n_fit, dtype=int)
    rng = np.random.default_rng(0)
    for cls in (1.0, 0.0):
        idx = np.flatnonzero(y == cls)
        folds[rng.permutation(idx)] = np.arange(len(idx)) % n_folds
    cv = [float("nan")]
    oof: dict[int, np.ndarray] = {}
    for il in range(1, model.n_layer):
        oof[il] = out_of_fold(x[:, il], y, folds, l2)
        cv.append(float(np.mean((oof[il] >= 0.5) == (y == 1))))
    layer = min(range(1, model.n_layer), key=lambda il: (-cv[il], log_loss(oof[il], y)))
    threshold = best_threshold(oof[layer], y)
    w, b = logistic_fit(x[:, layer], y, l2)
    probe = Probe(w.astype(np.float32), b, threshold, layer, model.arch, model.n_layer, positions)
    validation = Scores.of(oof[layer] >= threshold, y)
    test = None
    if test_pos and test_neg:
        test = Scores.of(probe.probability(x_test[:, layer]) >= threshold, y_test)
    meta: dict[str, Any] = {"name": name, "model": model.info.name, "cv_accuracy": validation.accuracy,
                            "n_fit": int(n_fit)}
    if test is not None:
        meta.update(test_accuracy=test.accuracy, test_precision=test.precision, test_recall=test.recall,
                    n_test=test.n)
    return Training(probe.with_meta(**meta), cv, validation, test)


# --- gating -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    probability: float
    threshold: float

    @property
    def steer(self) -> bool:
        return self.probability >= self.threshold

    def describe(self) -> str:
        rel = ">=" if self.steer else "<"
        return f"probe p={self.probability:.2f} {rel} {self.threshold:.2f}: steering {'on' if self.steer else 'off'}"

    def as_dict(self) -> dict:
        return {"probability": round(self.probability, 4), "threshold": round(self.threshold, 4),
                "steer": self.steer}


class Gate:
    """Decides per prompt (per conversation turn) whether steering applies: the probe's
    probability on the prompt's tokens, read on the plain model."""

    def __init__(self, model: Model, probe: Probe, source: str = "probe"):
        probe.check_fits(model, source)
        self.model = model
        self.probe = probe

    def decide(self, prompt: Sequence[int]) -> Decision:
        p = float(self.probe.prompt_probability(self.model, [list(prompt)])[0])
        return Decision(p, self.probe.threshold)
