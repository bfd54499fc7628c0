"""Hip / pelvis AP radiograph (COHORT.md §3.5): the proximal femur carries the signal.

Frame: AP view, millimetres, x to the viewer's right, y down, origin at the field centre. The
index hip (the DXA side) is always drawn on the image left, which in the AP convention is the
patient's RIGHT hip; a left index hip is the mirror image (``Placement.mirror``), so it lands on
the image right as it should. The contralateral femur is drawn on the other side with the same
bone status, its own textures and a slightly different leg rotation.

The field is centred so that the femoral shafts reach the CTI level (10 cm below the lesser
trochanter) at nominal magnification; the iliac crests are partly cut off, as on a 35 x 43 cm
plate that has to include the proximal shafts.

Bones are drawn as silhouettes (smooth outlines from landmarks) inflated into projected
thickness with a rounded profile: at distance d inside the outline the chord is
2 sqrt(d (T - d)) for a section of depth T, which is exactly the chord of a cylinder where the
outline is a band of width T (the femoral neck, the shaft) and of a sphere for the head. The
cortex is the difference with the same profile shrunk by the local cortical thickness, so a
thinner cortex shows as a thinner bright rim, as on a radiograph.

Closure to DXA: the femoral neck is a cylinder of radius R with a cortex c (superior and
inferior thicknesses averaging c) and trabecular BV/TV f solved so that
rho_min [pi (R^2 - (R-c)^2) + f pi (R-c)^2] / (2R) equals the target aBMD. The trabecular density
field is normalised over the FN ROI, texture included, so that the bone drawn there has exactly
that cross-section per unit neck length. The neck is drawn in the image plane: leg rotation
foreshortens its length and opens the apparent neck-shaft angle but leaves the cross-section, so
the projected mineral per unit neck width in the FN ROI is the target (checked to ~0.2 %); the
DXA-vs-radiograph discrepancy is the explicit delta term.

Signal: every bone here follows the site T-score (femora: neck cortex, BV/TV, Singh groups, shaft
CTI; pelvis, sacrum and lumbar spine: trabecular BV/TV and a milder cortical scaling), because
osteoporosis is systemic; so the 'signal' mask is all bone, as for the hand.

Masks: body, soft_tissue, bone, signal; femur (index femur outline); fn_roi (DXA-style box
perpendicular to the neck axis, FN_ROI_MM long, R + 2 mm either side); neck_cortex_superior /
neck_cortex_inferior (free neck, head-neck junction to the ROI end); trochanter_roi (trochanteric
and intertrochanteric region above the lesser trochanter, beyond the neck base); wards_triangle
(largest extent); group_principal_compressive, group_principal_tensile,
group_secondary_compressive, group_secondary_tensile, group_greater_trochanter (anatomical band
extents, the same at every grade); shaft_cortex_cti (both shaft cortices within 7.5 mm of the CTI
level; empty when that level is off the plate); and, when present, bowel_gas, implant and
collimator (lead shutters; those pixels are removed from body and bone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene, Window, chord, draw_tube, paste, polygon_mask, tube_band_mask
from cohort.nuisance import AcquisitionSpec
from cohort.presets import FN_REFERENCE_MEAN, FN_REFERENCE_SD
from cohort.sampler import Table
from cohort.sites.base import CaseInputs
from cohort.texture import fbm, line_texture

F32 = np.float32

RHO_MIN = 1.15  # g/cm3, mineral density of the closure model (COHORT.md §3.5) [E]
CORTEX_PER_SCALE_MM = 1.6  # c = 1.6 mm * s
BVTV_PER_SCALE = 0.18  # f = 0.18 * s
CLOSURE_ITERATIONS = 48  # bisection halvings: the bracket ends far below 1e-9 of a scale unit
REFERENCE_SCALE = 0.87  # s at T = 0 for a 16 mm neck: other bones scale relative to it

# Field layout at size 1 (mm): head-centre half-distance and level.
HEAD_X = 87.0
HEAD_Y = -45.0
SHAFT_TILT_DEG = 8.0  # anatomical femoral axis, distal end towards the midline
LT_LEVEL_MM = 30.0  # lesser trochanter below the neck/shaft axis crossing, along the shaft
CTI_BELOW_LT_MM = 100.0  # CTI is measured 10 cm below the lesser trochanter [S12]
METAPHYSIS_MM = 60.0  # below the LT the cortex reaches its diaphyseal thickness
FN_ROI_MM = 15.0  # DXA femoral-neck box length along the neck axis (Hologic-like)
TEXTURE_CORRELATION_MM = 12.0  # paths shorter than this show the texture at full contrast

# Hemipelvis outline as (lateral, down) offsets from the head centre in mm, lateral > 0: iliac
# crest from the sacro-iliac joint to the ASIS, AIIS, the acetabular rim, the posterior wall over
# the head, the ischium to the tuberosity, the ischiopubic ramus, the symphysis, the superior
# ramus and back up the pelvic brim.
_HEMIPELVIS = (
    (-37.0, -100.0),
    (-28.0, -115.0),
    (-12.0, -126.0),
    (8.0, -130.0),
    (26.0, -124.0),
    (40.0, -110.0),
    (48.0, -92.0),
    (50.0, -78.0),
    (46.0, -68.0),
    (42.0, -60.0),
    (40.0, -50.0),
    (32.0, -40.0),
    (22.0, -32.0),
    (15.0, -27.0),
    (17.0, -12.0),
    (14.0, 5.0),
    (8.0, 18.0),
    (4.0, 27.0),
    (8.0, 40.0),
    (12.0, 55.0),
    (14.0, 68.0),
    (12.0, 80.0),
    (4.0, 88.0),
    (-8.0, 90.0),
    (-20.0, 86.0),
    (-35.0, 78.0),
    (-50.0, 70.0),
    (-65.0, 62.0),
    (-76.0, 55.0),
    (-82.0, 50.0),
    (-84.5, 45.0),
    (-84.5, 13.0),
    (-80.0, 8.0),
    (-70.0, 8.0),
    (-55.0, 10.0),
    (-42.0, 8.0),
    (-32.0, 2.0),
    (-25.0, -8.0),
    (-22.0, -22.0),
    (-24.0, -40.0),
    (-28.0, -60.0),
    (-33.0, -80.0),
)
# Obturator foramen, a rounded oblique oval (lateral, down).
_OBTURATOR = (
    (-16.0, 26.0),
    (-40.0, 22.0),
    (-58.0, 28.0),
    (-64.0, 40.0),
    (-58.0, 52.0),
    (-42.0, 62.0),
    (-24.0, 66.0),
    (-13.0, 58.0),
    (-10.0, 44.0),
)
_PELVIS_BASE_MM = 7.0  # thin iliac fossa
_RAMI_MM = 12.0  # extra depth below the acetabulum: rami and ischium are bars, not plates
# Thickened ridges of the hemipelvis: polyline (lateral, down), amplitude and sigma (mm).
_PELVIS_RIDGES = (
    (((-33.0, -100.0), (-10.0, -122.0), (20.0, -122.0), (40.0, -103.0), (49.0, -78.0)), 9.0, 6.0),
    (((10.0, -30.0), (28.0, -70.0), (36.0, -100.0)), 9.0, 9.0),  # iliac pillar
    (((-34.0, -85.0), (-30.0, -55.0), (-27.0, -30.0)), 10.0, 8.0),  # SI / sciatic buttress
    (((-26.0, -50.0), (-22.0, -22.0), (-25.0, -8.0), (-34.0, 2.0), (-55.0, 10.0)), 5.0, 4.0),
    (((2.0, 0.0), (6.0, 40.0), (6.0, 78.0)), 8.0, 8.0),  # posterior column to the tuberosity
    (((-18.0, -2.0), (-17.0, 12.0), (-21.0, 20.0), (-26.0, 14.0), (-26.0, -2.0)), 5.0, 1.3),
)
_PELVIS_BUMPS = (
    (-6.0, -16.0, 22.0, 18.0),  # acetabular body over the head
    (4.0, 76.0, 12.0, 11.0),  # ischial tuberosity
    (-76.0, 30.0, 8.0, 11.0),  # pubic body
)
# Sacrum: right half (x, down from the head level) mm, mirrored to close it.
_SACRUM_HALF = (
    (0.0, -108.0),
    (22.0, -108.0),
    (38.0, -104.0),
    (47.0, -99.0),
    (47.0, -86.0),
    (44.0, -66.0),
    (38.0, -46.0),
    (30.0, -28.0),
    (22.0, -12.0),
    (14.0, 2.0),
    (8.0, 14.0),
    (4.0, 22.0),
    (0.0, 24.0),
)
_SACRAL_FORAMINA = ((22.0, -88.0, 5.0), (20.0, -68.0, 4.5), (17.0, -49.0, 4.0), (14.0, -32.0, 3.5))


def closure_abmd(scale: NDArray, radius_mm: NDArray) -> NDArray:
    """aBMD (g/cm2) of a neck cylinder: rho_min [pi(R^2 - (R-c)^2) + f pi (R-c)^2] / (2R)."""
    r = np.asarray(radius_mm, dtype=float) / 10.0
    c = CORTEX_PER_SCALE_MM / 10.0 * np.asarray(scale, dtype=float)
    f = BVTV_PER_SCALE * np.asarray(scale, dtype=float)
    ri2 = (r - c) ** 2
    return RHO_MIN * (np.pi * (r * r - ri2) + f * np.pi * ri2) / (2.0 * r)


def closure_scale(target: NDArray, radius_mm: NDArray) -> NDArray:
    """Vectorised bisection for s with aBMD(c = 1.6 mm s, f = 0.18 s) = target (§3.5).

    aBMD(s) rises monotonically while the cortex is thinner than the neck radius, so a fixed
    number of halvings of [0, R / 1.6 mm] converges for every patient at once.
    """
    tgt = np.asarray(target, dtype=float)
    r = np.broadcast_to(np.asarray(radius_mm, dtype=float), tgt.shape)
    lo = np.zeros(tgt.shape)
    hi = r / CORTEX_PER_SCALE_MM * 0.999
    for _ in range(CLOSURE_ITERATIONS):
        mid = 0.5 * (lo + hi)
        high = closure_abmd(mid, r) > tgt
        hi = np.where(high, mid, hi)
        lo = np.where(high, lo, mid)
    return 0.5 * (lo + hi)


def _grade_weights(grade: int) -> dict[str, float]:
    """Singh removal order [S10]: weight of each trabecular group and Ward's triangle by grade.

    VI all groups; V Ward's triangle enlarges; IV secondary groups fade and the tensile group
    thins; III the tensile group breaks opposite the greater trochanter; II only the principal
    compressive group remains; I it is thinned too.
    """
    g = int(grade)
    return {
        "principal_compressive": 1.0 if g >= 2 else 0.55,
        "compressive_width": 1.0 if g >= 2 else 0.6,
        "principal_tensile": {6: 1.0, 5: 1.0, 4: 0.6, 3: 0.5}.get(g, 0.0),
        "tensile_width": 1.0 if g >= 5 else 0.6,
        "tensile_break": 1.0 if g <= 3 else 0.0,
        "secondary": {6: 1.0, 5: 0.75, 4: 0.3, 3: 0.15}.get(g, 0.0),
        "greater_trochanter": {6: 1.0, 5: 0.8, 4: 0.45, 3: 0.2}.get(g, 0.0),
        "ward_size": {6: 1.0, 5: 1.4, 4: 1.65, 3: 1.9, 2: 2.1}.get(g, 2.3),
        "ward_depth": {6: 0.55, 5: 0.7, 4: 0.75, 3: 0.8, 2: 0.85}.get(g, 0.85),
    }


# --------------------------------------------------------------------------- small geometry


def _trabecular_texture(
    shape: tuple[int, int], hurst: float, rng: np.random.Generator, mm_per_pixel: float
) -> NDArray:
    """Mean-1 trabecular mottle: fBm over 0.4-3.2 mm (four octaves).

    ``texture.trabecular_texture`` adds octaves up to ~1 cm, which on the large flat bones of
    the pelvis read as clouds; the Hurst exponent still sets the roughness (COHORT.md §3.5).
    The oriented Singh groups are added on top by ``_streaks``.
    """
    n = fbm(shape, hurst, rng, finest_px=max(0.4 / mm_per_pixel, 1.0), octaves=4)
    t = np.maximum(F32(1.0) + F32(0.35) * n, F32(0.1))  # symmetric: no bright log-normal tail
    return (t / t.mean()).astype(F32)


def _streaks(
    x: NDArray,
    y: NDArray,
    centre: NDArray,
    spacing_mm: float,
    segment_mm: float,
    rng: np.random.Generator,
) -> NDArray:
    """Mean-1 random streaks along the circles about ``centre``: value noise that changes
    every ``spacing_mm`` across the streamlines and every ``segment_mm`` along them.

    Multiplied into ``texture.line_texture`` it breaks the regular arcs into trabecular rods of
    random length and strength. The draw count depends only on the window geometry.
    """
    dx, dy = x - F32(centre[0]), y - F32(centre[1])
    r = np.hypot(dx, dy)
    # Angles about the window's mean direction, so the branch cut falls outside the window.
    phi = float(np.arctan2(dy.mean(), dx.mean()))
    cp, sp = F32(np.cos(phi)), F32(np.sin(phi))
    theta = np.arctan2(dy * cp - dx * sp, dx * cp + dy * sp)
    r0 = float(r.mean())
    u = r / F32(spacing_mm)
    w = theta * F32(r0 / segment_mm)
    u0, w0 = float(u.min()), float(w.min())
    h = int(np.ceil(float(u.max()) - u0)) + 3
    wd = int(np.ceil(float(w.max()) - w0)) + 3
    grid = rng.gamma(4.0, 0.25, size=(min(h, 4096), min(wd, 4096))).astype(F32)
    return cv2.remap(
        grid,
        (w - F32(w0)).astype(F32),
        (u - F32(u0)).astype(F32),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )


def _unit(v: NDArray) -> NDArray:
    return v / float(np.hypot(*v))


def _chaikin(pts: NDArray, iterations: int = 3) -> NDArray:
    """Corner-cutting smoothing of an open polyline; the end points stay where they are."""
    p = np.asarray(pts, dtype=float)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        p = np.vstack([p[:1], mid[1:-1], p[-1:]])
    return p


def _chaikin_closed(pts: NDArray, iterations: int = 2) -> NDArray:
    """Corner-cutting smoothing of a closed polygon."""
    p = np.asarray(pts, dtype=float)
    for _ in range(iterations):
        nxt = np.roll(p, -1, axis=0)
        out = np.empty((2 * len(p), 2))
        out[0::2], out[1::2] = 0.75 * p + 0.25 * nxt, 0.25 * p + 0.75 * nxt
        p = out
    return p


def _line(p0: NDArray, p1: NDArray, n: int = 12) -> NDArray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return p0 * (1 - t) + p1 * t


def _smoothstep(x: NDArray) -> NDArray:
    t = np.clip(x, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(F32)


def _taper(dist_over_halfwidth: NDArray) -> NDArray:
    """1 on a band's centre line, falling smoothly (cosine) to 0 at its half-width."""
    return (0.5 + 0.5 * np.cos(np.pi * np.clip(dist_over_halfwidth, 0.0, 1.0))).astype(F32)


