"""Deterministic, IFEval-style checkers for instruction following, and the dataset helpers.

An instruction set (`vectors/datasets/instructions/<type>.jsonl`) holds one JSON object a line::

    {"prompt": str, "instruction": str, "split": "train" | "validation" | "test", "check": {...}}

`check` is the spec that `check(spec, text)` verifies a reply against. Every line of a file carries
the same spec (callers take the first line's). The types (`CHECKS`):

=============  ==============================  ==============================================
type           spec                            passes when the reply ...
=============  ==============================  ==============================================
lowercase      {"type": "lowercase"}           has at least one letter and no uppercase letter
uppercase      {"type": "uppercase"}           has at least one letter and no lowercase letter
json           {"type": "json"}                stripped, and with one surrounding markdown fence
                                               (```json ... ``` or ``` ... ```) removed, parses
                                               with `json.loads` into an object or an array
include_word   {"type": "include_word",        contains `word` as a whole word, any case
                "word": str}                   ("Wonderful," counts; "wonderfully" does not)
exclude_word   {"type": "exclude_word",        does not contain `word` as a whole word, any
                "word": str}                   case. Whole word only, as in IFEval: "Water"
                                               and "WATER!" fail; "waters", "watery" and
                                               "waterfall" pass (no stemming)
max_words      {"type": "max_words", "n": int} has 1 to `n` words (split on whitespace)
no_commas      {"type": "no_commas"}           is not blank and has no comma: neither ","
                                               nor the full-width "，" (U+FF0C)
=============  ==============================  ==============================================

Letters are Unicode letters (`str.isalpha`, `str.isupper`, `str.islower`), so "É" is uppercase.

Task fidelity (`vectors/datasets/tasks.jsonl`, lines `{"question": str, "answers": [str, ...]}`):
`task_correct(answers, text)` is true when any acceptable answer occurs in the reply. A numeric
answer ("56", "3.5", "1,000") must occur as a whole number ("56" matches "is 56." but not "156",
"5.6" or "56,000"; "1000" matches "1,000"). Any other answer is matched case-insensitively and must
not run into neighbouring letters or digits ("eight" matches "Eight legs." but not "eighteen";
"Paris" matches "Paris's" but not "Parisian").
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable

from ..dataset import read_jsonl
from ..errors import DatasetError

SPLITS = ("train", "validation", "test")

_FENCE = re.compile(r"\A```[ \t]*[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL)
_NUMBER_ANSWER = re.compile(r"\A\d{1,3}(?:,\d{3})+(?:\.\d+)?\Z|\A\d+(?:\.\d+)?\Z")
# A number in a reply: digits, optional thousands groups ("1,000"), optional decimals.
_NUMBER_IN_TEXT = re.compile(r"(?<![\d.])\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")


def _has_letter(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _lowercase(spec: dict, text: str) -> bool:
    """At least one letter and no uppercase letter."""
    return _has_letter(text) and not any(c.isupper() for c in text)


def _uppercase(spec: dict, text: str) -> bool:
    """At least one letter and no lowercase letter."""
    return _has_letter(text) and not any(c.islower() for c in text)


def strip_fence(text: str) -> str:
    """`text` stripped, without one markdown code fence around all of it (```json ... ```)."""
    text = text.strip()
    m = _FENCE.match(text)
    return m.group(1).strip() if m else text


def _json(spec: dict, text: str) -> bool:
    """The (unfenced) reply parses as a JSON object or array."""
    try:
        value = json.loads(strip_fence(text))
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(value, (dict, list))


def _word_re(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def _include_word(spec: dict, text: str) -> bool:
    """`spec["word"]` occurs as a whole word, any case."""
    return _word_re(spec["word"]).search(text) is not None


def _exclude_word(spec: dict, text: str) -> bool:
    """`spec["word"]` does not occur as a whole word, any case (inflections are not checked)."""
    return _word_re(spec["word"]).search(text) is None


def _max_words(spec: dict, text: str) -> bool:
    """1 to `spec["n"]` whitespace-separated words."""
    return 1 <= len(text.split()) <= spec["n"]


def _no_commas(spec: dict, text: str) -> bool:
    """Not blank, and no "," or "，"."""
    return bool(text.strip()) and "," not in text and "\uff0c" not in text


Checker = Callable[[dict, str], bool]

#: type -> (checker, the spec's extra keys and their types)
CHECKS: dict[str, tuple[Checker, dict[str, type]]] = {
    "lowercase": (_lowercase, {}),
    "uppercase": (_uppercase, {}),
    "json": (_json, {}),
    "include_word": (_include_word, {"word": str}),
    "exclude_word": (_exclude_word, {"word": str}),
    "max_words": (_max_words, {"n": int}),
    "no_commas": (_no_commas, {}),
}


def validate_spec(spec: object) -> dict:
    """`spec` if it is a well-formed check spec, else ValueError saying what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError("a check spec must be a JSON object")
    kind = spec.get("type")
    if kind not in CHECKS:
        raise ValueError(f"unknown check type {kind!r} (known: {', '.join(CHECKS)})")
    for key, typ in CHECKS[kind][1].items():
        value = spec.get(key)
        if typ is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"check {kind!r} needs {key!r}: a positive integer")
        elif not isinstance(value, str) or not value.strip():
            raise ValueError(f"check {kind!r} needs {key!r}: a non-empty string")
    return spec


