"""Linear classifiers on activations, in numpy: L2-regularised logistic regression fitted with
Newton steps, and INLP (Ravfogel et al. 2020: iterative nullspace projection) built on it. Used by
the refusal interventions (refusal/direction.py) and by probes (probe.py)."""

from __future__ import annotations

from dataclasses import dataclass

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


def logistic_direction(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """A linear classifier's weight vector (the bias left out), by logistic regression."""
    return logistic_fit(x, y, l2)[0]


@dataclass
class InlpResult:
    directions: np.ndarray  # (k, n_embd), orthonormal
    train_accuracy: list[float]  # accuracy of each round's classifier before its projection
    validation_accuracy: list[float]


def inlp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
         rounds: int = 8, stop_at: float = 0.6) -> InlpResult:
    """Iterative nullspace projection: fit a classifier, project its direction out of the data,
    repeat, until `rounds` directions or the validation accuracy of a new classifier falls to
    `stop_at`."""
    dirs: list[np.ndarray] = []
    train_acc, val_acc = [], []
    xt, xv = x_train.astype(np.float64), x_val.astype(np.float64)
    for _ in range(rounds):
        w = logistic_direction(xt, y_train)
        for q in dirs:  # keep it orthogonal to the directions already removed
            w -= (w @ q) * q
        norm = np.linalg.norm(w)
        if norm < 1e-12:
            break
        w /= norm
        va = threshold_accuracy(xv, y_val, w)
        train_acc.append(threshold_accuracy(xt, y_train, w))
        val_acc.append(va)
        if dirs and va <= stop_at:
            break
        dirs.append(w)
        xt = xt - np.outer(xt @ w, w)
        xv = xv - np.outer(xv @ w, w)
    return InlpResult(np.array(dirs, dtype=np.float32), train_acc, val_acc)
