"""Silhouettes inflated into projected bone, and the small drawing helpers they need.

A bone that is neither a tube nor an ellipsoid (a femur with its trochanters, a hemipelvis, a
sacrum) is described by a smooth closed outline built from landmarks (``chaikin``,
``chaikin_closed``, ``line_points``, ``rounded_rect``) and inflated into projected thickness
with a rounded profile: at distance d inside the outline the chord is 2 sqrt(d (T - d)) for a
section of depth T, which is exactly the chord of a cylinder where the outline is a band of
width T (a femoral neck, a shaft) and of a sphere for a round head (``profile_chords``). The
cortex is the difference with the same profile shrunk by the local cortical thickness, so a
thinner cortex shows as a thinner bright rim, as on a radiograph. ``commit_bone`` turns the two
chords and a BV/TV field into bone and marrow path lengths; ``slab`` does all of it for a flat
or irregular bone of uniform cortex.

The rest are the pieces a site composes its depth and density fields from: rasterised outlines
and distances on a ``Window`` (``window_mask``, ``inside_distance``, ``polyline_distance``),
Gaussian ridges and bumps, smooth membership of straight and arc-shaped bands
(``segment_band``, ``arc_band``), the averaging of trabecular texture along long paths
(``projected_texture``), random streaks that break streamline textures into rods (``streaks``)
and metal rods (``draw_rod``). None of it knows which site it draws; coordinates are the
anatomy frame of ``cohort.geometry`` (mm, y down).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from numpy.typing import NDArray

from cohort.geometry import Scene, Window, chord

F32 = np.float32

TEXTURE_CORRELATION_MM = 12.0  # paths shorter than this show the texture at full contrast


# --------------------------------------------------------------------------- outlines


def unit(v: NDArray) -> NDArray:
    return v / float(np.hypot(*v))


def chaikin(pts: NDArray, iterations: int = 3) -> NDArray:
    """Corner-cutting smoothing of an open polyline; the end points stay where they are."""
    p = np.asarray(pts, dtype=float)
    for _ in range(iterations):
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), 2))
        mid[0::2], mid[1::2] = q, r
        p = np.vstack([p[:1], mid[1:-1], p[-1:]])
    return p


def chaikin_closed(pts: NDArray, iterations: int = 2) -> NDArray:
    """Corner-cutting smoothing of a closed polygon."""
    p = np.asarray(pts, dtype=float)
    for _ in range(iterations):
        nxt = np.roll(p, -1, axis=0)
        out = np.empty((2 * len(p), 2))
        out[0::2], out[1::2] = 0.75 * p + 0.25 * nxt, 0.25 * p + 0.75 * nxt
        p = out
    return p


def line_points(p0: NDArray, p1: NDArray, n: int = 12) -> NDArray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return p0 * (1 - t) + p1 * t


def smoothstep(x: NDArray) -> NDArray:
    t = np.clip(x, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(F32)


def taper(dist_over_halfwidth: NDArray) -> NDArray:
    """1 on a band's centre line, falling smoothly (cosine) to 0 at its half-width."""
    return (0.5 + 0.5 * np.cos(np.pi * np.clip(dist_over_halfwidth, 0.0, 1.0))).astype(F32)


def rounded_rect(cx: float, cy: float, hw: float, hh: float, r: float) -> NDArray:
    pts = []
    for (qx, qy), a0 in (((1, 1), 0), ((-1, 1), 90), ((-1, -1), 180), ((1, -1), 270)):
        for a in np.deg2rad(np.linspace(a0, a0 + 90, 6)):
            pts.append((cx + qx * (hw - r) + r * np.cos(a), cy + qy * (hh - r) + r * np.sin(a)))
    return np.array(pts)


# --------------------------------------------------------------------------- rasterising


def local_poly(scene: Scene, win: Window, pts: NDArray) -> NDArray:
    """Polygon in window pixel coordinates, fixed-point with 2 fractional bits for cv2."""
    px = scene.placement.to_pixel(pts) - np.array([win.c0, win.r0], dtype=float)
    return np.round(px * 4).astype(np.int32).reshape(-1, 1, 2)


def window_mask(
    scene: Scene, win: Window, outline: NDArray, holes: tuple[NDArray, ...] = ()
) -> NDArray:
    local = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=np.uint8)
    cv2.fillPoly(local, [local_poly(scene, win, outline)], 1, lineType=cv2.LINE_8, shift=2)
    for hole in holes:
        cv2.fillPoly(local, [local_poly(scene, win, hole)], 0, lineType=cv2.LINE_8, shift=2)
    return local


