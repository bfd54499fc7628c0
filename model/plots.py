"""Small evaluation plots drawn with OpenCV (no plotting library needed on a device or CI)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

W, H, M = 480, 480, 60
_COLOURS = ((200, 80, 30), (40, 140, 40), (30, 60, 200), (120, 120, 120))


def _axes(title: str, xlabel: str, ylabel: str) -> NDArray:
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (M, M), (W - 20, H - M), (0, 0, 0), 1)
    for v in np.linspace(0, 1, 6):
        x = int(M + v * (W - 20 - M))
        y = int(H - M - v * (H - 2 * M))
        cv2.putText(img, f"{v:.1f}", (x - 10, H - M + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
        cv2.putText(img, f"{v:.1f}", (M - 32, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    cv2.putText(img, title, (M, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 0, 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (W // 2 - 40, H - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
    cv2.putText(img, ylabel, (5, M - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
    return img


def _to_px(x: NDArray | list[float], y: NDArray | list[float]) -> NDArray:
    px = M + np.asarray(x) * (W - 20 - M)
    py = H - M - np.asarray(y) * (H - 2 * M)
    return np.stack([px, py], 1).astype(np.int32)


def roc_curve(score: NDArray, positive: NDArray) -> tuple[NDArray, NDArray]:
    order = np.argsort(-score, kind="mergesort")
    y = positive[order].astype(float)
    tpr = np.concatenate([[0], np.cumsum(y) / max(y.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(1 - y) / max((1 - y).sum(), 1)])
    return fpr, tpr


def plot_roc(path: Path, curves: dict[str, tuple[NDArray, NDArray]], title: str) -> Path:
    img = _axes(title, "1 - specificity", "sensitivity")
    cv2.line(img, tuple(_to_px([0], [0])[0]), tuple(_to_px([1], [1])[0]), (200, 200, 200), 1)
    for i, (name, (score, pos)) in enumerate(curves.items()):
        fpr, tpr = roc_curve(score, pos)
        colour = _COLOURS[i % len(_COLOURS)]
        cv2.polylines(img, [_to_px(fpr, tpr)], False, colour, 2, cv2.LINE_AA)
        cv2.putText(
            img,
            name,
            (W - 200, H - M - 20 - 18 * i),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            colour,
            1,
            cv2.LINE_AA,
        )
    cv2.imwrite(str(path), img)
    return path


def plot_calibration(
    path: Path, prob: NDArray, outcome: NDArray, title: str, bins: int = 10
) -> Path:
    img = _axes(title, "predicted probability", "observed frequency")
    cv2.line(img, tuple(_to_px([0], [0])[0]), tuple(_to_px([1], [1])[0]), (200, 200, 200), 1)
    edges = np.linspace(0, 1, bins + 1)
    pts = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (prob >= lo) & (prob < hi)
        if m.sum() >= 5:
            pts.append((prob[m].mean(), outcome[m].mean()))
    if pts:
        p = _to_px(*np.array(pts).T)
        cv2.polylines(img, [p], False, _COLOURS[2], 2, cv2.LINE_AA)
        for q in p:
            cv2.circle(img, tuple(int(v) for v in q), 4, _COLOURS[2], -1)
    cv2.imwrite(str(path), img)
    return path


def plot_confusion(path: Path, labels: NDArray, pred: NDArray, names: list[str]) -> Path:
    k = len(names)
    cm = np.zeros((k, k), int)
    for t, p in zip(labels, pred, strict=True):
        cm[t, p] += 1
    cell = 110
    img = np.full((k * cell + 90, k * cell + 130, 3), 255, np.uint8)
    for i in range(k):
        for j in range(k):
            share = cm[i, j] / max(cm[i].sum(), 1)
            shade = int(255 - 180 * share)
            x0, y0 = 120 + j * cell, 60 + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (255, shade, shade), -1)
            cv2.putText(img, str(cm[i, j]), (x0 + 30, y0 + 60), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 0, 2)
        cv2.putText(
            img, names[i][:11], (5, 60 + i * cell + 60), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1
        )
        cv2.putText(
            img, names[i][:11], (120 + i * cell + 10, 50), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1
        )
    cv2.putText(
        img,
        "rows: truth, columns: predicted",
        (120, k * cell + 80),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.45,
        0,
        1,
    )
    cv2.imwrite(str(path), img)
    return path
