"""Acquisition and presentation nuisance, drawn independently of the label (docs/cohort.md §3.8).

Nothing here reads a patient's T-score or class: the shortcut check of ``cohort.check`` trains a
classifier on these columns and must find nothing. The one patient-dependent physical quantity,
scatter growing with soft-tissue thickness (BMI), is applied at render time from the clinical
BMI, never from the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cohort.sampler import Table

DR_PITCHES_MM = (0.125, 0.139, 0.143, 0.15, 0.20)


@dataclass(frozen=True)
class AcquisitionSpec:
    """What a site's exposures look like (docs/cohort.md §3.3, §3.8)."""

    plates_mm: tuple[tuple[float, float], ...]  # (width, height) of the detector plates used
    # CR pitch per plate: smaller plates are read finer [S46].
    cr_pitches_mm: tuple[tuple[float, ...], ...]
    kvp: tuple[float, float]
    photons_per_pixel: float  # median in the anatomy at dose scale 1
    spr_grid: tuple[float, float]
    spr_no_grid: tuple[float, float]
    p_grid: float
    rotation_deg: float = 10.0
    shift_fraction: float = 0.10
    magnification: tuple[float, float] = (1.0, 1.05)


def _choice(rng: np.random.Generator, options: tuple, n: int, p: NDArray | None = None) -> NDArray:
    idx = rng.choice(len(options), size=n, p=p)
    return np.asarray(options, dtype=object)[idx]


def sample_nuisance(n: int, rng: np.random.Generator, spec: AcquisitionSpec) -> Table:
    """Draw ``n`` rows of nuisance parameters for one site."""
    detector = np.where(rng.random(n) < 0.4, "CR", "DR").astype(object)
    is_cr = detector == "CR"
    plate = rng.integers(0, len(spec.plates_mm), n)
    cr_pitch = np.array([rng.choice(spec.cr_pitches_mm[k]) for k in plate], dtype=float)
    dr_pitch = np.asarray(DR_PITCHES_MM)[rng.integers(0, len(DR_PITCHES_MM), n)]
    pitch = np.where(is_cr, cr_pitch, dr_pitch)
    dose = np.exp(rng.uniform(np.log(0.25), np.log(4.0), n))
    grid = rng.random(n) < spec.p_grid
    spr = np.where(grid, rng.uniform(*spec.spr_grid, n), rng.uniform(*spec.spr_no_grid, n))
    mono1 = rng.random(n) < np.where(is_cr, 0.40, 0.15)
    # Window present 85 %, VOI LUT sequence 10 %, neither 5 %. A DX "for presentation" object
    # must carry one of them (PS3.3 A.26), so "none" is drawn only for CR objects (12.5 % of CR,
    # 40 % of images are CR); the rest split 85:10 between window and VOI LUT.
    windowing = np.where(rng.random(n) < 85 / 95, "window", "voilut").astype(object)
    windowing[is_cr & (rng.random(n) < 0.125)] = "none"
    marker = rng.random(n) < 0.90
    text = rng.random(n) < 0.30
    return {
        "detector": detector,
        "plate_w_mm": np.asarray([spec.plates_mm[k][0] for k in plate], dtype=float),
        "plate_h_mm": np.asarray([spec.plates_mm[k][1] for k in plate], dtype=float),
        "pitch_mm": pitch,
        "kvp": np.round(rng.uniform(*spec.kvp, n), 0),
        "dose_scale": dose,
        "exposure_index": np.round(400.0 * dose, 0),
        "grid": grid.astype(np.int8),
        "grid_lines_per_cm": rng.uniform(40, 80, n),
        "grid_artefact": (grid & (rng.random(n) < 0.5)).astype(np.int8),
        "spr": spr,
        "scatter_sigma_mm": rng.uniform(20, 60, n),
        "heel_gain": rng.uniform(0.05, 0.15, n),
        "heel_axis": rng.integers(0, 2, n).astype(np.int8),
        "heel_sign": rng.choice([-1, 1], n).astype(np.int8),
        "photons_per_pixel": spec.photons_per_pixel * dose,
        "electronic_noise_adu": rng.uniform(1, 5, n),
        "mtf_sigma_px": np.where(is_cr, rng.uniform(0.7, 1.1, n), rng.uniform(0.5, 0.8, n)),
        "mtf_tail": np.where(is_cr, rng.uniform(0.10, 0.25, n), 0.0),
        "dead_pixel_fraction": rng.uniform(1e-5, 1e-4, n),
        "dead_line": (rng.random(n) < 0.005).astype(np.int8),
        "rotation_deg": rng.uniform(-spec.rotation_deg, spec.rotation_deg, n),
        "shift_x": rng.uniform(-spec.shift_fraction, spec.shift_fraction, n),
        "shift_y": rng.uniform(-spec.shift_fraction, spec.shift_fraction, n),
        "magnification": rng.uniform(*spec.magnification, n),
        "left": (rng.random(n) < 0.5).astype(np.int8),
        "marker": marker.astype(np.int8),
        "marker_corner": rng.integers(0, 4, n).astype(np.int8),
        "text": text.astype(np.int8),
        "musm_gain": rng.uniform(0.0, 1.5, n),
        "latitude": rng.uniform(0.0, 0.4, n),
        "gamma": rng.uniform(0.7, 1.4, n),
        "monochrome1": mono1.astype(np.int8),
        "windowing": windowing,
        "bits_stored": rng.choice([10, 12, 14, 16], n).astype(np.int16),
        "lossy_j2k": (rng.random(n) < 0.20).astype(np.int8),
        "j2k_ratio": rng.uniform(10, 30, n),
        "facility": rng.integers(1, 40, n).astype(np.int16),
        "study_day": rng.integers(0, 3650, n).astype(np.int32),
        "acquisition_seconds": rng.integers(7 * 3600, 19 * 3600, n).astype(np.int32),
    }


