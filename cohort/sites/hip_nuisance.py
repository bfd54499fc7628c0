"""Nuisance of the AP hip view (docs/cohort.md §3.5): collimator shutters, bowel gas, implants.

None of these depends on bone status, and each draws from the case's generator in a fixed
order, so the counterfactual render differs from the original only in the bones. Each sets its
own mask: 'collimator' (lead shutters; ``HipSite.build`` removes those pixels from body and
bone), 'bowel_gas' and 'implant' (contralateral cannulated screws or surgical clips).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene
from cohort.sites.hip_anatomy import HEAD_Y, FemurGeometry
from cohort.sites.silhouette import draw_rod, unit

F32 = np.float32


def collimate(scene: Scene, rng: np.random.Generator) -> NDArray | None:
    """Lateral collimator shutters near the skin edges (docs/cohort.md §3.5 nuisance), in 80 %.

    The shutters are parallel to the plate edges and set from the body outline, a few mm
    outside it or cutting slightly in, as technologists collimate a pelvis. Outside them the
    field is 2 mm of lead. Without them the open field beside a slim patient is large. The
    draws do not depend on bone status. Returns the shuttered pixels ('collimator' mask).
    """
    on = rng.random() < 0.80
    jitter = rng.uniform(-8.0, 15.0, 2)  # mm beyond the skin edge (> 0) or into the body
    if not on:
        return None
    rows, cols = scene.shape
    band = scene.masks["body"][rows // 3 : 2 * rows // 3].any(axis=0)
    inside = np.nonzero(band)[0]
    if inside.size == 0:
        return None
    px = scene.placement.pitch_mm
    left = int(round(inside[0] + jitter[0] / px * -1.0))
    right = int(round(inside[-1] + jitter[1] / px))
    shut = np.zeros(scene.shape, dtype=bool)
    if inside[0] > 0 and left > 0:
        shut[:, :left] = True
    if inside[-1] < cols - 1 and right < cols - 1:
        shut[:, right + 1 :] = True
    if not shut.any():
        return None
    scene.path("lead")[shut] += F32(0.2)
    scene.masks["collimator"] = shut
    return shut


def draw_bowel_gas(scene: Scene, k: float, rng: np.random.Generator) -> NDArray:
    """A loop of colon with gas over the pelvis: overlapping pockets elongated along a random
    walk, so it reads as a bowel segment with haustral bulges. Returns the gas path (mm)."""
    gas = np.zeros(scene.shape, dtype=F32)
    mask = np.zeros(scene.shape, dtype=bool)
    hy = HEAD_Y * k
    pos = np.array([rng.uniform(-80, 80) * k, hy + rng.uniform(-110, 10) * k])
    heading = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(7, 12) * k
    loop_depth = rng.uniform(8, 22)
    for _ in range(int(rng.integers(4, 12))):
        along = rng.uniform(14, 24) * k
        across = width * rng.uniform(0.8, 1.2)
        depth = loop_depth * rng.uniform(0.6, 1.0)
        win = scene.window(np.array([pos - along, pos + along]))
        if win is not None:
            c, sn = F32(np.cos(heading)), F32(np.sin(heading))
            dx, dy = win.x - F32(pos[0]), win.y - F32(pos[1])
            rho2 = ((dx * c + dy * sn) / F32(along)) ** 2
            rho2 += ((dy * c - dx * sn) / F32(across)) ** 2
            path = F32(2 * depth) * np.sqrt(np.maximum(1.0 - rho2, 0.0))
            np.maximum(gas[win.slc], path, out=gas[win.slc])
            mask[win.slc] |= path > 3.0
        heading += rng.normal(0, 0.5)
        pos = pos + np.array([np.cos(heading), np.sin(heading)]) * along * 0.9
    scene.masks["bowel_gas"] = mask
    return gas


def draw_implant(scene: Scene, g: FemurGeometry, rng: np.random.Generator) -> None:
    """Contralateral cannulated screws across the neck, or surgical clips in the groin."""
    iron = scene.path("iron")
    mask = scene.mask("implant")
    if rng.random() < 0.5:
        start = g.sh(g.shaft_radius + 3.0, 14.0 * g.size)  # heads just on the lateral cortex
        direction = unit(g.head - start)
        length = float(np.hypot(*(g.head - start))) + g.head_radius * 0.55
        normal = np.array([-direction[1], direction[0]])
        for off in (-7.0, 0.0, 7.0):
            p0 = start + normal * off
            draw_rod(scene, iron, mask, p0, p0 + direction * length, 3.2, 1.3)
    else:
        centre = g.head + np.array([-np.sign(g.lateral[0]) * 40.0, 60.0])
        for _ in range(int(rng.integers(3, 8))):
            c = centre + rng.normal(0, 18, 2)
            ang = rng.uniform(0, np.pi)
            d = np.array([np.cos(ang), np.sin(ang)])
            n = np.array([-d[1], d[0]])
            for side in (-1.0, 1.0):
                p0 = c + n * side * 1.2
                draw_rod(scene, iron, mask, p0 - d * 3.5, p0 + d * 3.5, 0.45, 0.0)
