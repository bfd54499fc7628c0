"""The pelvis of the AP hip view: hemipelves, acetabular roofs, sacrum and the lowest vertebrae.

Flat and irregular bones drawn as ``silhouette.slab`` from the outlines of ``hip_anatomy``:
each hemipelvis is a thin iliac fossa thickened along its ridges (crest, iliac pillar, sciatic
buttress, posterior column) and bumps (acetabular body, ischial tuberosity, pubic body), with
rounded bars below the acetabulum round the obturator foramen; the sourcil is a sclerotic shell
over each femoral head. Their cortex and BV/TV follow the site T-score through the values
``HipSite.build`` passes in, because osteoporosis is systemic. Nothing here draws at random.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene, Window, chord
from cohort.sites.hip_anatomy import (
    HEAD_X,
    HEAD_Y,
    HEMIPELVIS,
    OBTURATOR,
    PELVIS_BASE_MM,
    PELVIS_BUMPS,
    PELVIS_RIDGES,
    RAMI_MM,
    SACRAL_FORAMINA,
    SACRUM_HALF,
)
from cohort.sites.silhouette import (
    chaikin_closed,
    gauss_bumps,
    gauss_ridges,
    rounded_rect,
    slab,
    smoothstep,
)

F32 = np.float32


def draw_pelvis(
    scene: Scene, k: float, head_r: float, cortex: float, bvtv: float, s_rel: float
) -> None:
    """Hemipelves (ilium, acetabulum, rami round the obturator foramen), sacrum, L5/L4."""
    hy = HEAD_Y * k
    for sx in (-1.0, 1.0):
        hx = sx * HEAD_X * k

        def frame(pts: NDArray, hx: float = hx, sx: float = sx) -> NDArray:
            p = np.asarray(pts, dtype=float).reshape(-1, 2)
            return np.column_stack([hx + sx * k * p[:, 0], hy + k * p[:, 1]])

        hole = frame(chaikin_closed(np.array(OBTURATOR), 3))
        ridges = [(frame(np.array(p)), amp, sig * k) for p, amp, sig in PELVIS_RIDGES]
        bumps = [(hx + sx * k * bl, hy + k * bd, amp, sig * k) for bl, bd, amp, sig in PELVIS_BUMPS]

        def thickness(
            win: Window,
            ridges: list[tuple[NDArray, float, float]] = ridges,
            bumps: list[tuple[float, float, float, float]] = bumps,
        ) -> NDArray:
            # Thin iliac fossa above the acetabulum, rounded bars (rami, ischium) below it.
            base = F32(PELVIS_BASE_MM * k) + F32(RAMI_MM * k) * smoothstep(
                (win.y - F32(hy - 25.0 * k)) / F32(35.0 * k)
            )
            return base + gauss_ridges(scene, win, ridges) + gauss_bumps(win, bumps)

        outline = frame(chaikin_closed(np.array(HEMIPELVIS), 2))
        slab(scene, outline, (hole,), thickness, cortex, bvtv)
        _sourcil(scene, np.array([hx, hy]), head_r, sx, s_rel)
    half = np.array(SACRUM_HALF)
    sacrum = np.vstack([half, half[::-1][1:-1] * [-1.0, 1.0]]) * k + [0.0, hy]
    dips = []
    for fx, fy, fr in SACRAL_FORAMINA:
        for sx in (-1.0, 1.0):
            dips.append((sx * fx * k, hy + fy * k, -10.0, fr * k * 0.8))
    mid = np.array([[0.0, hy - 108.0 * k], [0.0, hy + 20.0 * k]])

    def sacral(win: Window) -> NDArray:
        return np.maximum(
            F32(12.0 * k)
            + gauss_ridges(scene, win, [(mid, 10.0, 12.0 * k)])
            + gauss_bumps(win, dips),
            F32(4.0),
        )

    slab(scene, sacrum, (), sacral, cortex, bvtv)
    # L5 and L4 bodies and L5 transverse processes: above the field unless it is shifted.
    for cy in (-132.0, -168.0):
        body = rounded_rect(0.0, cy, 26.0, 13.0, 5.0) * k + [0.0, hy]
        slab(scene, body, (), lambda w: np.full(w.x.shape, 34.0 * k, F32), cortex, bvtv)
    for sx in (-1.0, 1.0):
        proc = np.array([[14, -140], [52, -134], [55, -126], [16, -126]]) * [sx, 1.0] * k
        slab(
            scene,
            proc + [0.0, hy],
            (),
            lambda w: np.full(w.x.shape, 12.0 * k, F32),
            cortex,
            bvtv,
        )


def _sourcil(scene: Scene, head: NDArray, head_r: float, sx: float, s_rel: float) -> None:
    """Acetabular roof: a sclerotic hemispherical shell over the head, seen as a dense arc."""
    r_in = head_r + 3.5
    r_out = r_in + 3.0
    win = scene.window(np.array([head - r_out, head + r_out]))
    if win is None:
        return
    dx = win.x - F32(head[0])
    dy = win.y - F32(head[1])
    rho = np.hypot(dx, dy)
    # Angle from straight up, positive towards the lateral side of this hip.
    phi = np.degrees(np.arctan2(F32(sx) * dx, -dy))
    span = np.clip((34.0 - phi) / 8.0, 0.0, 1.0) * np.clip((phi + 75.0) / 30.0, 0.0, 1.0)
    shell = (chord(r_out, rho) - chord(r_in, rho)) * F32(0.5)
    near_rim = np.clip((rho - (r_in - 8.0)) / 5.0, 0.0, 1.0)
    dens = F32(0.75 + 0.25 * s_rel)
    scene.path("bone")[win.slc] += (shell * span * near_rim * dens / 10.0).astype(F32)
