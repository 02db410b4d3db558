"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models",
arXiv 2311.07911): its 541 prompts and their scoring, to measure steering methods on a public
benchmark (`localsteer eval --benchmark ifeval`).

The prompts ship as `vectors/datasets/ifeval/input_data.jsonl` (Apache-2.0, Google; see the
README beside it). Each line is::

    {"key": int, "prompt": str, "instruction_id_list": [str, ...], "kwargs": [{...}, ...]}

with one kwargs object per instruction. The checkers are not written here: `score` uses the
IFEval checkers as packaged by `if-verifiable` (the extra `pip install 'localsteer[ifeval]'`),
through `if_verifiable.ifeval.instructions_registry` only. Each instruction is built as in the
official `evaluation_lib`: `INSTRUCTION_DICT[id](id)`, `build_description(**kwargs)` (None values
dropped), and `build_description(prompt=...)` again when its args name a prompt; then

- strict: the response is not blank and `check_following(response)` holds;
- loose: that holds for any of 8 variants of the response: as is, without its first line,
  without its last line, without both (each stripped), and each of these with every `*` removed
  (`if_verifiable.common.get_loose_transformations`, the official list).

A prompt passes when all its instructions pass; `summary` gives IFEval's four accuracies.
Unlike `if_verifiable.common.evaluate_instructions`, an unknown instruction id is an error (not
skipped), and no `<think>` block is stripped: the response is scored as given.

Two things are set on the scorer when it is first used (`score`), not at import (importing
if_verifiable imports HF `datasets`, about a second), so that `load_prompts` and
`stratified_sample` need neither the extra nor that time:

- nltk data. IFEval counts sentences with nltk's trained English Punkt model and splits words
  with `nltk.word_tokenize` (which sentence-splits with the same model); both need the nltk data
  package "punkt_tab", a download localsteer does not make. An untrained
  `nltk.tokenize.punkt.PunktSentenceTokenizer()` stands in for the model: it ends a sentence at
  `.`, `?` or `!` before whitespace, as the model does, but knows no abbreviations, so "Mr. Smith"
  or "e.g. this" counts one sentence more than with the trained model. Patched,
  always (so scores do not depend on what nltk data a machine happens to have), and only inside
  `if_verifiable.ifeval.instructions_util`: its `_get_sentence_tokenizer` (used by
  `count_sentences`, for length_constraints:number_sentences) returns the untrained tokenizer,
  and its module global `nltk` becomes a view of nltk whose `word_tokenize` is that tokenizer
  followed by `nltk.tokenize.NLTKWordTokenizer` (nltk's own recipe; used by
  change_case:capital_word_frequency). nltk itself is not modified.
- langdetect (language:response_language, change_case:english_capital/_lowercase) is random
  unless seeded; `langdetect.DetectorFactory.seed` is set to 0 so that a response always gets the
  same score (the official code does not seed it).
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

from .. import shipped
from ..dataset import read_jsonl
from ..errors import DatasetError, LocalsteerError

SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"  # the shipped file
N_PROMPTS = 541


class IfevalExtraMissing(LocalsteerError):
    """if-verifiable (the IFEval checkers) is not installed."""


def default_path() -> Path:
    return shipped.datasets() / "ifeval" / "input_data.jsonl"


def load_prompts(path: str | os.PathLike | None = None) -> list[dict]:
    """The IFEval prompts (default: the shipped 541), in file order. DatasetError for a missing or
    malformed file or line."""
    rows = []
    for where, obj in read_jsonl(default_path() if path is None else path, "prompts"):
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object")
        ids, kwargs = obj.get("instruction_id_list"), obj.get("kwargs")
        if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise DatasetError(f"{where}: 'instruction_id_list' must be a non-empty list of strings")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise DatasetError(f"{where}: 'kwargs' must be a list of objects, one per instruction")
        rows.append(obj)
    return rows


_scorer_cache: tuple | None = None