def check(spec: dict, text: str) -> bool:
    """Whether `text` (a model reply) satisfies `spec`; ValueError for an unknown or malformed spec."""
    validate_spec(spec)
    return CHECKS[spec["type"]][0](spec, text)


def _is_number(s: str) -> bool:
    return _NUMBER_ANSWER.match(s) is not None


def _number(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def task_correct(answers: Iterable[str], text: str) -> bool:
    """Whether any acceptable answer occurs in `text` (numbers as whole numbers, other answers
    case-insensitively and not inside a longer word; see the module docstring)."""
    numbers: list[Decimal] | None = None
    for answer in answers:
        answer = answer.strip()
        if not answer:
            continue
        if _is_number(answer):
            if numbers is None:
                numbers = [n for n in map(_number, _NUMBER_IN_TEXT.findall(text)) if n is not None]
            if _number(answer) in numbers:
                return True
        else:
            lead = r"(?<![^\W_])" if answer[0].isalnum() else ""
            tail = r"(?![^\W_])" if answer[-1].isalnum() else ""
            if re.search(lead + re.escape(answer) + tail, text, re.IGNORECASE):
                return True
    return False


def _text_field(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string")
    return value


def load_instruction_set(path: str | os.PathLike) -> list[dict]:
    """The lines of an instruction set, each `{"prompt", "instruction", "split", "check"}`.

    DatasetError (with file:line) for a missing or empty file, a line that is not a JSON object,
    a missing or empty prompt or instruction, an unknown split, a malformed check spec, or a check
    spec that differs from the first line's.
    """
    items: list[dict] = []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        prompt = _text_field(obj, "prompt", where)
        instruction = _text_field(obj, "instruction", where)
        split_name = obj.get("split")
        if split_name not in SPLITS:
            raise DatasetError(f"{where}: 'split' must be one of {', '.join(SPLITS)}")
        try:
            spec = validate_spec(obj.get("check"))
        except ValueError as e:
            raise DatasetError(f"{where}: 'check': {e}") from None
        if items and spec != items[0]["check"]:
            raise DatasetError(f"{where}: 'check' differs from the first line's "
                               f"({json.dumps(items[0]['check'])}); one check per file")
        items.append({"prompt": prompt, "instruction": instruction, "split": split_name, "check": spec})
    return items


def split(items: Iterable[dict], name: str) -> list[dict]:
    """The items of one split ("train", "validation" or "test"), in file order (may be empty);
    ValueError for another name."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r} (known: {', '.join(SPLITS)})")
    return [it for it in items if it.get("split") == name]


def load_tasks(path: str | os.PathLike) -> list[dict]:
    """The task-fidelity questions, each `{"question": str, "answers": [str, ...]}`; DatasetError
    (with file:line) for a malformed line."""
    tasks: list[dict] = []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        question = _text_field(obj, "question", where)
        answers = obj.get("answers")
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise DatasetError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
        tasks.append({"question": question, "answers": answers})
    return tasks
