"""Small, dependency-free statistics for the cohort checks (AUROC, logistic fit, correlation)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def auroc(score: NDArray, positive: NDArray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    s = np.asarray(score, dtype=float)
    y = np.asarray(positive).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative cases")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=float)
    sorted_s = s[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.size]))
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pearson(a: NDArray, b: NDArray) -> float:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    return float(np.corrcoef(a, b)[0, 1])


def standardise(x: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """Return (z, mean, sd) column-wise; constant columns get sd 1 so they stay finite."""
    x = np.asarray(x, dtype=float)
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (x - mean) / sd, mean, sd


def fit_logistic(x: NDArray, y: NDArray, l2: float = 1e-3, iters: int = 50) -> NDArray:
    """Ridge-penalised logistic regression by Newton-Raphson; returns [bias, weights...].

    ``x`` should be standardised. Bounded iterations; stops early when the step is tiny.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    xb = np.hstack([np.ones((x.shape[0], 1)), x])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w


def predict_logistic(w: NDArray, x: NDArray) -> NDArray:
    x = np.asarray(x, dtype=float)
    return 1.0 / (1.0 + np.exp(-(w[0] + x @ w[1:])))


def holdout_logistic_auroc(x: NDArray, y: NDArray, rng: np.random.Generator) -> float:
    """Fit on a random half, report AUROC on the other half (honest, not in-sample)."""
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    idx = rng.permutation(x.shape[0])
    half = x.shape[0] // 2
    tr, te = idx[:half], idx[half:]
    z, mean, sd = standardise(x[tr])
    w = fit_logistic(z, y[tr])
    return auroc(predict_logistic(w, (x[te] - mean) / sd), y[te])