def _scorer() -> tuple:
    """(INSTRUCTION_DICT, get_loose_transformations), imported and patched once."""
    global _scorer_cache
    if _scorer_cache is None:
        try:
            import langdetect
            import nltk
            from if_verifiable.common import get_loose_transformations
            from if_verifiable.ifeval import instructions_util
            from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        except ImportError:
            raise IfevalExtraMissing("scoring IFEval needs the if-verifiable package: "
                                     "pip install 'localsteer[ifeval]'") from None
        _patch_nltk(instructions_util, nltk)
        langdetect.DetectorFactory.seed = 0
        _scorer_cache = (INSTRUCTION_DICT, get_loose_transformations)
    return _scorer_cache


class _NltkView:
    """nltk as `instructions_util` sees it: everything nltk has, but `word_tokenize` on `sentences`."""

    def __init__(self, nltk, sentences):
        self._nltk = nltk
        self._sentences = sentences
        self._words = nltk.tokenize.NLTKWordTokenizer()

    def word_tokenize(self, text, language="english", preserve_line=False):
        sents = [text] if preserve_line else self._sentences.tokenize(text)
        return [token for sent in sents for token in self._words.tokenize(sent)]

    def __getattr__(self, name):
        return getattr(self._nltk, name)


def _patch_nltk(instructions_util, nltk) -> None:
    sentences = nltk.tokenize.punkt.PunktSentenceTokenizer()  # untrained: needs no nltk data
    instructions_util._get_sentence_tokenizer = lambda: sentences
    instructions_util.nltk = _NltkView(nltk, sentences)


def score(row: dict, response: str) -> dict:
    """{"strict": [bool], "loose": [bool]}: whether `response` follows each instruction of the IFEval
    prompt `row` (a line of `load_prompts`), in the order of its `instruction_id_list`."""
    registry, loose_variants = _scorer()
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if len(ids) != len(kwargs):
        raise DatasetError(f"IFEval prompt {row.get('key')}: {len(ids)} instructions but {len(kwargs)} kwargs")
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kw in zip(ids, kwargs):
        cls = registry.get(instruction_id)
        if cls is None:
            raise DatasetError(f"IFEval prompt {row.get('key')}: unknown instruction {instruction_id!r}")
        checker = cls(instruction_id)
        checker.build_description(**{k: v for k, v in kw.items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=row["prompt"])
        strict.append(bool(response.strip() and checker.check_following(response)))
        loose.append(any(v.strip() and checker.check_following(v) for v in variants))
    return {"strict": strict, "loose": loose}


def summary(scored: list[dict]) -> dict:
    """IFEval's four accuracies over the results of `score`: prompt-level (a prompt passes when all
    its instructions pass) and instruction-level (share of all instructions), strict and loose."""
    if not scored:
        raise ValueError("no scored prompts")
    n = len(scored)
    n_instructions = sum(len(s["strict"]) for s in scored)
    if n_instructions == 0:
        raise ValueError("the scored prompts have no instructions")
    return {
        "prompt_strict": sum(all(s["strict"]) for s in scored) / n,
        "prompt_loose": sum(all(s["loose"]) for s in scored) / n,
        "instruction_strict": sum(sum(s["strict"]) for s in scored) / n_instructions,
        "instruction_loose": sum(sum(s["loose"]) for s in scored) / n_instructions,
        "n_prompts": n,
        "n_instructions": n_instructions,
    }


def stratified_sample(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A fixed sample of `n` of `rows` that keeps each stratum's share, the stratum of a prompt being
    its first instruction id. Stratum quotas are n * size / len(rows), rounded down, and the prompts
    left over go to the largest remainders (ties: larger stratum, then id); within a stratum the
    prompts are drawn with random.Random(seed). Same rows, n and seed, same sample; returned in the
    order of `rows`."""
    if not 0 < n <= len(rows):
        raise ValueError(f"cannot sample {n} of {len(rows)} prompts")
    strata: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        strata[row["instruction_id_list"][0]].append(i)
    total = len(rows)
    quota = {sid: n * len(idx) // total for sid, idx in strata.items()}
    left = n - sum(quota.values())
    by_remainder = sorted(strata, key=lambda sid: (-(n * len(strata[sid]) % total), -len(strata[sid]), sid))
    for sid in by_remainder[:left]:
        quota[sid] += 1
    rng = random.Random(seed)
    chosen = []
    for sid in sorted(strata):
        chosen += rng.sample(strata[sid], quota[sid])
    return [rows[i] for i in sorted(chosen)]
