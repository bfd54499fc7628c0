"""Soft tissue of the AP hip view: trunk and thighs over the bones already drawn.

The AP depth comes from the patient's build (``soft_tissue_ap_mm``, BMI): flat-sided
superellipse sections for the trunk blending into two thighs below the groin, a subcutaneous
fat shell and a visceral fat share; muscle fills what bone, marrow and bowel gas leave. It sets
the 'body' mask, so it runs after every bone and before the collimator shutters.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene
from cohort.sites.base import CaseInputs
from cohort.sites.hip_anatomy import HEAD_Y
from cohort.sites.silhouette import smoothstep

F32 = np.float32


def draw_soft_tissue(scene: Scene, case: CaseInputs, k: float, gas: NDArray | None) -> None:
    """Trunk and thighs with flat-sided AP-thickness profiles and a subcutaneous fat shell."""
    v, p = case.variation, case.patient
    bmi = float(p["bmi"])
    depth = float(v["soft_tissue_ap_mm"])
    rows, cols = scene.shape
    x, y = scene.placement.to_mm(
        np.arange(cols, dtype=F32)[None, :], np.arange(rows, dtype=F32)[:, None]
    )
    hy = HEAD_Y * k
    a_hip = (178.0 + 4.0 * (bmi - 22.0)) * k  # >= 25 mm of soft tissue beside the GT
    fat = float(np.clip(8.0 + 2.4 * (bmi - 20.0), 5.0, 55.0))
    waist = smoothstep((hy + 30.0 * k - y) / (150.0 * k))
    a = F32(a_hip) * (F32(1.0) - F32(0.10) * waist)
    groin = hy + 100.0 * k
    w_trunk = F32(1.0) - smoothstep((y - (groin - 30.0 * k)) / (110.0 * k))

    def shape(xc: float, half: NDArray | float, d: float, power: float) -> tuple[NDArray, NDArray]:
        q = np.abs(x - F32(xc)) / half
        outer = F32(d) * np.power(np.maximum(1.0 - q**power, 0.0), 1.0 / power)
        qi = np.abs(x - F32(xc)) / (half - F32(fat))
        inner = F32(d - 2 * fat) * np.power(np.maximum(1.0 - qi**power, 0.0), 1.0 / power)
        return outer, inner

    # Flat-sided sections (superellipses): the AP depth stays near its maximum across the
    # pelvis and falls off over the last few centimetres towards the skin.
    t_out, t_in = shape(0.0, a, depth, 5.0)
    thigh_o = np.zeros_like(t_out)
    thigh_i = np.zeros_like(t_out)
    for sx in (-1.0, 1.0):
        o, i = shape(sx * 0.42 * a_hip, 0.56 * a_hip, 0.8 * depth, 3.0)
        np.maximum(thigh_o, o, out=thigh_o)
        np.maximum(thigh_i, i, out=thigh_i)
    t_out = w_trunk * t_out + (F32(1.0) - w_trunk) * thigh_o
    t_in = w_trunk * t_in + (F32(1.0) - w_trunk) * thigh_i
    visceral = float(np.clip(0.10 + 0.01 * (bmi - 22.0), 0.05, 0.3))
    occupied = (scene.path("bone") + scene.path("marrow")) * F32(10.0)
    muscle = np.maximum(t_in * F32(1.0 - visceral) - occupied, 0.0)
    if gas is not None:
        muscle = np.maximum(muscle - gas, 0.0)
    scene.path("soft")[:] += muscle / F32(10.0)
    scene.path("adipose")[:] += ((t_out - t_in) + t_in * F32(visceral)) / F32(10.0)
    scene.masks["body"] = t_out > 0.5
