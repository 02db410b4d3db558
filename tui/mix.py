"""The steering the user dials in on the panel: which vectors at what strengths, on which layers,
with or without rejection; how it reaches the generation worker; and how it is exported."""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

from localsteer import api
from localsteer.api import ControlVector, LocalsteerError, Model, Rejection, format_layers


@dataclass(frozen=True)
class MixSettings:
    """What the panel shows: the vectors switched on with their strengths, the layer range
    (e.g. "7-24"), rejection on/off and its top-k, the pinned instruction (the system prompt)
    and whether DIRECTER amplifies it."""

    parts: tuple[tuple[Path, float], ...] = ()
    layers: str = ""
    reject: bool = False
    topk: int = 20
    instruction: str = ""
    amplify: bool = False

    def specs(self) -> list[str]:
        return [f"{path}:{scale!r}" for path, scale in self.parts]


@dataclass(frozen=True)
class Choice:
    """A mix resolved against the model: what the worker passes to `Steerer.configure`."""

    steering: api.Steering
    rejection: Rejection | None
    instruction: str = ""  # the system prompt
    directer: api.Directer | None = None  # amplify the instruction (DIRECTER), with these settings

    def describe(self) -> str:
        text = "no steering" if self.steering.vector is None else self.steering.describe()
        if self.directer is not None:
            text = f"DIRECTER x{self.directer.alpha:g} on the instruction" + (
                "" if self.steering.vector is None else f" + {text}")
            return text  # DIRECTER's own test, not the panel's rejection
        if self.rejection is None:
            return text
        return text + f"; reject top-{self.rejection.topk}" + (", up to case" if self.rejection.fold != "none" else "")


PLAIN = Choice(api.Steering(None, ()), None)


def choose(model: Model, settings: MixSettings, directer: api.Directer = api.Directer()) -> Choice:
    """The mix for `model`; raises `LocalsteerError` (bad layers, a vector that does not fit)
    or `ValueError` (bad top-k). `directer`: DIRECTER's settings, used when the instruction is
    amplified."""
    steering = api.steering_from_specs(model, settings.specs(), settings.layers or None)
    # case-rewrite vectors ask for plausibility up to letter case (as `generate --reject-fold auto`)
    fold = api.fold_for(settings.specs(), model) if settings.reject and settings.parts else "none"
    instruction = settings.instruction.strip()
    return Choice(steering, api.rejection_config(settings.topk if settings.reject else None, fold=fold),
                  instruction, directer if settings.amplify and instruction else None)


class Mailbox:
    """The latest `Choice` the UI asked for. The UI puts; the generation worker takes it between
    two tokens, so `Steerer.configure` is only ever called from the worker's thread."""

    def __init__(self, choice: Choice = PLAIN):
        self._lock = threading.Lock()
        self._choice = choice
        self._version = 0

    def put(self, choice: Choice) -> None:
        with self._lock:
            self._choice = choice
            self._version += 1

    def latest(self) -> tuple[int, Choice]:
        with self._lock:
            return self._version, self._choice

    def newer(self, version: int) -> tuple[int, Choice] | None:
        """The latest choice if it changed since `version`."""
        with self._lock:
            return (self._version, self._choice) if self._version != version else None


def export(choice: Choice, path: Path, force: bool = False) -> ControlVector:
    """Bake the mix (strengths and layers) into one GGUF control vector at `path`."""
    steering = choice.steering
    if steering.vector is None:
        raise ValueError("switch on at least one vector to export a mix")
    specs = [f"{p}:{s!r}" for p, s in steering.parts]
    baked = api.bake(specs, 1.0, format_layers(steering.layers))
    baked.save(path, force=force)
    return baked


def llama_cpp_commands(model_path: Path, choice: Choice, baked: Path) -> list[str]:
    """llama.cpp command lines that steer like this mix: the baked file, and (when the layers
    are one contiguous range) the original files with their scales."""
    q = shlex.quote
    lines = [f"llama-cli -m {q(str(model_path))} --control-vector {q(str(baked))}"]
    layers = choice.steering.layers
    if layers and layers[-1] - layers[0] + 1 == len(layers):
        scaled = " ".join(f"--control-vector-scaled {q(f'{p}:{s:g}')}" for p, s in choice.steering.parts)
        lines.append(f"llama-cli -m {q(str(model_path))} {scaled} "
                     f"--control-vector-layer-range {layers[0]} {layers[-1]}")
    return lines


def stored_kl(model: Model, settings: MixSettings) -> float | None:
    """The benign KL a lone vector's file carries (`localsteer kl --save`), when the panel has it
    at the scale, on the model and on the layers it was measured with; else None."""
    if len(settings.parts) != 1:
        return None
    path, scale = settings.parts[0]
    try:
        v = ControlVector.load(path)
    except LocalsteerError:
        return None
    meta = v.meta
    if meta.get("benign_kl") is None or meta.get("benign_kl_model") != model.info.name:
        return None
    if abs(float(meta.get("benign_kl_scale", float("nan"))) - scale) > 1e-6:
        return None
    layers = v.suggested_layers or v.layers
    if settings.layers and settings.layers != format_layers(layers):
        return None
    return float(meta["benign_kl"])
