"""Contact sheets: the same virtual patient drawn at several site T-scores.

Used by ``docs/cohort.md`` and the demo so a reader can *see* bone loss: identical anatomy,
nuisance and noise seed, only the bone status changes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from cohort.plan import plan_cohort
from cohort.render import render_case
from cohort.sites import CaseInputs

SHEET_TSCORES = (0.0, -1.5, -3.0)


def display(pixels: NDArray, window: tuple[float, float], photometric: str) -> NDArray:
    """Stored values -> 8-bit display (window applied, MONOCHROME1 shown inverted)."""
    c, w = window
    img = np.clip((pixels.astype(np.float32) - (c - w / 2.0)) / max(w, 1.0), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return (img * 255.0).astype(np.uint8)


def series(
    site: str,
    case_index: int,
    seed: int,
    tscores=SHEET_TSCORES,
    max_side: int = 1024,
    crop: tuple[float, float, float, float] | None = None,
    tile: int = 360,
) -> NDArray:
    """One row of tiles: case ``case_index`` of the plan re-drawn at each T-score in ``tscores``.

    ``crop`` = (top, bottom, left, right) fractions of the image for a zoomed row.
    """
    plan = plan_cohort(site, case_index + 1, seed)
    base = plan.case(case_index)
    nz = dict(base.nuisance, monochrome1=0, text=0)
    one_p = {k: v[case_index : case_index + 1] for k, v in plan.patients.items()}
    one_v = {k: v[case_index : case_index + 1] for k, v in plan.variation.items()}
    tiles = []
    tone: tuple[float, float] | None = None
    window: tuple[float, float] | None = None
    for t in tscores:
        bm = plan.site.biomarkers(np.array([t]), one_v, one_p)
        case = CaseInputs(base.patient, base.variation, {k: v[0].item() for k, v in bm.items()}, nz)
        # One tone range and window for the row (the first image's), so density is comparable.
        r = render_case(
            plan.site, case, plan.render_seed(case_index), max_side=max_side, tone_range=tone
        )
        tone, window = tone or r.tone_range, window or r.window
        img = display(r.pixels, window, r.photometric)
        if crop is not None:
            h, w = img.shape
            img = img[int(crop[0] * h) : int(crop[1] * h), int(crop[2] * w) : int(crop[3] * w)]
        scale = tile / max(img.shape)
        img = cv2.resize(
            img,
            (int(img.shape[1] * scale), int(img.shape[0] * scale)),
            interpolation=cv2.INTER_AREA,
        )
        canvas = np.zeros((tile, tile), dtype=np.uint8)
        y0, x0 = (tile - img.shape[0]) // 2, (tile - img.shape[1]) // 2
        canvas[y0 : y0 + img.shape[0], x0 : x0 + img.shape[1]] = img
        cv2.putText(canvas, f"{site} t={t:+.1f}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 255, 2)
        tiles.append(canvas)
    return np.hstack(tiles)


def write_sheet(path: Path, rows: list[NDArray]) -> Path:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(padded)):
        raise OSError(f"could not write {path}")
    return path


def docs_sheet(path: Path, seed: int = 7) -> Path:
    """The contact sheet of docs/cohort.md: hand and hip, full view and a zoom, T = 0/-1.5/-3."""
    rows = [
        series("hand", 0, seed, max_side=1400),
        series("hand", 0, seed, max_side=1400, crop=(0.38, 0.62, 0.30, 0.70)),
        series("hip", 0, seed, max_side=1750),
        series("hip", 0, seed, max_side=1750, crop=(0.22, 0.62, 0.10, 0.45)),
    ]
    return write_sheet(path, rows)


if __name__ == "__main__":
    import sys

    print(docs_sheet(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img/cohort_sheet.png")))
