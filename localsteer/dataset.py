"""Contrastive datasets: JSONL files of prompt pairs that differ only in the trait to steer.

Two line shapes are accepted:

- `{"positive": str, "negative": str}`: two user messages (e.g. two personas, same request);
- `{"prompt": str, "instruction": str}`: the prompt with the instruction appended (positive)
  and the prompt alone (negative), as in instruction vectors.

Either may carry `"assistant": str`, the start of a reply shared by both sides (repeng's
"truncated continuation"); activations are then read inside the reply.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str
    assistant: str = ""


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    return [_pair(obj, where) for where, obj in read_jsonl(path, "pairs")]


def _pair(obj: object, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object")

    def text(key: str, required: bool = True) -> str:
        v = obj.get(key, "")
        if not isinstance(v, str) or (required and not v.strip()):
            raise DatasetError(f"{where}: {key!r} must be a non-empty string")
        return v

    assistant = text("assistant", required=False)
    if "positive" in obj or "negative" in obj:
        return Pair(text("positive"), text("negative"), assistant)
    if "prompt" in obj or "instruction" in obj:
        prompt, instruction = text("prompt"), text("instruction")
        return Pair(f"{prompt} {instruction}", prompt, assistant)
    raise DatasetError(f"{where}: needs 'positive'/'negative' or 'prompt'/'instruction'")


def same_sides(pair: Pair) -> bool:
    """Whether a pair's two sides are the same text up to spacing and letter case: such a pair
    contrasts nothing, and its difference is rounding noise."""
    def norm(text: str) -> str:
        return " ".join(text.split()).casefold()
    return norm(pair.positive) == norm(pair.negative)


SPLITS = ("train", "validation", "test")


def read_jsonl(path: str | os.PathLike, items: str = "lines") -> list[tuple[str, object]]:
    """(where, parsed object) for each non-blank line; DatasetError for a missing, non-UTF-8 or
    empty file ("has no <items>"), or a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DatasetError(f"{path} has no {items}")
    return rows


def load_split_prompts(path: str | os.PathLike) -> dict[str, list[str]]:
    """Prompts of a JSONL file of `{"prompt": str, "split": "train"|"validation"|"test"}` lines
    (e.g. the refusal requests), by split."""
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for where, obj in read_jsonl(path):
        try:
            prompt = obj["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise TypeError
            by_split[obj["split"]].append(prompt)
        except (KeyError, TypeError):
            raise DatasetError(f"{where}: expected {{\"prompt\", \"split\": train|validation|test}}") from None
    return by_split
