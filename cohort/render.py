"""Render one case: anatomy -> physics -> presentation, plus masks and the counterfactual map.

The random streams of a case come from ``SeedSequence(seed).spawn``: one for the anatomy and its
textures, one for quantum/electronic noise, one for burned-in text. Re-using the anatomy stream
at another T-score draws the same patient with only the bone changed (docs/cohort.md §3.10).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Placement, Scene
from cohort.physics import Exposure, Look, detect, expected_signal, log_image, present, primary
from cohort.sites.base import CaseInputs, Site

F32 = np.float32
COUNTERFACTUAL_DELTA = 1.5


@dataclass
class Rendered:
    """A rendered radiograph with its ground truth."""

    pixels: NDArray  # uint16 stored values (already inverted when MONOCHROME1)
    photometric: str
    pitch_mm: float
    masks: dict[str, NDArray]
    counterfactual: NDArray | None  # float16 |p(t) - p(t')| low-passed, same grid as pixels
    counterfactual_t: float | None
    window: tuple[float, float]  # (center, width) suited to the stored values
    tone_range: tuple[float, float]  # attenuation range mapped to the stored range


def detector_grid(nuisance: dict, max_side: int | None) -> tuple[int, int, float]:
    """(rows, cols, pitch) of the plate; ``max_side`` coarsens the pitch, never crops."""
    pitch = float(nuisance["pitch_mm"])
    w, h = float(nuisance["plate_w_mm"]), float(nuisance["plate_h_mm"])
    if max_side is not None and max(w, h) / pitch > max_side:
        pitch = float(np.ceil(max(w, h) / max_side * 1000.0) / 1000.0)
    return int(round(h / pitch)), int(round(w / pitch)), pitch


def placement_for(nuisance: dict, max_side: int | None) -> Placement:
    rows, cols, pitch = detector_grid(nuisance, max_side)
    return Placement(
        rows=rows,
        cols=cols,
        pitch_mm=pitch,
        rotation_deg=float(nuisance["rotation_deg"]),
        shift_mm=(
            float(nuisance["shift_x"]) * float(nuisance["plate_w_mm"]),
            float(nuisance["shift_y"]) * float(nuisance["plate_h_mm"]),
        ),
        mirror=bool(nuisance["left"]),
        magnification=float(nuisance["magnification"]),
    )


def _draw(
    site: Site, case: CaseInputs, placement: Placement, seed: np.random.SeedSequence
) -> Scene:
    scene = Scene(placement)
    site.build(scene, case, np.random.default_rng(seed))
    return scene


def _marker(scene: Scene, nuisance: dict) -> None:
    """A lead laterality letter on the plate, consistent with the imaged side (§3.8)."""
    rows, cols = scene.shape
    letter = "L" if nuisance["left"] else "R"
    size_px = 14.0 / scene.placement.pitch_mm  # a 14 mm lead letter
    scale = size_px / 22.0
    thick = max(int(round(size_px / 7)), 1)
    (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    margin = int(round(8.0 / scene.placement.pitch_mm))
    corner = int(nuisance["marker_corner"])
    # Technologists put the marker inside the collimated field, not under a shutter.
    open_cols = (
        np.flatnonzero(~scene.masks["collimator"].all(axis=0))
        if ("collimator" in scene.masks)
        else np.arange(cols)
    )
    first, last = (int(open_cols[0]), int(open_cols[-1])) if open_cols.size else (0, cols - 1)
    x = first + margin if corner in (0, 2) else last - margin - tw
    y = margin + th if corner in (0, 1) else rows - margin
    m = np.zeros(scene.shape, dtype=np.uint8)
    cv2.putText(m, letter, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 1, thick, cv2.LINE_AA)
    mask = m > 0
    scene.path("lead")[mask] += 0.1  # 1 mm of lead
    scene.masks["marker"] = mask


def burn_text(pixels: NDArray, nuisance: dict, pitch_mm: float, value: int) -> NDArray:
    """Facility and date burned in by the console, opposite the marker (§3.8). Returns the mask."""
    rows, cols = pixels.shape
    day = np.datetime64("2016-01-01") + np.timedelta64(int(nuisance["study_day"]), "D")
    text = f"SYNTHETIC CLINIC {int(nuisance['facility']):02d}  {day}"
    scale = (4.0 / pitch_mm) / 22.0
    thick = max(int(round(4.0 / pitch_mm / 8)), 1)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    margin = int(round(6.0 / pitch_mm))
    corner = int(nuisance["marker_corner"])
    x = cols - margin - tw if corner in (0, 2) else margin
    y = rows - margin if corner in (0, 1) else margin + th
    m = np.zeros(pixels.shape, dtype=np.uint8)
    cv2.putText(m, text, (max(x, 0), y), cv2.FONT_HERSHEY_SIMPLEX, scale, 1, thick, cv2.LINE_AA)
    mask = m > 0
    pixels[mask] = value
    return mask


def render_case(
    site: Site,
    case: CaseInputs,
    seed: int | list[int],
    *,
    max_side: int | None = None,
    counterfactual: CaseInputs | None = None,
    counterfactual_t: float | None = None,
    exact_poisson: bool = False,
    tone_range: tuple[float, float] | None = None,
) -> Rendered:
    """Render one radiograph; with ``counterfactual`` (same patient at another site T-score),
    also the attribution map A = |p(t) - p(t')| of docs/cohort.md §3.10, noise-free, low-passed."""
    nz = case.nuisance
    placement = placement_for(nz, max_side)
    anat_seed, noise_seed, _ = np.random.SeedSequence(seed).spawn(3)
    scene = _draw(site, case, placement, anat_seed)
    if nz["marker"]:
        _marker(scene, nz)
    exposure = Exposure.from_row({**nz, "pitch_mm": placement.pitch_mm})
    spr_scale = site.scatter_scale(case)
    body = scene.masks["body"]
    signal = expected_signal(scene.paths, exposure, spr_scale, body)
    counts = detect(signal, body, exposure, np.random.default_rng(noise_seed), exact_poisson)
    ref = float(np.median(signal[::4, ::4][body[::4, ::4]])) if body.any() else 1.0
    open_field = exposure.photons_per_pixel / max(ref, 1e-6)
    p = log_image(counts, open_field)
    look = Look.from_row({**nz, "pitch_mm": placement.pitch_mm})
    stored, used_range = present(p, body, look, tone_range)
    top = (1 << int(nz["bits_stored"])) - 1
    masks = dict(scene.masks)
    if nz["text"]:
        masks["text"] = burn_text(stored, nz, placement.pitch_mm, top)
    window = _window(stored, body, top)
    photometric = "MONOCHROME2"
    if nz["monochrome1"]:
        stored = (top - stored).astype(np.uint16)
        photometric = "MONOCHROME1"
        window = (top - window[0], window[1])
    cf = None
    if counterfactual is not None:
        scene_cf = _draw(site, counterfactual, placement, anat_seed)
        if nz["marker"]:
            _marker(scene_cf, nz)
        # The attribution map is defined on the primary beam: scatter spreads any change in bone
        # over the whole image, which says nothing about *where* the information is.
        p0 = -np.log(np.maximum(primary(scene.paths, exposure.kvp), 1e-9))
        p1 = -np.log(np.maximum(primary(scene_cf.paths, exposure.kvp), 1e-9))
        cf = cv2.GaussianBlur(np.abs(p0 - p1), (0, 0), 1.0 / placement.pitch_mm).astype(np.float16)
    return Rendered(
        pixels=stored,
        photometric=photometric,
        pitch_mm=placement.pitch_mm,
        masks=masks,
        counterfactual=cf,
        counterfactual_t=counterfactual_t,
        window=window,
        tone_range=used_range,
    )


def _window(stored: NDArray, body: NDArray, top: int) -> tuple[float, float]:
    sample = stored[::4, ::4][body[::4, ::4]] if body.any() else stored[::4, ::4].ravel()
    lo, hi = np.percentile(sample, [1.0, 99.5])
    width = max(float(hi - lo), 16.0)
    return float(round((lo + hi) / 2.0)), float(round(min(width * 1.1, top + 1)))
