"""What `localsteer chat` was asked for on the command line, as one value the app starts from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from localsteer import api
from localsteer.api import Sampling


@dataclass(frozen=True)
class ChatOptions:
    """Options of one chat session.

    `vectors` are `PATH[:SCALE]` specs switched on at the start; the panel also lists the shipped
    vectors for the model (`shipped_dir/<model name>/*.gguf`) and the user's (`user_dir`), off.
    `adapters` (e.g. the refusal ablation of `localsteer refusal direction`) stay on all session:
    plain and steered replies both come from the adapted model. `when` is a probe file (`localsteer
    probe train`): a turn is steered only if the probe flags its prompt. `instruction` is pinned as
    the system prompt; `amplify` starts with DIRECTER amplifying it (`directer`: its settings).
    """

    model: str = api.DEFAULT_MODEL
    vectors: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()  # LoRA adapters `PATH[:SCALE]`, part of the model on both sides
    when: str | None = None  # a probe file: steer only the turns it flags
    layers: str | None = None
    reject_topk: int | None = None
    instruction: str = ""
    amplify: bool = False
    directer: api.Directer = field(default_factory=api.Directer)
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=api.sampling_config)
    threads: int | None = None
    gpu_layers: int = 999
    user_dir: Path = field(default_factory=lambda: api.home() / "vectors")
    shipped_dir: Path = field(default_factory=api.shipped.root)
    datasets_dir: Path = field(default_factory=api.shipped.datasets)

    @property
    def model_label(self) -> str:
        """The model as the user named it: a known name, or the file's name."""
        return self.model if self.model in api.KNOWN_MODELS else Path(self.model).name