def _rounded_rect(cx: float, cy: float, hw: float, hh: float, r: float) -> NDArray:
    pts = []
    for (qx, qy), a0 in (((1, 1), 0), ((-1, 1), 90), ((-1, -1), 180), ((1, -1), 270)):
        for a in np.deg2rad(np.linspace(a0, a0 + 90, 6)):
            pts.append((cx + qx * (hw - r) + r * np.cos(a), cy + qy * (hh - r) + r * np.sin(a)))
    return np.array(pts)


def _local_poly(scene: Scene, win: Window, pts: NDArray) -> NDArray:
    """Polygon in window pixel coordinates, fixed-point with 2 fractional bits for cv2."""
    px = scene.placement.to_pixel(pts) - np.array([win.c0, win.r0], dtype=float)
    return np.round(px * 4).astype(np.int32).reshape(-1, 1, 2)


def _window_mask(
    scene: Scene, win: Window, outline: NDArray, holes: tuple[NDArray, ...] = ()
) -> NDArray:
    local = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=np.uint8)
    cv2.fillPoly(local, [_local_poly(scene, win, outline)], 1, lineType=cv2.LINE_8, shift=2)
    for hole in holes:
        cv2.fillPoly(local, [_local_poly(scene, win, hole)], 0, lineType=cv2.LINE_8, shift=2)
    return local


