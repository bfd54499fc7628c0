"""FP32 vs INT8 fidelity: the evidence that quantization did not change what a user sees.

Compared on held-out images (never the calibration ones): agreement of the answer the screen
shows (the class by the card's rule, ``edge.answer``: the WHO band of the T-score estimate for
ordinal packages, the most probable class for older ones) and of the referral, AUROC of
osteoporosis-vs-rest for both and its difference, T-score MAE for both, the largest probability
change, Pearson correlation of the Grad-CAM maps (per image and class), and whether the
out-of-distribution decision agrees. The gates of the quantize command are checked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cohort.stats import auroc
from edge.answer import ARGMAX, AnswerRule
from edge.backends.onnxruntime import OnnxRuntimeBackend

GATES = {
    "top1_agreement": (">=", 0.99),
    "abs_delta_auroc": ("<=", 0.005),
    "cam_pearson_median": (">=", 0.95),
}


@dataclass(frozen=True)
class Outputs:
    probs: NDArray
    tscore: NDArray
    cam: NDArray
    ood: NDArray


def run_all(
    backend: OnnxRuntimeBackend, image: NDArray, clinical: NDArray, batch: int = 32
) -> Outputs:
    parts: dict[str, list[NDArray]] = {"probs": [], "tscore": [], "cam": [], "ood": []}
    for a in range(0, len(image), batch):
        out = backend.run(image[a : a + batch], clinical[a : a + batch])
        for k in parts:
            parts[k].append(out[k])
    return Outputs(
        np.concatenate(parts["probs"]),
        np.concatenate(parts["tscore"])[:, 0],
        np.concatenate(parts["cam"]),
        np.concatenate(parts["ood"])[:, 0],
    )


def pearson_maps(a: NDArray, b: NDArray) -> NDArray:
    """Pearson r of each pair of maps [N,...]; two flat maps agree (1.0) when equal, else 0."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    na, nb = np.sqrt((a * a).sum(1)), np.sqrt((b * b).sum(1))
    r = np.where((na > 0) & (nb > 0), (a * b).sum(1) / np.maximum(na * nb, 1e-300), 0.0)
    both_flat = (na == 0) & (nb == 0)
    return np.where(both_flat, 1.0, r)


def _auroc(scores: NDArray, labels: NDArray) -> float:
    try:
        return auroc(scores, labels == 2)
    except ValueError:
        return math.nan


def compare(
    ref: Outputs,
    q: Outputs,
    labels: NDArray,
    tscore: NDArray,
    ood_threshold: float,
    rule: AnswerRule = ARGMAX,
) -> dict:
    """Fidelity metrics of ``q`` against ``ref`` (same images, same order)."""
    n, n_cls = ref.probs.shape
    pred = rule.classes(ref.probs, ref.tscore)
    top1 = float((pred == rule.classes(q.probs, q.tscore)).mean())
    refer_agree = float((rule.refer(ref.probs) == rule.refer(q.probs)).mean())
    auc_ref, auc_q = _auroc(ref.probs[:, 2], labels), _auroc(q.probs[:, 2], labels)
    known = ~np.isnan(tscore)
    mae_ref = float(np.abs(ref.tscore[known] - tscore[known]).mean()) if known.any() else math.nan
    mae_q = float(np.abs(q.tscore[known] - tscore[known]).mean()) if known.any() else math.nan
    per_class = [pearson_maps(ref.cam[:, k], q.cam[:, k]) for k in range(n_cls)]
    predicted = np.stack(per_class, 1)[np.arange(n), pred]
    class_medians = [float(np.median(r)) for r in per_class]
    ood_ref, ood_q = ref.ood > ood_threshold, q.ood > ood_threshold
    return {
        "n": int(n),
        "class_rule": "who_band_of_tscore" if rule.ordinal else "argmax",
        "top1_agreement": round(top1, 4),
        "referral_agreement": round(refer_agree, 4),
        "auroc_fp32": round(auc_ref, 4),
        "auroc_int8": round(auc_q, 4),
        "abs_delta_auroc": round(abs(auc_q - auc_ref), 4),
        "tscore_mae_fp32": round(mae_ref, 4),
        "tscore_mae_int8": round(mae_q, 4),
        "delta_tscore_mae": round(mae_q - mae_ref, 4),
        "max_abs_delta_prob": round(float(np.abs(ref.probs - q.probs).max()), 4),
        "mean_abs_delta_prob": round(float(np.abs(ref.probs - q.probs).mean()), 5),
        # The gate uses the worst class: every class's map can be shown on the local screen.
        "cam_pearson_median": round(min(class_medians), 4),
        "cam_pearson_median_by_class": [round(m, 4) for m in class_medians],
        "cam_pearson_predicted_class": {
            "median": round(float(np.median(predicted)), 4),
            "p05": round(float(np.percentile(predicted, 5)), 4),
            "min": round(float(predicted.min()), 4),
        },
        "ood_decision_agreement": round(float((ood_ref == ood_q).mean()), 4),
        "ood_pearson": round(float(pearson_maps(ref.ood[None], q.ood[None])[0]), 4),
        "ood_max_rel_delta": round(
            float((np.abs(q.ood - ref.ood) / np.maximum(np.abs(ref.ood), 1e-6)).max()), 4
        ),
    }


def check_gates(metrics: dict) -> list[str]:
    """The unmet gates, as sentences (empty when all hold)."""
    failed = []
    for name, (op, limit) in GATES.items():
        value = metrics.get(name)
        if value is None or math.isnan(float(value)):
            ok = False
        else:
            ok = float(value) >= limit if op == ">=" else float(value) <= limit
        if not ok:
            failed.append(f"{name} = {value} (needs {op} {limit})")
    return failed


def error_score(ref: Outputs, q: Outputs, rule: AnswerRule = ARGMAX) -> float:
    """One number for ranking layer sensitivity: CAM disagreement plus probability change."""
    n = len(ref.probs)
    pred = rule.classes(ref.probs, ref.tscore)
    r = np.stack([pearson_maps(ref.cam[:, k], q.cam[:, k]) for k in range(ref.cam.shape[1])], 1)
    cam_err = float(np.mean(1.0 - r[np.arange(n), pred]))
    return (
        cam_err
        + float(np.abs(ref.probs - q.probs).mean())
        + float(np.mean(pred != rule.classes(q.probs, q.tscore)))
    )
