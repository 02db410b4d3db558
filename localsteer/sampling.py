"""Token sampling with llama.cpp's default chain: top-k, top-p, min-p, temperature, draw.

Each draw uses its own generator seeded by (seed, position, round), so a token's choice does
not depend on how many draws happened before it: the batched rejection decoder and the
token-by-token loop make the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: pick a random seed


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = DEFAULT_SEED

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def resolved(self) -> "Sampling":
        """With a concrete seed in place of "random"."""
        if self.seed != DEFAULT_SEED:
            return self
        return Sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                        int(np.random.SeedSequence().generate_state(1)[0]))

    def choose(self, logits: np.ndarray, position: int, round_: int = 0) -> int:
        """The token for `logits` `(n_vocab,)` at generation step `position`."""
        if self.greedy:
            return int(np.argmax(logits))
        if 0 < self.top_k < len(logits):
            part = np.argpartition(-logits, self.top_k)[: self.top_k]
            order = part[np.argsort(-logits[part], kind="stable")]
        else:
            order = np.argsort(-logits, kind="stable")
        z = logits[order].astype(np.float64)
        p = np.exp(z - z[0])
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order, z, p = order[:keep], z[:keep], p[:keep]
        if self.min_p > 0:
            keep = p >= self.min_p * p[0]
            order, z = order[keep], z[keep]
        z = z / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, position, round_])
        return int(order[rng.choice(len(order), p=p)])


_CHUNK = 256


def top_indices(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest values of the 1-D `x`, largest first (ties in any order).

    A vocabulary-wide `np.argpartition` costs about 1.5 ms on 150k logits, a tenth of a decode of
    a small model; this looks at the `n` chunks of 256 with the largest maxima only (every value
    larger than the n-th largest lies in one of them), about 20 times faster."""
    n = min(n, len(x))
    body = len(x) // _CHUNK * _CHUNK
    if n <= 0:
        return np.zeros(0, dtype=np.intp)
    if body < 4 * n * _CHUNK:
        idx = np.argpartition(-x, n - 1)[:n]
    else:
        maxima = x[:body].reshape(-1, _CHUNK).max(axis=1)
        chunks = np.argpartition(-maxima, n - 1)[:n]
        cand = (chunks[:, None] * _CHUNK + np.arange(_CHUNK)).ravel()
        if body < len(x):
            cand = np.concatenate([cand, np.arange(body, len(x))])
        idx = cand[np.argpartition(-x[cand], n - 1)[:n]]
    return idx[np.argsort(-x[idx], kind="stable")]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def prob_of(logits: np.ndarray, token: int) -> float:
    """softmax(logits)[token], without the softmax's division over the whole vocabulary."""
    m = logits.max()
    return float(np.exp(logits[token] - m) / np.exp(logits - m).sum())