def _inside_distance(scene: Scene, local: NDArray) -> NDArray:
    """Distance (mm, patient plane) from each inside pixel to the outline."""
    d = cv2.distanceTransform(local, cv2.DIST_L2, 5)
    # The outline lies half a pixel outside the last inside pixel centre.
    return np.maximum(d - F32(0.5), 0.0) * F32(scene.placement.mm_per_pixel)


def _polyline_distance(scene: Scene, win: Window, pts: NDArray) -> NDArray:
    """Distance (mm) from each window pixel to a polyline."""
    canvas = np.full((win.r1 - win.r0, win.c1 - win.c0), 1, dtype=np.uint8)
    cv2.polylines(canvas, [_local_poly(scene, win, pts)], False, 0, 1, cv2.LINE_8, shift=2)
    # With the polyline outside the window there is no zero pixel and the transform returns
    # FLT_MAX; cap it before scaling to mm.
    d = np.minimum(cv2.distanceTransform(canvas, cv2.DIST_L2, 3), F32(1e6))
    return d * F32(scene.placement.mm_per_pixel)


def _profile_chords(
    d: NDArray, depth: NDArray, c_near: NDArray, c_sum: NDArray
) -> tuple[NDArray, NDArray]:
    """Outer and inner chords (mm) of a rounded section: 2 sqrt(d (T - d)), d capped at T/2.

    ``c_near`` is the cortex on the side of the nearest outline, ``c_sum`` the cortices of both
    sides; with them the canal is the off-centre circle of draw_tube's unequal cortices.
    """
    dd = np.minimum(d, depth * F32(0.5))
    outer = F32(2.0) * np.sqrt(np.maximum(dd * (depth - dd), 0.0))
    di = d - c_near
    ti = np.maximum(depth - c_sum, 0.0)
    ddi = np.clip(di, 0.0, ti * F32(0.5))
    inner = F32(2.0) * np.sqrt(np.maximum(ddi * (ti - ddi), 0.0))
    return outer, np.minimum(inner, outer)


def _projected_texture(tex: NDArray, chord_mm: NDArray) -> NDArray:
    """Texture of a projection through ``chord_mm`` of trabecular bone.

    Along a long path many trabeculae average out: the relative fluctuation of the projected
    density falls as sqrt(correlation length / path), so a thick femoral head looks finer and
    smoother than a thin iliac wing instead of blotchy. The mean stays 1.
    """
    damp = np.sqrt(F32(TEXTURE_CORRELATION_MM) / np.maximum(chord_mm, F32(TEXTURE_CORRELATION_MM)))
    return F32(1.0) + (tex - F32(1.0)) * damp


def _commit(scene: Scene, win: Window, outer: NDArray, inner: NDArray, density: NDArray) -> None:
    """Cortex, trabecular bone (BV/TV field x mean-1 texture) and marrow path lengths (cm)."""
    tex = _projected_texture(scene.texture_in(win), inner)
    trab = np.clip(density * tex, 0.0, 1.0) * inner
    scene.path("bone")[win.slc] += (outer - inner + trab) / F32(10.0)
    scene.path("marrow")[win.slc] += (inner - trab) / F32(10.0)


def _slab(
    scene: Scene,
    outline: NDArray,
    holes: tuple[NDArray, ...],
    thickness: Callable[[Window], NDArray],
    cortex: float,
    bvtv: float,
) -> None:
    """A flat or irregular bone: outline with holes, projected depth from ``thickness``, rounded
    edges and a cortical skin whose tangential projection draws the bright cortical lines."""
    win = scene.window(outline)
    if win is None:
        return
    local = _window_mask(scene, win, outline, holes)
    d = _inside_distance(scene, local)
    depth = thickness(win)
    c = np.full(d.shape, cortex, dtype=F32)
    outer, inner = _profile_chords(d, depth, c, c + c)
    _commit(scene, win, outer, inner, np.full(d.shape, bvtv, dtype=F32))


def _gauss_ridges(scene: Scene, win: Window, ridges: list[tuple[NDArray, float, float]]) -> NDArray:
    out = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=F32)
    for pts, amp, sig in ridges:
        d = np.minimum(_polyline_distance(scene, win, pts), F32(1e3))  # no overflow in d * d
        out += F32(amp) * np.exp(-(d * d) / F32(2 * sig * sig))
    return out


def _gauss_bumps(win: Window, bumps: list[tuple[float, float, float, float]]) -> NDArray:
    out = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=F32)
    for bx, by, amp, sig in bumps:
        out += F32(amp) * np.exp(
            -((win.x - F32(bx)) ** 2 + (win.y - F32(by)) ** 2) / F32(2 * sig * sig)
        )
    return out