# Distribution shifts for robustness evaluation: another detector type, lower dose, worse
# positioning than the training distribution. Each is applied on top of a normal draw.
SHIFTS = ("detector_dose_position",)


def apply_shift(table: Table, name: str, rng: np.random.Generator, spec: AcquisitionSpec) -> Table:
    """Return a copy of ``table`` with the named shift applied (still label-independent)."""
    if name not in SHIFTS:
        from osteofy.errors import UsageError

        raise UsageError(f"unknown shift {name!r} (choose from {', '.join(SHIFTS)})")
    out = dict(table)
    n = len(out["detector"])
    # All CR (training: 40 %), dose x0.2-x0.6 (training: x0.25-x4), rotation to +/-20 degrees
    # and translation to +/-15 % (training: 10 degrees, 10 %).
    out["detector"] = np.full(n, "CR", dtype=object)
    plate = [
        spec.plates_mm.index((w, h))
        for w, h in zip(out["plate_w_mm"], out["plate_h_mm"], strict=True)
    ]
    out["pitch_mm"] = np.array([rng.choice(spec.cr_pitches_mm[k]) for k in plate], dtype=float)
    dose = np.exp(rng.uniform(np.log(0.2), np.log(0.6), n))
    out["dose_scale"] = dose
    out["exposure_index"] = np.round(400.0 * dose, 0)
    out["photons_per_pixel"] = spec.photons_per_pixel * dose
    out["mtf_sigma_px"] = rng.uniform(0.7, 1.1, n)
    out["mtf_tail"] = rng.uniform(0.10, 0.25, n)
    out["monochrome1"] = (rng.random(n) < 0.40).astype(np.int8)
    out["rotation_deg"] = rng.uniform(-20.0, 20.0, n)
    out["shift_x"] = rng.uniform(-0.15, 0.15, n)
    out["shift_y"] = rng.uniform(-0.15, 0.15, n)
    return out


def row(table: Table, i: int) -> dict:
    """One row of a table as plain Python scalars."""
    out = {}
    for k, v in table.items():
        x = v[i]
        out[k] = x.item() if hasattr(x, "item") else x
    return out
