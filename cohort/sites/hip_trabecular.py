"""Trabecular bone of the hip: the fine mottle of every bone and the femur's Singh groups.

``fine_trabecular_texture`` is the mean-1 texture the whole hip scene is drawn with.
``trabecular_density`` is the BV/TV field of a proximal femur: the principal and secondary
compressive and tensile groups, the greater-trochanter group and Ward's triangle as streamline
textures weighted in the removal order of the Singh grade [S10] (``hip_anatomy.grade_weights``),
fading into the marrow canal below the lesser trochanter. It is normalised over the FN ROI,
this case's texture and rendered cortex included, so that the bone drawn there has exactly the
closure's cross-section per unit neck length whatever the grade: the projected mineral per unit
neck width in the FN ROI is the DXA target (checked to ~0.2 %).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene, Window
from cohort.sites.base import CaseInputs
from cohort.sites.hip_anatomy import LT_LEVEL_MM, FemurGeometry, grade_weights
from cohort.sites.silhouette import (
    arc_band,
    projected_texture,
    segment_band,
    smoothstep,
    streaks,
    taper,
    unit,
)
from cohort.texture import fbm, line_texture

F32 = np.float32


def fine_trabecular_texture(
    shape: tuple[int, int], hurst: float, rng: np.random.Generator, mm_per_pixel: float
) -> NDArray:
    """Mean-1 trabecular mottle: fBm over 0.4-3.2 mm (four octaves).

    ``texture.trabecular_texture`` adds octaves up to ~1 cm, which on the large flat bones of
    the pelvis read as clouds; the Hurst exponent still sets the roughness (docs/cohort.md §3.5).
    The oriented Singh groups are added on top by ``trabecular_density``.
    """
    n = fbm(shape, hurst, rng, finest_px=max(0.4 / mm_per_pixel, 1.0), octaves=4)
    t = np.maximum(F32(1.0) + F32(0.35) * n, F32(0.1))  # symmetric: no bright log-normal tail
    return (t / t.mean()).astype(F32)


def trabecular_density(
    scene: Scene,
    win: Window,
    g: FemurGeometry,
    case: CaseInputs,
    a_n: NDArray,
    v_n: NDArray,
    s_down: NDArray,
    outer: NDArray,
    inner: NDArray,
    rng: np.random.Generator,
) -> tuple[NDArray, dict[str, NDArray]]:
    """BV/TV field of the proximal femur with the Singh groups as streamline textures.

    Bands are placed from the landmarks; the grade sets their weights in the removal order
    of [S10]; the field is normalised over the FN ROI so that the neck's projected mineral
    equals the closure target whatever the grade. Group masks are the anatomical
    band extents (grade-independent); the Ward's triangle mask is its largest extent.
    """
    b = case.biomarkers
    k = g.size
    w = grade_weights(int(b["singh_grade"]))
    f = float(b["bvtv"])
    x, y = win.x, win.y
    shape = x.shape
    h = g.head
    up, lat, dist, th = g.superior, g.lateral, g.distal, g.to_head
    r_h, r_n = g.head_radius, g.neck_radius
    medial = -lat
    gain = np.full(shape, 0.55, dtype=F32)
    # The head is the densest trabecular bone of the proximal femur.
    gain += F32(0.4) * smoothstep((r_h - np.hypot(x - F32(h[0]), y - F32(h[1]))) / 6.0)
    masks: dict[str, NDArray] = {}

    def rect(pts: NDArray, pad: float) -> tuple[slice, slice] | None:
        pix = scene.placement.to_pixel(np.vstack([pts - pad, pts + pad])) - [win.c0, win.r0]
        c0 = max(int(np.floor(pix[:, 0].min())), 0)
        c1 = min(int(np.ceil(pix[:, 0].max())) + 1, shape[1])
        r0 = max(int(np.floor(pix[:, 1].min())), 0)
        r1 = min(int(np.ceil(pix[:, 1].max())) + 1, shape[0])
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)

    def add(
        name: str,
        member: NDArray,
        sl: tuple[slice, slice],
        centre: NDArray,
        spacing: float,
        weight: float,
        anat: NDArray | None = None,
    ) -> None:
        xs, ys = x[sl], y[sl]
        lines = line_texture(xs, ys, (float(centre[0]), float(centre[1])), spacing, rng, 1.0)
        lines *= streaks(xs, ys, centre, spacing, 4.0 * spacing, rng)
        gain[sl] += F32(weight) * member * (F32(0.5) + F32(1.2) * lines)
        full = np.zeros(shape, dtype=bool)
        full[sl] = (member if anat is None else anat) > 0.5
        masks[name] = full

    def seg_group(
        name: str,
        p0: NDArray,
        p1: NDArray,
        hw: tuple[float, float],
        bend: NDArray,
        spacing: float,
        weight: float,
        width: float = 1.0,
    ) -> None:
        sl = rect(np.array([p0, p1]), max(hw) + 2.0)
        if sl is None:
            return
        member = segment_band(x[sl], y[sl], p0, p1, (hw[0] * width, hw[1] * width))
        anat = segment_band(x[sl], y[sl], p0, p1, hw) if width != 1.0 else None
        add(name, member, sl, 0.5 * (p0 + p1) + bend * 160.0, spacing, weight, anat)

    # Principal compressive: calcar (inferior neck near its base) up into the superior head.
    pc0 = g.nk(g.neck_length - 10.0 * k, -0.8 * r_n)
    pc1 = h + unit(-dist + medial * 0.15) * 0.78 * r_h
    seg_group(
        "group_principal_compressive",
        pc0,
        pc1,
        (0.35 * r_n, 0.6 * r_h),
        lat,
        2.2,
        w["principal_compressive"],
        w["compressive_width"],
    )
    # Principal tensile: lateral cortex below the greater trochanter, arching over the
    # superior neck into the inferior head.
    t0 = g.sh(g.sub_radius - 3.0, 8.0 * k)
    tm = g.nk(r_h + 6.0, r_n - 3.5)
    t1 = h - up * 0.8 * r_h + th * 0.1 * r_h
    sl = rect(np.array([t0, tm, t1, h + up * (r_h + 4.0)]), 8.0 * k)
    if sl is not None:
        xs, ys = x[sl], y[sl]
        member, tau, centre = arc_band(xs, ys, (t0, tm, t1), 4.5 * k * w["tensile_width"])
        anat, _, _ = arc_band(xs, ys, (t0, tm, t1), 4.5 * k)
        if w["tensile_break"]:
            # Grade III: a gap in the lateral part of the arc, opposite the trochanter.
            member = member * (F32(1.0) - taper(np.abs(tau - F32(0.27)) / F32(0.17)))
        add("group_principal_tensile", member, sl, centre, 1.9, w["principal_tensile"], anat)
    # Secondary compressive: medial cortex near the LT level fanning up to the trochanter.
    sc0 = g.sh(-(g.sub_radius - 3.0), 24.0 * k)
    sc1 = g.sh(12.0 * k, -8.0 * k)
    seg_group(
        "group_secondary_compressive",
        sc0,
        sc1,
        (5.0 * k, 8.0 * k),
        unit(up + medial),
        1.6,
        w["secondary"],
    )
    # Secondary tensile: lateral cortex below the tensile origin, arching up-medially to the
    # middle of the neck base.
    st0 = g.sh(g.sub_radius - 3.0, 34.0 * k)
    st1 = g.nk(g.neck_length - 12.0 * k, -0.3 * r_n)
    seg_group(
        "group_secondary_tensile",
        st0,
        st1,
        (5.0 * k, 5.0 * k),
        unit(medial - up),
        1.6,
        w["secondary"],
    )
    # Greater-trochanter group: fine trabeculae running up into the trochanter.
    gt = g.sh(0.55 * g.sub_radius, -12.0 * k)
    seg_group(
        "group_greater_trochanter",
        gt + dist * 14.0 * k,
        gt - dist * 14.0 * k,
        (8.0 * k, 8.0 * k),
        medial,
        1.3,
        w["greater_trochanter"],
    )
    # Ward's triangle: between the compressive, secondary compressive and tensile groups.
    ward_c = g.nk(g.neck_length - 9.0 * k, -0.1 * r_n)
    rw = 6.0 * k
    sl = rect(ward_c[None, :], 2.5 * rw)
    if sl is not None:
        dw = np.hypot(x[sl] - F32(ward_c[0]), y[sl] - F32(ward_c[1]))
        gain[sl] *= F32(1.0) - F32(w["ward_depth"]) * taper(dw / F32(rw * w["ward_size"]))
        full = np.zeros(shape, dtype=bool)
        full[sl] = dw < rw * grade_weights(1)["ward_size"] * 0.5  # largest extent
        masks["wards_triangle"] = full
    # Metaphysis: trabecular bone fades into the marrow canal below the lesser trochanter.
    gain *= np.clip(((LT_LEVEL_MM + 45.0) * k - s_down) / (40.0 * k), 0.0, 1.0)
    # Normalise over the FN ROI (including this case's texture) so that the bone drawn there,
    # cortex as rendered plus trabecular, has the closure's cross-section
    # pi (R^2 - (R-c)^2) + f pi (R-c)^2 per unit neck length: the trabecular share absorbs
    # the small pixel-level error of the rendered cortex.
    roi = (a_n >= g.roi[0]) & (a_n <= g.roi[1]) & (np.abs(v_n) <= r_n)
    norm = 1.0
    if roi.any():
        c = float(b["fn_cortex_mm"])
        section = np.pi * (r_n**2 - (r_n - c) ** 2) + f * np.pi * (r_n - c) ** 2  # mm2
        target = float(roi.sum()) * section / (2.0 * r_n)  # summed chords (mm), ROI pixels
        cortex = float((outer[roi] - inner[roi]).sum())
        chords = inner[roi]
        tex = projected_texture(scene.texture_in(win)[roi], chords)
        drawn = float((gain[roi] * tex * chords).sum())
        if target > cortex and drawn > 0:
            norm = drawn / (target - cortex)
    return (gain / F32(max(norm, 1e-6))).astype(F32), masks