def _segment_band(
    x: NDArray, y: NDArray, p0: NDArray, p1: NDArray, hw: tuple[float, float]
) -> NDArray:
    """Membership of a band along p0->p1 whose half-width goes hw[0] -> hw[1], ends faded."""
    axis = p1 - p0
    length2 = float(axis @ axis)
    t = ((x - F32(p0[0])) * F32(axis[0]) + (y - F32(p0[1])) * F32(axis[1])) / F32(length2)
    tc = np.clip(t, 0.0, 1.0)
    d = np.hypot(x - (F32(p0[0]) + tc * F32(axis[0])), y - (F32(p0[1]) + tc * F32(axis[1])))
    half = F32(hw[0]) + tc * F32(hw[1] - hw[0])
    ends = np.clip(np.minimum(t, 1.0 - t) / 0.12 + 0.5, 0.0, 1.0)
    return _taper(d / half) * ends


def _circumcircle(a: NDArray, b: NDArray, c: NDArray) -> tuple[NDArray, float]:
    d = 2.0 * (a[0] * (b[1] - c[1]) + b[0] * (c[1] - a[1]) + c[0] * (a[1] - b[1]))
    a2, b2, c2 = a @ a, b @ b, c @ c
    ux = (a2 * (b[1] - c[1]) + b2 * (c[1] - a[1]) + c2 * (a[1] - b[1])) / d
    uy = (a2 * (c[0] - b[0]) + b2 * (a[0] - c[0]) + c2 * (b[0] - a[0])) / d
    centre = np.array([ux, uy])
    return centre, float(np.hypot(*(a - centre)))


def _arc_band(
    x: NDArray, y: NDArray, pts: tuple[NDArray, NDArray, NDArray], hw: float
) -> tuple[NDArray, NDArray, NDArray]:
    """Band along the circular arc through three points: membership, arc parameter tau (0 at
    pts[0], 1 at pts[2]) and the circle centre (for the streamline texture)."""
    centre, radius = _circumcircle(*pts)
    two_pi = 2.0 * np.pi

    def ang(p: NDArray) -> float:
        return float(np.arctan2(p[1] - centre[1], p[0] - centre[0]))

    a0, am, a1 = ang(pts[0]), ang(pts[1]), ang(pts[2])
    sweep = (a1 - a0) % two_pi
    sign = 1.0
    if (am - a0) % two_pi > sweep:
        sign, sweep = -1.0, two_pi - sweep
    theta = np.arctan2(y - F32(centre[1]), x - F32(centre[0]))
    tau = ((F32(sign) * (theta - F32(a0))) % F32(two_pi)) / F32(sweep)
    # Angles just before pts[0] wrap to ~2 pi / sweep; fold them back to small negatives.
    tau = np.where(tau > 0.5 + np.pi / sweep, tau - F32(two_pi / sweep), tau)
    r = np.hypot(x - F32(centre[0]), y - F32(centre[1]))
    ends = np.clip(np.minimum(tau, 1.0 - tau) / 0.06 + 0.5, 0.0, 1.0)
    return _taper(np.abs(r - F32(radius)) / F32(hw)) * ends, tau, centre


@dataclass(frozen=True)
class _FemurGeometry:
    """Landmarks of one proximal femur in the anatomy frame (mm)."""

    head: NDArray  # head centre
    head_radius: float
    neck_radius: float
    junction: NDArray  # projected neck axis meets the shaft axis
    to_head: NDArray  # unit, junction -> head (projected neck axis)
    superior: NDArray  # unit normal of the neck axis pointing up
    distal: NDArray  # unit, shaft axis towards the knee
    lateral: NDArray  # unit normal of the shaft axis pointing away from the midline
    neck_length: float  # projected, head centre -> junction
    shaft_radius: float
    sub_radius: float  # just below the trochanters
    roi: tuple[float, float]  # FN ROI along the neck axis, mm from the head centre
    size: float

    def nk(self, along: float, up: float) -> NDArray:
        """Neck frame: ``along`` mm from the head centre towards the shaft, ``up`` superior."""
        return self.head - self.to_head * along + self.superior * up

    def sh(self, lat: float, down: float) -> NDArray:
        """Shaft frame: ``lat`` mm lateral of the shaft axis, ``down`` mm below the junction."""
        return self.junction + self.lateral * lat + self.distal * down

    def shaft_coords(self, p: NDArray) -> tuple[float, float]:
        q = p - self.junction
        return float(q @ self.lateral), float(q @ self.distal)


