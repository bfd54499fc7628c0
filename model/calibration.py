"""Calibration figures that say what they can show at the n they were measured on.

ECE alone misleads on small sets: a perfectly calibrated model scores 0.05-0.07 by chance at
n = 150-300. So each ECE is reported beside its *noise floor* — the 95th percentile of the ECE
a perfectly calibrated model with these very predictions would reach, by drawing the outcomes
from the predicted probabilities — and beside the calibration slope and intercept (logistic
recalibration, Cox 1958) and the mean predicted minus observed rate.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

BINS = 15


def _binned_gap(conf: NDArray, hit: NDArray, bins: int = BINS) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    n = conf.size
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / n * abs(hit[m].mean() - conf[m].mean())
    return float(total)


def ece_top_label(probs: NDArray, labels: NDArray, bins: int = BINS) -> float:
    """Expected calibration error of the top-label confidence (Guo et al. 2017)."""
    return _binned_gap(probs.max(1), (probs.argmax(1) == labels).astype(float), bins)


def ece_binary(p: NDArray, y: NDArray, bins: int = BINS) -> float:
    """ECE of one probability (here P(osteoporosis)) against its event."""
    return _binned_gap(np.asarray(p, dtype=float), np.asarray(y, dtype=float), bins)


def noise_floor(probs: NDArray, rng: np.random.Generator, draws: int = 200) -> dict[str, float]:
    """95th percentile of each ECE when the outcomes are drawn from the predictions themselves."""
    n = int(probs.shape[0])
    cum = np.cumsum(probs, axis=1)
    top, binary = [], []
    for _ in range(draws):
        u = rng.random(n)[:, None]
        y = np.minimum((u > cum).sum(1), probs.shape[1] - 1)
        top.append(ece_top_label(probs, y))
        binary.append(ece_binary(probs[:, 2], (y == 2).astype(float)))
    return {
        "ece_top_label_p95": round(float(np.percentile(top, 95)), 4),
        "ece_osteoporosis_p95": round(float(np.percentile(binary, 95)), 4),
    }


def slope_intercept(p: NDArray, y: NDArray) -> tuple[float, float]:
    """Logistic recalibration logit P(y) = a + b logit(p), by Newton's method: (b, a).

    A calibrated model has slope 1 and intercept 0; slope < 1 means overconfident.
    """
    x = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1 - 1e-6))
    X = np.column_stack([np.ones_like(x), x])  # noqa: N806
    w = np.array([0.0, 1.0])
    for _ in range(50):
        z = np.clip(X @ w, -30, 30)
        q = 1.0 / (1.0 + np.exp(-z))
        g = X.T @ (y - q)
        h = (X * (q * (1 - q))[:, None]).T @ X + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        w = w + step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(w[1]), float(w[0])


def calibration_report(probs: NDArray, labels: NDArray, rng: np.random.Generator) -> dict:
    """Every calibration figure of one set, P(osteoporosis) and top label."""
    y = (labels == 2).astype(float)
    p = probs[:, 2]
    slope, intercept = (math.nan, math.nan)
    if 0 < y.sum() < y.size:
        slope, intercept = slope_intercept(p, y)
    return {
        "n": int(labels.size),
        "ece_top_label": round(ece_top_label(probs, labels), 4),
        "ece_osteoporosis": round(ece_binary(p, y), 4),
        **noise_floor(probs, rng),
        "slope_osteoporosis": round(slope, 4) if math.isfinite(slope) else None,
        "intercept_osteoporosis": round(intercept, 4) if math.isfinite(intercept) else None,
        "mean_predicted_minus_observed": round(float(p.mean() - y.mean()), 4),
    }


def reliability(p: NDArray, y: NDArray, bins: int = 10) -> list[dict]:
    """Points of a reliability diagram: per bin of predicted P, its mean and the observed rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (p >= lo) & ((p < hi) if hi < 1.0 else (p <= hi))
        if m.any():
            out.append(
                {"predicted": float(p[m].mean()), "observed": float(y[m].mean()), "n": int(m.sum())}
            )
    return out
