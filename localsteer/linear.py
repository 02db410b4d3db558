"""Linear classifiers on activations, in numpy: L2-regularised logistic regression fitted with
Newton steps. Used by INLP (refusal.py) and by probes (probe.py)."""

from __future__ import annotations

import numpy as np


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 100) -> tuple[np.ndarray, float]:
    """Weights `w` and bias `b` of `P(y=1 | x) = sigmoid(x @ w + b)`, in `x`'s own coordinates.

    The fit runs on centred data scaled to unit overall standard deviation (one number, so the
    geometry of the residual stream is kept) with penalty `l2 * n * |w|²`; the bias is not
    penalised."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    mu = x.mean(axis=0)
    scale = float((x - mu).std()) or 1.0
    xs = (x - mu) / scale
    basis = None
    if d > n:
        # the penalty is isotropic, so the optimum lies in the span of the (centred) samples:
        # solve in that n-dimensional basis, the same answer for a fraction of the cost
        _, sv, vt = np.linalg.svd(xs, full_matrices=False)
        basis = vt[sv > sv.max() * 1e-10]
        xs = xs @ basis.T
        d = xs.shape[1]
    xb = np.hstack([xs, np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = l2 * n * np.eye(d + 1)
    reg[-1, -1] = 0.0
    for _ in range(steps):
        p = sigmoid(xb @ w)
        grad = xb.T @ (p - y) + reg @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + reg + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = (w[:-1] if basis is None else w[:-1] @ basis) / scale
    return weights, float(w[-1] - weights @ mu)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def threshold_accuracy(x: np.ndarray, y: np.ndarray, direction: np.ndarray) -> float:
    """Best accuracy of a threshold on the projection onto `direction` (either sign)."""
    proj = x @ direction
    best = 0.0
    for t in np.unique(proj):
        acc = np.mean((proj >= t) == (y == 1))
        best = max(best, acc, 1 - acc)
    return float(best)
