"""Refusal, both ways (docs/methods.md, "Refusal direction, ablation and INLP"): the
difference-in-means direction chosen on validation prompts (`direction`), its directional
ablation and INLP written as GGUF LoRA adapters (`lora`), and the table that measures every
intervention (`table`)."""

from .direction import *  # noqa: F401,F403  (localsteer.refusal.X names what direction.py defines)