class HipSite:
    """AP pelvis with both proximal femora; closure of the femoral neck to DXA (§3.5)."""

    name: ClassVar[str] = "hip"
    body_part: ClassVar[str] = "HIP"
    view_position: ClassVar[str] = "AP"
    acquisition: ClassVar[AcquisitionSpec] = AcquisitionSpec(
        plates_mm=((430.0, 350.0),),
        cr_pitches_mm=((0.15, 0.20),),
        kvp=(70.0, 85.0),
        photons_per_pixel=800.0,
        spr_grid=(0.5, 1.5),
        spr_no_grid=(2.0, 5.0),
        p_grid=0.7,
        magnification=(1.05, 1.25),
    )
    biomarker_columns: ClassVar[tuple[str, ...]] = (
        "abmd_target",
        "closure_scale",
        "fn_cortex_mm",
        "fn_cortex_sup_mm",
        "fn_cortex_inf_mm",
        "bvtv",
        "singh_grade",
        "cti",
        "shaft_width_mm",
        "shaft_cortex_mm",
        "neck_radius_mm",
        "neck_shaft_angle_deg",
        "hurst",
    )

    def sample_variation(self, patients: Table, rng: np.random.Generator) -> Table:
        """Anatomy and per-biomarker noise, independent of bone status."""
        n = int(patients["age_years"].shape[0])
        male = patients["sex_male"].astype(bool)
        height_scale = patients["height_m"] / np.where(male, 1.72, 1.59)
        size = np.clip(height_scale * rng.normal(1.0, 0.03, n), 0.88, 1.15) * np.where(
            male, 1.03, 0.97
        )
        head = np.where(male, rng.uniform(24.5, 27.0, n), rng.uniform(22.0, 24.5, n))
        neck = np.where(male, rng.uniform(16.0, 17.5, n), rng.uniform(15.0, 16.5, n))
        shaft = np.where(male, rng.normal(14.5, 0.7, n), rng.normal(13.3, 0.6, n))
        rotation = rng.uniform(-15.0, 15.0, n)
        bmi = patients["bmi"]
        return {
            "size_scale": size,
            "head_radius_mm": np.clip(head * np.sqrt(height_scale), 22.0, 27.0),
            "neck_radius_mm": np.clip(neck * np.sqrt(height_scale), 15.0, 17.5),
            "shaft_radius_mm": np.clip(shaft * np.sqrt(height_scale), 12.5, 17.0),
            "neck_shaft_angle_deg": np.clip(rng.normal(130.0 - 1.5 * male, 4.5, n), 120.0, 140.0),
            "anteversion_deg": np.clip(rng.normal(13.0, 6.0, n), 0.0, 30.0),
            # Positive = internal rotation, which brings the anteverted neck into the plate plane.
            "leg_rotation_deg": rotation,
            "contralateral_rotation_deg": np.clip(rotation + rng.normal(0.0, 5.0, n), -20, 20),
            "soft_tissue_ap_mm": np.clip(
                240.0 + 8.5 * (bmi - 27.0) + rng.normal(0.0, 12.0, n), 180.0, 320.0
            ),
            "abmd_delta": rng.normal(0.0, 0.03, n),  # DXA-vs-radiograph discrepancy [E]
            "cti_noise": rng.normal(0.0, 0.015, n),
            # COHORT.md §3.5 gives N(0, 0.8); with rho_hip = 0.8 that yields r(G, T) = 0.54, just
            # above the published 0.3-0.5 [S10, S11], so the noise is widened to 1.0 (r = 0.50).
            "singh_noise": rng.normal(0.0, 1.0, n),
            "hurst_noise": rng.normal(0.0, 0.045, n),
            "bowel_gas": (rng.random(n) < 0.10).astype(np.int8),
            "implant": (rng.random(n) < 0.03).astype(np.int8),
        }

    def biomarkers(self, t_site: np.ndarray, variation: Table, patients: Table) -> Table:
        """Closure to DXA, neck-cortex asymmetry, CTI, Singh grade and Hurst exponent (§3.5)."""
        t = np.asarray(t_site, dtype=float)
        r = np.asarray(variation["neck_radius_mm"], dtype=float)
        target = np.maximum(FN_REFERENCE_MEAN + FN_REFERENCE_SD * t + variation["abmd_delta"], 0.1)
        s = closure_scale(target, r)
        c = CORTEX_PER_SCALE_MM * s
        # The superior cortex loses 1.38/0.62 = 2.2x what the inferior loses [S12b, S12c]; the
        # pair keeps the mean c (so the closure holds) even when the superior one hits its floor.
        c_ref = CORTEX_PER_SCALE_MM * closure_scale(np.full_like(t, FN_REFERENCE_MEAN), r)
        loss = c_ref - c
        c_sup = np.maximum(0.7 * c_ref - 1.38 * loss, 0.15)
        c_inf = np.maximum(2.0 * c - c_sup, 0.15)
        male = patients["sex_male"].astype(bool)
        cti = np.clip(
            np.where(male, 0.56, 0.62) + 0.035 * (t + 2.5) + variation["cti_noise"], 0.35, 0.80
        )
        width = 2.0 * np.asarray(variation["shaft_radius_mm"], dtype=float)
        grade = np.clip(np.round(4.5 + 0.6 * t + variation["singh_noise"]), 1, 6)
        return {
            "abmd_target": target,
            "closure_scale": s,
            "fn_cortex_mm": c,
            "fn_cortex_sup_mm": c_sup,
            "fn_cortex_inf_mm": c_inf,
            "bvtv": BVTV_PER_SCALE * s,
            "singh_grade": grade.astype(np.int8),
            "cti": cti,
            "shaft_width_mm": width,
            "shaft_cortex_mm": cti * width / 2.0,
            "neck_radius_mm": r,
            "neck_shaft_angle_deg": np.asarray(variation["neck_shaft_angle_deg"], dtype=float),
            "hurst": np.clip(0.68 + 0.03 * t + variation["hurst_noise"], 0.5, 0.8),
        }

    def scatter_scale(self, case: CaseInputs) -> float:
        return float(case.variation["soft_tissue_ap_mm"]) / 240.0

    # ------------------------------------------------------------------ build

    def build(self, scene: Scene, case: CaseInputs, rng: np.random.Generator) -> None:
        """Draw the case. Random draws happen in a fixed order whatever the bone status, so the
        counterfactual render of §3.10 differs from this one only in the bones."""
        v, b = case.variation, case.biomarkers
        k = float(v["size_scale"])
        mmpp = scene.placement.mm_per_pixel
        scene.texture = _trabecular_texture(scene.shape, float(b["hurst"]), rng, mmpp)
        s_rel = min(float(b["closure_scale"]) / REFERENCE_SCALE, 1.6)
        pelvis_bvtv = float(np.clip(0.85 * float(b["bvtv"]), 0.02, 0.3))
        pelvis_cortex = 0.55 + 0.45 * s_rel
        self._pelvis(scene, k, float(v["head_radius_mm"]), pelvis_cortex, pelvis_bvtv, s_rel)
        self._femur(scene, case, -1, float(v["leg_rotation_deg"]), rng, masks=True)
        contra = self._femur(
            scene, case, 1, float(v["contralateral_rotation_deg"]), rng, masks=False
        )
        bone = scene.path("bone") > 0
        gas = self._bowel_gas(scene, k, rng) if v["bowel_gas"] else None
        if v["implant"]:
            self._implant(scene, contra, rng)
        self._soft_tissue(scene, case, k, gas)
        shutters = self._collimate(scene, rng)
        if shutters is not None:
            bone &= ~shutters
            scene.masks["body"] &= ~shutters
        scene.masks["bone"] = bone
        scene.masks["signal"] = bone.copy()
        scene.masks["soft_tissue"] = scene.masks["body"] & ~bone

    # ------------------------------------------------------------------ pelvis

    def _pelvis(
        self, scene: Scene, k: float, head_r: float, cortex: float, bvtv: float, s_rel: float
    ) -> None:
        """Hemipelves (ilium, acetabulum, rami round the obturator foramen), sacrum, L5/L4."""
        hy = HEAD_Y * k
        for sx in (-1.0, 1.0):
            hx = sx * HEAD_X * k

            def frame(pts: NDArray, hx: float = hx, sx: float = sx) -> NDArray:
                p = np.asarray(pts, dtype=float).reshape(-1, 2)
                return np.column_stack([hx + sx * k * p[:, 0], hy + k * p[:, 1]])

            hole = frame(_chaikin_closed(np.array(_OBTURATOR), 3))
            ridges = [(frame(np.array(p)), amp, sig * k) for p, amp, sig in _PELVIS_RIDGES]
            bumps = [
                (hx + sx * k * bl, hy + k * bd, amp, sig * k) for bl, bd, amp, sig in _PELVIS_BUMPS
            ]

            def thickness(
                win: Window,
                ridges: list[tuple[NDArray, float, float]] = ridges,
                bumps: list[tuple[float, float, float, float]] = bumps,
            ) -> NDArray:
                # Thin iliac fossa above the acetabulum, rounded bars (rami, ischium) below it.
                base = F32(_PELVIS_BASE_MM * k) + F32(_RAMI_MM * k) * _smoothstep(
                    (win.y - F32(hy - 25.0 * k)) / F32(35.0 * k)
                )
                return base + _gauss_ridges(scene, win, ridges) + _gauss_bumps(win, bumps)

            outline = frame(_chaikin_closed(np.array(_HEMIPELVIS), 2))
            _slab(scene, outline, (hole,), thickness, cortex, bvtv)
            self._sourcil(scene, np.array([hx, hy]), head_r, sx, s_rel)
        half = np.array(_SACRUM_HALF)
        sacrum = np.vstack([half, half[::-1][1:-1] * [-1.0, 1.0]]) * k + [0.0, hy]
        dips = []
        for fx, fy, fr in _SACRAL_FORAMINA:
            for sx in (-1.0, 1.0):
                dips.append((sx * fx * k, hy + fy * k, -10.0, fr * k * 0.8))
        mid = np.array([[0.0, hy - 108.0 * k], [0.0, hy + 20.0 * k]])

        def sacral(win: Window) -> NDArray:
            return np.maximum(
                F32(12.0 * k)
                + _gauss_ridges(scene, win, [(mid, 10.0, 12.0 * k)])
                + _gauss_bumps(win, dips),
                F32(4.0),
            )

        _slab(scene, sacrum, (), sacral, cortex, bvtv)
        # L5 and L4 bodies and L5 transverse processes: above the field unless it is shifted.
        for cy in (-132.0, -168.0):
            body = _rounded_rect(0.0, cy, 26.0, 13.0, 5.0) * k + [0.0, hy]
            _slab(scene, body, (), lambda w: np.full(w.x.shape, 34.0 * k, F32), cortex, bvtv)
        for sx in (-1.0, 1.0):
            proc = np.array([[14, -140], [52, -134], [55, -126], [16, -126]]) * [sx, 1.0] * k
            _slab(
                scene,
                proc + [0.0, hy],
                (),
                lambda w: np.full(w.x.shape, 12.0 * k, F32),
                cortex,
                bvtv,
            )

    def _sourcil(self, scene: Scene, head: NDArray, head_r: float, sx: float, s_rel: float) -> None:
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

    # ------------------------------------------------------------------ femur

    def _femur_geometry(self, case: CaseInputs, sx: int, rotation_deg: float) -> _FemurGeometry:
        v = case.variation
        k = float(v["size_scale"])
        r_h = float(v["head_radius_mm"])
        r_n = float(v["neck_radius_mm"])
        head = np.array([sx * HEAD_X * k, HEAD_Y * k])
        # The neck's angle out of the plate plane is anteversion minus internal rotation: it
        # shortens the projected neck and opens the apparent neck-shaft angle.
        beta = np.deg2rad(180.0 - float(v["neck_shaft_angle_deg"]))
        out_of_plane = np.deg2rad(float(v["anteversion_deg"]) - rotation_deg)
        medial = np.sin(beta) * np.cos(out_of_plane)
        beta_app = float(np.arctan2(medial, np.cos(beta)))
        neck_len = (r_h + 32.0 * k) * float(np.hypot(medial, np.cos(beta)))
        phi = np.deg2rad(SHAFT_TILT_DEG)
        distal = np.array([-sx * np.sin(phi), np.cos(phi)])
        lateral = np.array([sx * np.cos(phi), np.sin(phi)])
        to_head = _unit(np.cos(beta_app) * -distal + np.sin(beta_app) * -lateral)
        superior = np.array([-to_head[1], to_head[0]])
        if superior[1] > 0:
            superior = -superior
        r_shaft = float(v["shaft_radius_mm"]) * k
        roi0 = float(np.sqrt(r_h * r_h - r_n * r_n)) + 4.0
        return _FemurGeometry(
            head=head,
            head_radius=r_h,
            neck_radius=r_n,
            junction=head - neck_len * to_head,
            to_head=to_head,
            superior=superior,
            distal=distal,
            lateral=lateral,
            neck_length=neck_len,
            shaft_radius=r_shaft,
            sub_radius=1.1 * r_shaft,
            roi=(roi0, roi0 + FN_ROI_MM),
            size=k,
        )

    def _femur_outline(self, g: _FemurGeometry, lt_prominence: float) -> NDArray:
        """Closed silhouette: head arc, straight neck margins at +-R through the FN ROI, the
        greater trochanter and lateral shaft, the lesser trochanter and calcar (smoothed)."""
        r_h, r_n, k = g.head_radius, g.neck_radius, g.size
        a_j = float(np.sqrt(r_h * r_h - r_n * r_n))
        nb = g.roi[1] + 3.0
        hn_s, hn_i = g.nk(a_j, r_n), g.nk(a_j, -r_n)
        nb_s, nb_i = g.nk(nb, r_n), g.nk(nb, -r_n)
        fossa = nb_s + g.superior * 1.5 - g.to_head * 2.0
        f_lat, f_down = g.shaft_coords(fossa)
        r_sh = g.shaft_radius
        lt, meta = LT_LEVEL_MM * k, (LT_LEVEL_MM + METAPHYSIS_MM) * k
        end = meta + 30.0 * k
        gt_tip = g.sh(0.55 * r_sh + 3.0, -28.0 * k)  # GT tip, a little below the head centre
        lateral_chain = np.array(
            [
                nb_s,
                fossa,
                gt_tip,
                g.sh(r_sh + 2.0, -24.0 * k),
                g.sh(r_sh + 4.5, -12.0 * k),
                g.sh(r_sh + 3.5, 2.0),  # vastus ridge
                g.sh(r_sh + 1.5, lt),
                g.sh(r_sh + 0.3, lt + 25.0 * k),
                g.sh(r_sh, meta - 12.0 * k),
                g.sh(r_sh, meta),
                g.sh(r_sh, end),
            ]
        )
        # Calcar: a concave fillet from the inferior neck margin into the medial shaft line,
        # a quadratic Bezier whose control point is where the two lines meet.
        medial_line = -(r_sh + 2.5)
        i_lat, _ = g.shaft_coords(nb_i)
        toward_shaft = float(-g.to_head @ g.lateral)
        reach = (medial_line - i_lat) / toward_shaft if toward_shaft > 1e-6 else 0.0
        control = nb_i - g.to_head * max(reach, 0.0)
        _, c_down = g.shaft_coords(control)
        lt_top = g.sh(medial_line, max(lt - 8.0, c_down + 4.0))
        s_par = np.linspace(0.0, 1.0, 10)[:, None]
        fillet = ((1 - s_par) ** 2) * lt_top + 2 * (1 - s_par) * s_par * control + s_par**2 * nb_i
        medial_chain = np.vstack(
            [
                _chaikin(
                    np.array(
                        [
                            g.sh(-r_sh, end),
                            g.sh(-r_sh, meta),
                            g.sh(-r_sh, meta - 12.0 * k),
                            g.sh(-(r_sh + 0.5), lt + 30.0 * k),
                            g.sh(-(r_sh + 2.5), lt + 12.0),
                            g.sh(
                                -(r_sh + 3.5 + 5.0 * lt_prominence), lt + 2.0
                            ),  # lesser trochanter
                            lt_top,
                        ]
                    ),
                    4,
                ),
                fillet[1:],
            ]
        )
        # Head arc between points 3.5 mm short of the head-neck junction, joined to the neck
        # margins 3.5 mm past it by Bezier fillets (the head-neck offset) whose control points
        # are the sharp junctions; the FN ROI starts beyond them.
        back = a_j - 3.5
        half = float(np.sqrt(r_h * r_h - back * back))
        arc_s, arc_i = g.nk(back, half), g.nk(back, -half)
        a_s = np.arctan2(*(arc_s - g.head)[::-1])
        a_i = np.arctan2(*(arc_i - g.head)[::-1])
        away = np.arctan2(*(g.to_head)[::-1])  # direction from the head away from the neck
        # Go from the inferior to the superior point through the side facing away.
        sweep = float((a_s - a_i) % (2 * np.pi))
        if np.cos(a_i + sweep / 2.0 - away) < 0:
            sweep -= 2 * np.pi
        ang = a_i + np.linspace(0.0, sweep, 64)
        head_arc = g.head + r_h * np.column_stack([np.cos(ang), np.sin(ang)])
        neck_s, neck_i = g.nk(a_j + 3.5, r_n), g.nk(a_j + 3.5, -r_n)
        t = np.linspace(0.0, 1.0, 8)[:, None]

        def bezier(p0: NDArray, c: NDArray, p1: NDArray) -> NDArray:
            return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p1

        return np.vstack(
            [
                head_arc,
                bezier(arc_s, hn_s, neck_s)[1:],
                _line(neck_s, nb_s)[1:-1],
                _chaikin(lateral_chain, 4),
                medial_chain,
                _line(nb_i, neck_i)[1:-1],
                bezier(neck_i, hn_i, arc_i)[:-1],
            ]
        )

    def _femur(
        self,
        scene: Scene,
        case: CaseInputs,
        sx: int,
        rotation_deg: float,
        rng: np.random.Generator,
        *,
        masks: bool,
    ) -> _FemurGeometry:
        """One proximal femur (sx = -1: image left, the index side) with its shaft."""
        b = case.biomarkers
        g = self._femur_geometry(case, sx, rotation_deg)
        k, r_h, r_n = g.size, g.head_radius, g.neck_radius
        s_rel = min(float(b["closure_scale"]) / REFERENCE_SCALE, 1.6)
        c_sup, c_inf = float(b["fn_cortex_sup_mm"]), float(b["fn_cortex_inf_mm"])
        c_shaft = float(b["shaft_cortex_mm"]) * k
        thin = 0.45 + 0.45 * s_rel  # head and trochanter shell
        # External rotation turns the lesser trochanter into profile, internal hides it.
        lt_prom = float(np.clip(0.55 - 0.03 * rotation_deg, 0.1, 1.0))
        outline = self._femur_outline(g, lt_prom)
        lt, meta = LT_LEVEL_MM * k, (LT_LEVEL_MM + METAPHYSIS_MM) * k
        shaft_end = g.sh(0.0, 450.0 * k)

        win = scene.window(outline)
        if win is not None:
            local = _window_mask(scene, win, outline)
            d = _inside_distance(scene, local)
            x, y = win.x, win.y
            px, py = x - F32(g.head[0]), y - F32(g.head[1])
            a_n = -(px * F32(g.to_head[0]) + py * F32(g.to_head[1]))  # along the neck from head
            v_n = px * F32(g.superior[0]) + py * F32(g.superior[1])
            qx, qy = x - F32(g.junction[0]), y - F32(g.junction[1])
            s_lat = qx * F32(g.lateral[0]) + qy * F32(g.lateral[1])
            s_down = qx * F32(g.distal[0]) + qy * F32(g.distal[1])
            a_j = float(np.sqrt(r_h * r_h - r_n * r_n))
            roi1 = g.roi[1]
            # Depth (AP thickness): sphere in the head, cylinder 2R through the neck, a broad
            # trochanteric block, and the shaft cylinder narrowing to its diaphyseal radius.
            w_neck = _smoothstep((roi1 + 10.0 - a_n) / 8.0)
            w_head = _smoothstep((a_j - 1.0 - a_n) / 6.0)
            t_hn = F32(2 * r_n) + F32(2 * (r_h - r_n)) * w_head
            r_sh = g.shaft_radius
            knots = [lt, lt + 25.0 * k, meta - 12.0 * k]
            r_down = np.interp(s_down, knots, [r_sh + 2.0, r_sh + 0.4, r_sh]).astype(F32)
            w_troch = _smoothstep((lt + 5.0 - s_down) / 20.0)
            t_ts = F32(2.0) * r_down * (F32(1.0) + F32(0.12) * w_troch)
            gt_side = _smoothstep((s_lat - 0.5 * r_sh) / 8.0) * _smoothstep(-s_down / 10.0)
            t_ts *= F32(1.0) - F32(0.2) * gt_side
            depth = w_neck * t_hn + (F32(1.0) - w_neck) * t_ts
            # Cortex on the superior / lateral side (A) and the inferior / medial side (B): thin
            # round the trochanters, a thick calcar medially, both reaching the CTI cortex.
            ramp = np.clip((s_down - F32(lt)) / F32(meta - 12.0 * k - lt), 0.0, 1.0)
            calcar = np.maximum(F32(2.2 * c_inf) * _smoothstep((s_down + 10.0) / 20.0), F32(thin))
            ca_ts = F32(thin) + (F32(c_shaft) - F32(thin)) * ramp
            cb_ts = calcar + (F32(c_shaft) - calcar) * ramp
            ca_n = F32(c_sup) + (F32(thin) - F32(c_sup)) * w_head
            cb_n = F32(c_inf) + (F32(thin) - F32(c_inf)) * w_head
            c_a = w_neck * ca_n + (F32(1.0) - w_neck) * ca_ts
            c_b = w_neck * cb_n + (F32(1.0) - w_neck) * cb_ts
            side_a = np.where(w_neck > 0.5, v_n > 0, s_lat > 0)
            c_near = np.where(side_a, c_a, c_b)
            outer, inner = _profile_chords(d, depth, c_near, c_a + c_b)
            keep = (s_down <= F32(meta)).astype(F32)
            outer *= keep
            inner *= keep
            density, groups = self._trabecular_density(
                scene, win, g, case, a_n, v_n, s_down, outer, inner, rng
            )
            _commit(scene, win, outer, inner, density)
        distal_tube = draw_tube(
            scene,
            tuple(g.sh(0.0, meta)),
            tuple(shaft_end),
            (g.shaft_radius, 0.9 * g.shaft_radius),
            (c_shaft, 0.9 * c_shaft),
            fill="marrow",
        )
        if not masks:
            return g
        if win is not None:
            femur = (local > 0) & (s_down <= F32(meta))
            paste(scene, "femur", win, femur)
            for name, m in groups.items():
                paste(scene, name, win, m & femur)
            free_neck = (a_n >= a_j + 1.0) & (a_n <= roi1 + 2.0) & femur
            in_cortex = d < c_near
            paste(scene, "neck_cortex_superior", win, free_neck & in_cortex & (v_n > 0))
            paste(scene, "neck_cortex_inferior", win, free_neck & in_cortex & (v_n <= 0))
            # Trochanteric + intertrochanteric region: above the LT, beyond the neck base.
            paste(scene, "trochanter_roi", win, femur & (s_down < F32(lt)) & (a_n > roi1 + 3.0))
        centre = g.nk(0.5 * (g.roi[0] + g.roi[1]), 0.0)
        along = g.to_head * FN_ROI_MM / 2.0
        across = g.superior * (r_n + 2.0)
        box = np.array(
            [
                centre - along - across,
                centre + along - across,
                centre + along + across,
                centre - along + across,
            ]
        )
        scene.masks["fn_roi"] = polygon_mask(scene, box)
        if distal_tube is not None:
            paste(scene, "femur", distal_tube.win, tube_band_mask(distal_tube, (0.0, 1.0), "all"))
            length = float(np.hypot(*(shaft_end - g.sh(0.0, meta))))
            u_cti = (CTI_BELOW_LT_MM - METAPHYSIS_MM) * k / length
            half = 7.5 * k / length
            paste(
                scene,
                "shaft_cortex_cti",
                distal_tube.win,
                tube_band_mask(distal_tube, (u_cti - half, u_cti + half), "cortex"),
            )
        return g

    def _trabecular_density(
        self,
        scene: Scene,
        win: Window,
        g: _FemurGeometry,
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
        w = _grade_weights(int(b["singh_grade"]))
        f = float(b["bvtv"])
        x, y = win.x, win.y
        shape = x.shape
        h = g.head
        up, lat, dist, th = g.superior, g.lateral, g.distal, g.to_head
        r_h, r_n = g.head_radius, g.neck_radius
        medial = -lat
        gain = np.full(shape, 0.55, dtype=F32)
        # The head is the densest trabecular bone of the proximal femur.
        gain += F32(0.4) * _smoothstep((r_h - np.hypot(x - F32(h[0]), y - F32(h[1]))) / 6.0)
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
            lines *= _streaks(xs, ys, centre, spacing, 4.0 * spacing, rng)
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
            member = _segment_band(x[sl], y[sl], p0, p1, (hw[0] * width, hw[1] * width))
            anat = _segment_band(x[sl], y[sl], p0, p1, hw) if width != 1.0 else None
            add(name, member, sl, 0.5 * (p0 + p1) + bend * 160.0, spacing, weight, anat)

        # Principal compressive: calcar (inferior neck near its base) up into the superior head.
        pc0 = g.nk(g.neck_length - 10.0 * k, -0.8 * r_n)
        pc1 = h + _unit(-dist + medial * 0.15) * 0.78 * r_h
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
            member, tau, centre = _arc_band(xs, ys, (t0, tm, t1), 4.5 * k * w["tensile_width"])
            anat, _, _ = _arc_band(xs, ys, (t0, tm, t1), 4.5 * k)
            if w["tensile_break"]:
                # Grade III: a gap in the lateral part of the arc, opposite the trochanter.
                member = member * (F32(1.0) - _taper(np.abs(tau - F32(0.27)) / F32(0.17)))
            add("group_principal_tensile", member, sl, centre, 1.9, w["principal_tensile"], anat)
        # Secondary compressive: medial cortex near the LT level fanning up to the trochanter.
        sc0 = g.sh(-(g.sub_radius - 3.0), 24.0 * k)
        sc1 = g.sh(12.0 * k, -8.0 * k)
        seg_group(
            "group_secondary_compressive",
            sc0,
            sc1,
            (5.0 * k, 8.0 * k),
            _unit(up + medial),
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
            _unit(medial - up),
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
            gain[sl] *= F32(1.0) - F32(w["ward_depth"]) * _taper(dw / F32(rw * w["ward_size"]))
            full = np.zeros(shape, dtype=bool)
            full[sl] = dw < rw * _grade_weights(1)["ward_size"] * 0.5  # largest extent
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
            tex = _projected_texture(scene.texture_in(win)[roi], chords)
            drawn = float((gain[roi] * tex * chords).sum())
            if target > cortex and drawn > 0:
                norm = drawn / (target - cortex)
        return (gain / F32(max(norm, 1e-6))).astype(F32), masks

    # ------------------------------------------------------------------ soft tissue and extras

    def _soft_tissue(self, scene: Scene, case: CaseInputs, k: float, gas: NDArray | None) -> None:
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
        waist = _smoothstep((hy + 30.0 * k - y) / (150.0 * k))
        a = F32(a_hip) * (F32(1.0) - F32(0.10) * waist)
        groin = hy + 100.0 * k
        w_trunk = F32(1.0) - _smoothstep((y - (groin - 30.0 * k)) / (110.0 * k))

        def shape(
            xc: float, half: NDArray | float, d: float, power: float
        ) -> tuple[NDArray, NDArray]:
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

    def _collimate(self, scene: Scene, rng: np.random.Generator) -> NDArray | None:
        """Lateral collimator shutters near the skin edges (COHORT.md §3.5 nuisance), in 80 %.

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

    def _bowel_gas(self, scene: Scene, k: float, rng: np.random.Generator) -> NDArray:
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

    def _implant(self, scene: Scene, g: _FemurGeometry, rng: np.random.Generator) -> None:
        """Contralateral cannulated screws across the neck, or surgical clips in the groin."""
        iron = scene.path("iron")
        mask = scene.mask("implant")
        if rng.random() < 0.5:
            start = g.sh(g.shaft_radius + 3.0, 14.0 * g.size)  # heads just on the lateral cortex
            direction = _unit(g.head - start)
            length = float(np.hypot(*(g.head - start))) + g.head_radius * 0.55
            normal = np.array([-direction[1], direction[0]])
            for off in (-7.0, 0.0, 7.0):
                p0 = start + normal * off
                _rod(scene, iron, mask, p0, p0 + direction * length, 3.2, 1.3)
        else:
            centre = g.head + np.array([-np.sign(g.lateral[0]) * 40.0, 60.0])
            for _ in range(int(rng.integers(3, 8))):
                c = centre + rng.normal(0, 18, 2)
                ang = rng.uniform(0, np.pi)
                d = np.array([np.cos(ang), np.sin(ang)])
                n = np.array([-d[1], d[0]])
                for side in (-1.0, 1.0):
                    p0 = c + n * side * 1.2
                    _rod(scene, iron, mask, p0 - d * 3.5, p0 + d * 3.5, 0.45, 0.0)


def _rod(
    scene: Scene,
    iron: NDArray,
    mask: NDArray,
    p0: NDArray,
    p1: NDArray,
    radius: float,
    bore: float,
) -> None:
    """A metal cylinder (optionally cannulated) as iron path length."""
    pts = np.array([p0, p1])
    win = scene.window(np.vstack([pts - radius, pts + radius]))
    if win is None:
        return
    axis = p1 - p0
    length = float(np.hypot(*axis))
    ux, uy = axis / length
    dx, dy = win.x - F32(p0[0]), win.y - F32(p0[1])
    u = (dx * F32(ux) + dy * F32(uy)) / F32(length)
    vv = dx * F32(-uy) + dy * F32(ux)
    inside = ((u >= 0) & (u <= 1)).astype(F32)
    path: NDArray = chord(radius, vv) * inside
    if bore > 0:
        path = path - chord(bore, vv) * inside
    iron[win.slc] += path / F32(10.0)
    mask[win.slc] |= path > 0.05
