"""Letter case for rejection's folds ("case", "recase"; docs/methods.md, "Plausibility up to
letter case"): which tokens are the same text up to case, how a word is spelled in lowercase,
capitalised or in capitals (in one token or in pieces), and which spelling a steered
distribution prefers. Everything here is computed once per model and cached."""

from __future__ import annotations

import weakref

import numpy as np

from .runtime import Model
from .sampling import softmax, top_indices

_fold_cache: "weakref.WeakKeyDictionary[Model, tuple[list[str], np.ndarray]]" = weakref.WeakKeyDictionary()
_fold_starts: "weakref.WeakKeyDictionary[Model, dict[int, tuple[int, ...]]]" = weakref.WeakKeyDictionary()
_spellings: "weakref.WeakKeyDictionary[Model, dict[int, list[tuple[int, ...]]]]" = weakref.WeakKeyDictionary()
EXTENSION_TOP = 256  # the plain tokens searched for extensions of a steered word piece ("recase")


def _folded(model: Model) -> tuple[list[str], np.ndarray]:
    cached = _fold_cache.get(model)
    if cached is None:
        texts = [model.piece(t).decode("utf-8", "replace").casefold() for t in range(model.n_vocab)]
        ids: dict[str, int] = {}
        classes = np.array([ids.setdefault(text, len(ids)) for text in texts], dtype=np.int64)
        cached = _fold_cache[model] = (texts, classes)
    return cached


def _text_tokens(model: Model, text: str) -> list[int]:
    """`text` as the tokenizer writes it, without a BOS token."""
    toks = model.tokenize(text, special=False)
    bos = model.bos_token
    return toks[1:] if toks and bos is not None and toks[0] == bos else toks


def _capitalized(text: str) -> str:
    """`text` with its first letter in capitals (" tokyo" -> " Tokyo")."""
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1:]
    return text


def spellings(model: Model, token: int) -> list[tuple[int, ...]]:
    """The ways to write `token`'s text up to letter case: each member of its case class as one
    token, then the lowercase, capitalised and all-capitals writings the tokenizer splits into
    several pieces (" Tokyo" lowercased is " to" + "ky" + "o"). Cached per model."""
    cache = _spellings.setdefault(model, {})
    if token not in cache:
        classes = case_classes(model)
        out = [(int(m),) for m in np.flatnonzero(classes == classes[token])]
        text = model.piece(token).decode("utf-8", "replace")
        for variant in (text.lower(), _capitalized(text.lower()), text.upper()):
            toks = tuple(_text_tokens(model, variant))
            if len(toks) > 1 and toks not in out and model.detokenize(toks) == variant:
                out.append(toks)
        cache[token] = out
    return cache[token]


_case_patterns: "weakref.WeakKeyDictionary[Model, np.ndarray]" = weakref.WeakKeyDictionary()
LOWER, CAPITAL, UPPER, ONE_CAPITAL = 1, 2, 3, 4  # letter-case patterns of a token's text (0: none)


def _pattern(text: str) -> int:
    letters = "".join(ch for ch in text if ch.isalpha())
    if not letters:
        return 0
    if letters.islower():
        return LOWER
    if len(letters) == 1:
        return ONE_CAPITAL  # "W" starts a capitalised word as often as one in capitals
    if letters[0].isupper() and letters[1:].islower():
        return CAPITAL
    return UPPER if letters.isupper() else 0


def case_patterns(model: Model) -> np.ndarray:
    """For each token id, the case pattern of its letters: LOWER ("when"), CAPITAL ("When"),
    UPPER ("WHEN"), ONE_CAPITAL ("W") or 0 (no letters, or mixed). Computed once per model."""
    cached = _case_patterns.get(model)
    if cached is None:
        cached = _case_patterns[model] = np.array(
            [_pattern(model.piece(t).decode("utf-8", "replace")) for t in range(model.n_vocab)], dtype=np.int8)
    return cached


def case_classes(model: Model) -> np.ndarray:
    """For each token id, the id of its class of tokens that are equal up to letter case
    (" When", " when" and " WHEN" share one), computed once per model."""
    return _folded(model)[1]


def extension_mass(model: Model, token: int, probs: np.ndarray) -> tuple[float, int | None]:
    """The plain probability of the tokens (among the EXTENSION_TOP likeliest) that the
    tokenizer writes, in lowercase, capitalised or in capitals, starting with `token`, and the
    likeliest of them: " to" is as plausible as the plain model's " Tokyo", which lowercased
    is " to" + "ky" + "o", and " REC" as its " recipe" (" REC" + "IPE"); " t" is not."""
    if not _folded(model)[0][token]:
        return 0.0, None
    starts = _fold_starts.setdefault(model, {})
    top = top_indices(probs, EXTENSION_TOP)
    mass, best = 0.0, None
    for u in top:
        u = int(u)
        if u not in starts:
            starts[u] = tuple({sp[0] for sp in spellings(model, u) if len(sp) > 1})
        if token in starts[u]:
            mass += float(probs[u])
            if best is None or probs[u] > probs[best]:
                best = u
    return mass, best


def respelled(model: Model, word: int, full: np.ndarray) -> tuple[int, ...]:
    """`word` written the way the steered model at full strength writes letters here: in the
    case pattern (lowercase, capitalised, capitals) its distribution `full` gives the most
    mass, as one token or in pieces; among spellings of that pattern, or where none has
    it, the one whose first token `full` likes best."""
    options = spellings(model, word)
    patterns = case_patterns(model)
    probs = softmax(full)
    mass = np.bincount(patterns, weights=probs, minlength=5)
    mass[0] = -1.0
    mass[ONE_CAPITAL] = max(mass[CAPITAL], mass[UPPER])
    return max(options, key=lambda sp: (mass[_pattern(model.detokenize(sp))], full[sp[0]]))


def spelled(model: Model, token: int, logits: np.ndarray) -> int:
    """The member of `token`'s case class that `logits` like best."""
    classes = case_classes(model)
    members = np.flatnonzero(classes == classes[token])
    return int(members[np.argmax(logits[members])])