def inside_distance(scene: Scene, local: NDArray) -> NDArray:
    """Distance (mm, patient plane) from each inside pixel to the outline."""
    d = cv2.distanceTransform(local, cv2.DIST_L2, 5)
    # The outline lies half a pixel outside the last inside pixel centre.
    return np.maximum(d - F32(0.5), 0.0) * F32(scene.placement.mm_per_pixel)


def polyline_distance(scene: Scene, win: Window, pts: NDArray) -> NDArray:
    """Distance (mm) from each window pixel to a polyline."""
    canvas = np.full((win.r1 - win.r0, win.c1 - win.c0), 1, dtype=np.uint8)
    cv2.polylines(canvas, [local_poly(scene, win, pts)], False, 0, 1, cv2.LINE_8, shift=2)
    # With the polyline outside the window there is no zero pixel and the transform returns
    # FLT_MAX; cap it before scaling to mm.
    d = np.minimum(cv2.distanceTransform(canvas, cv2.DIST_L2, 3), F32(1e6))
    return d * F32(scene.placement.mm_per_pixel)


# --------------------------------------------------------------------------- inflated bone


def profile_chords(
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


def projected_texture(tex: NDArray, chord_mm: NDArray) -> NDArray:
    """Texture of a projection through ``chord_mm`` of trabecular bone.

    Along a long path many trabeculae average out: the relative fluctuation of the projected
    density falls as sqrt(correlation length / path), so a thick femoral head looks finer and
    smoother than a thin iliac wing instead of blotchy. The mean stays 1.
    """
    damp = np.sqrt(F32(TEXTURE_CORRELATION_MM) / np.maximum(chord_mm, F32(TEXTURE_CORRELATION_MM)))
    return F32(1.0) + (tex - F32(1.0)) * damp


def commit_bone(
    scene: Scene, win: Window, outer: NDArray, inner: NDArray, density: NDArray
) -> None:
    """Cortex, trabecular bone (BV/TV field x mean-1 texture) and marrow path lengths (cm)."""
    tex = projected_texture(scene.texture_in(win), inner)
    trab = np.clip(density * tex, 0.0, 1.0) * inner
    scene.path("bone")[win.slc] += (outer - inner + trab) / F32(10.0)
    scene.path("marrow")[win.slc] += (inner - trab) / F32(10.0)


def slab(
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
    local = window_mask(scene, win, outline, holes)
    d = inside_distance(scene, local)
    depth = thickness(win)
    c = np.full(d.shape, cortex, dtype=F32)
    outer, inner = profile_chords(d, depth, c, c + c)
    commit_bone(scene, win, outer, inner, np.full(d.shape, bvtv, dtype=F32))


# --------------------------------------------------------------------------- depth and bands


def gauss_ridges(scene: Scene, win: Window, ridges: list[tuple[NDArray, float, float]]) -> NDArray:
    out = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=F32)
    for pts, amp, sig in ridges:
        d = np.minimum(polyline_distance(scene, win, pts), F32(1e3))  # no overflow in d * d
        out += F32(amp) * np.exp(-(d * d) / F32(2 * sig * sig))
    return out


def gauss_bumps(win: Window, bumps: list[tuple[float, float, float, float]]) -> NDArray:
    out = np.zeros((win.r1 - win.r0, win.c1 - win.c0), dtype=F32)
    for bx, by, amp, sig in bumps:
        out += F32(amp) * np.exp(
            -((win.x - F32(bx)) ** 2 + (win.y - F32(by)) ** 2) / F32(2 * sig * sig)
        )
    return out


def segment_band(
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
    return taper(d / half) * ends


def circumcircle(a: NDArray, b: NDArray, c: NDArray) -> tuple[NDArray, float]:
    d = 2.0 * (a[0] * (b[1] - c[1]) + b[0] * (c[1] - a[1]) + c[0] * (a[1] - b[1]))
    a2, b2, c2 = a @ a, b @ b, c @ c
    ux = (a2 * (b[1] - c[1]) + b2 * (c[1] - a[1]) + c2 * (a[1] - b[1])) / d
    uy = (a2 * (c[0] - b[0]) + b2 * (a[0] - c[0]) + c2 * (b[0] - a[0])) / d
    centre = np.array([ux, uy])
    return centre, float(np.hypot(*(a - centre)))


def arc_band(
    x: NDArray, y: NDArray, pts: tuple[NDArray, NDArray, NDArray], hw: float
) -> tuple[NDArray, NDArray, NDArray]:
    """Band along the circular arc through three points: membership, arc parameter tau (0 at
    pts[0], 1 at pts[2]) and the circle centre (for the streamline texture)."""
    centre, radius = circumcircle(*pts)
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
    return taper(np.abs(r - F32(radius)) / F32(hw)) * ends, tau, centre


def streaks(
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


# --------------------------------------------------------------------------- metal


def draw_rod(
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
