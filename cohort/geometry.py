"""Analytic 2-D primitives that accumulate material path lengths (docs/cohort.md §3.3, step 1).

Anatomy is described in millimetres in a site's own frame (x to the right, y down, origin at the
centre of the field). ``Placement`` maps that frame onto the detector grid: rotation, translation,
mirroring (left/right) and magnification. Every primitive is evaluated only inside its bounding
box, on the detector grid itself, so rendering cost follows the anatomy, not the plate size.

Path lengths are kept in centimetres per material (``cohort.materials.MATERIALS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

F32 = np.float32


@dataclass(frozen=True)
class Placement:
    """Anatomy frame (mm) -> detector pixel coordinates."""

    rows: int
    cols: int
    pitch_mm: float
    rotation_deg: float = 0.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    mirror: bool = False
    magnification: float = 1.0

    def _matrix(self) -> NDArray:
        """2x3 affine from anatomy mm to pixel (col, row)."""
        th = np.deg2rad(self.rotation_deg)
        s = self.magnification / self.pitch_mm
        mx = -1.0 if self.mirror else 1.0
        c, si = np.cos(th), np.sin(th)
        a = np.array([[c * mx, -si], [si * mx, c]]) * s
        centre = np.array([(self.cols - 1) / 2.0, (self.rows - 1) / 2.0])
        t = centre + np.asarray(self.shift_mm) / self.pitch_mm
        return np.hstack([a, t[:, None]])

    def to_pixel(self, pts_mm: NDArray) -> NDArray:
        m = self._matrix()
        p = np.asarray(pts_mm, dtype=float).reshape(-1, 2)
        return p @ m[:, :2].T + m[:, 2]

    def to_mm(self, cols: NDArray, rows: NDArray) -> tuple[NDArray, NDArray]:
        """Pixel grid (broadcastable arrays) -> anatomy mm coordinates."""
        m = self._matrix()
        inv = np.linalg.inv(m[:, :2])
        dc = cols - m[0, 2]
        dr = rows - m[1, 2]
        x = inv[0, 0] * dc + inv[0, 1] * dr
        y = inv[1, 0] * dc + inv[1, 1] * dr
        return x.astype(F32), y.astype(F32)

    @property
    def mm_per_pixel(self) -> float:
        """Anatomy millimetres spanned by one detector pixel (patient plane)."""
        return self.pitch_mm / self.magnification


@dataclass
class Window:
    """A bounding box on the detector and the anatomy coordinates of its pixel centres."""

    r0: int
    r1: int
    c0: int
    c1: int
    x: NDArray
    y: NDArray

    @property
    def slc(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)


@dataclass
class Scene:
    """Path-length maps (cm) and region masks on the detector grid."""

    placement: Placement
    paths: dict[str, NDArray] = field(default_factory=dict)
    masks: dict[str, NDArray] = field(default_factory=dict)
    # Mean-1 trabecular texture over the whole detector, set by the site before drawing bone.
    texture: NDArray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.placement.rows, self.placement.cols

    def path(self, material: str) -> NDArray:
        if material not in self.paths:
            self.paths[material] = np.zeros(self.shape, dtype=F32)
        return self.paths[material]

    def mask(self, name: str) -> NDArray:
        if name not in self.masks:
            self.masks[name] = np.zeros(self.shape, dtype=bool)
        return self.masks[name]

    def window(self, corners_mm: NDArray, margin_px: int = 2) -> Window | None:
        """Pixel window covering the given anatomy-frame points, clipped to the detector."""
        px = self.placement.to_pixel(corners_mm)
        c0 = max(int(np.floor(px[:, 0].min())) - margin_px, 0)
        c1 = min(int(np.ceil(px[:, 0].max())) + margin_px + 1, self.placement.cols)
        r0 = max(int(np.floor(px[:, 1].min())) - margin_px, 0)
        r1 = min(int(np.ceil(px[:, 1].max())) + margin_px + 1, self.placement.rows)
        if c1 <= c0 or r1 <= r0:
            return None
        rows = np.arange(r0, r1, dtype=F32)[:, None]
        cols = np.arange(c0, c1, dtype=F32)[None, :]
        x, y = self.placement.to_mm(cols, rows)
        return Window(r0, r1, c0, c1, x, y)

    def texture_in(self, win: Window) -> NDArray:
        if self.texture is None:
            return np.ones((win.r1 - win.r0, win.c1 - win.c0), dtype=F32)
        return self.texture[win.slc]


def _bbox_corners(xmin: float, xmax: float, ymin: float, ymax: float) -> NDArray:
    return np.array([[xmin, ymin], [xmax, ymin], [xmin, ymax], [xmax, ymax]])


def chord(radius: NDArray | float, dist: NDArray) -> NDArray:
    """Length through a circle of ``radius`` along a line at ``dist`` from its centre."""
    r2 = np.asarray(radius, dtype=F32) ** 2 - dist * dist
    return (2.0 * np.sqrt(np.maximum(r2, 0.0))).astype(F32)


@dataclass(frozen=True)
class TubeResult:
    """Per-pixel quantities of a drawn tube, for masks."""

    win: Window
    u: NDArray  # axial position 0..1
    v: NDArray  # signed perpendicular distance (mm)
    outer: NDArray  # outer radius at u (mm)
    inner_lo: NDArray  # inner surface on the v<0 side (mm, positive)
    inner_hi: NDArray  # inner surface on the v>0 side (mm, positive)


def draw_tube(
    scene: Scene,
    p0: tuple[float, float],
    p1: tuple[float, float],
    outer: tuple[float, float],
    cortex: tuple[float, float] | tuple[float, float, float, float],
    *,
    fill: str = "marrow",
    bvtv: float = 0.0,
    porosity: float = 0.0,
    porosity_field: NDArray | None = None,
    endosteal: tuple[NDArray, NDArray] | None = None,
    end_taper_mm: tuple[float, float] = (0.0, 0.0),
) -> TubeResult | None:
    """A tapered bone shaft along p0->p1 (mm): cortical shell and a filled canal.

    ``outer`` is the outer radius at p0 and p1. ``cortex`` is the cortical thickness at p0 and
    p1 for both sides, or (lo0, lo1, hi0, hi1) for different thickness on the two sides (v < 0 /
    v > 0), which is how radial/ulnar and superior/inferior asymmetry are drawn. ``endosteal``
    gives two 1-D profiles (mm, sampled evenly along the axis) added to the inner radius on each
    side: endosteal roughness. The canal holds marrow, or trabecular bone at ``bvtv`` with the
    scene texture. ``porosity`` lowers cortical density by the mean of ``porosity_field``.
    ``end_taper_mm`` fades the tube in over that length at p0 / p1, so a shaft can end inside an
    epiphysis without a hard edge.
    """
    a = np.asarray(p0, dtype=F32)
    b = np.asarray(p1, dtype=F32)
    axis = b - a
    length = float(np.hypot(*axis))
    if length <= 0:
        return None
    rmax = max(outer)
    xs = [a[0] - rmax, a[0] + rmax, b[0] - rmax, b[0] + rmax]
    ys = [a[1] - rmax, a[1] + rmax, b[1] - rmax, b[1] + rmax]
    win = scene.window(_bbox_corners(min(xs), max(xs), min(ys), max(ys)))
    if win is None:
        return None
    dx = win.x - a[0]
    dy = win.y - a[1]
    ux, uy = axis / length
    u = (dx * ux + dy * uy) / length
    v = dx * -uy + dy * ux
    inside = ((u >= 0.0) & (u <= 1.0)).astype(F32)
    if end_taper_mm[0] > 0:
        inside *= np.clip(u * length / end_taper_mm[0], 0.0, 1.0)
    if end_taper_mm[1] > 0:
        inside *= np.clip((1.0 - u) * length / end_taper_mm[1], 0.0, 1.0)
    uc = np.clip(u, 0.0, 1.0)
    r_out = outer[0] + (outer[1] - outer[0]) * uc
    if len(cortex) == 2:
        c_lo0, c_lo1, c_hi0, c_hi1 = cortex[0], cortex[1], cortex[0], cortex[1]
    else:
        c_lo0, c_lo1, c_hi0, c_hi1 = cortex
    c_lo = c_lo0 + (c_lo1 - c_lo0) * uc
    c_hi = c_hi0 + (c_hi1 - c_hi0) * uc
    in_lo = r_out - c_lo
    in_hi = r_out - c_hi
    if endosteal is not None:
        grid = np.linspace(0.0, 1.0, len(endosteal[0]))
        in_lo = in_lo + np.interp(uc, grid, endosteal[0]).astype(F32)
        in_hi = in_hi + np.interp(uc, grid, endosteal[1]).astype(F32)
    in_lo = np.clip(in_lo, 0.05, r_out - 0.05)
    in_hi = np.clip(in_hi, 0.05, r_out - 0.05)
    # The canal is a circle of radius (in_lo + in_hi)/2 centred (in_hi - in_lo)/2 off the axis.
    r_in = 0.5 * (in_lo + in_hi)
    off = 0.5 * (in_hi - in_lo)
    outer_len = chord(r_out, v) * inside
    inner_len = chord(r_in, v - off) * inside
    cortex_len = np.maximum(outer_len - inner_len, 0.0)
    if porosity > 0:
        field_ = porosity_field[win.slc] if porosity_field is not None else 1.0
        cortex_len = cortex_len * np.clip(1.0 - porosity * field_, 0.0, 1.0)
    sl = win.slc
    scene.path("bone")[sl] += cortex_len / 10.0
    _fill(scene, win, inner_len, fill, bvtv)
    return TubeResult(win=win, u=u, v=v, outer=r_out, inner_lo=in_lo, inner_hi=in_hi)


def _fill(scene: Scene, win: Window, length_mm: NDArray, fill: str, bvtv: float) -> None:
    sl = win.slc
    if fill == "trabecular" and bvtv > 0:
        bone = np.clip(bvtv * scene.texture_in(win), 0.0, 1.0) * length_mm
        scene.path("bone")[sl] += bone / 10.0
        scene.path("marrow")[sl] += (length_mm - bone) / 10.0
    else:
        scene.path(fill)[sl] += length_mm / 10.0


def draw_ellipsoid(
    scene: Scene,
    centre: tuple[float, float],
    axes: tuple[float, float],
    depth: float,
    angle_deg: float = 0.0,
    *,
    cortex: float = 0.0,
    fill: str = "trabecular",
    bvtv: float = 0.15,
    material: str | None = None,
    texture_gain: NDArray | None = None,
) -> tuple[Window, NDArray] | None:
    """An ellipsoid (semi-axes ``axes`` in-plane, ``depth`` along the beam), optionally a bone
    with a cortical shell of thickness ``cortex`` around trabecular or marrow fill.

    With ``material`` the whole body is that material (a ring, a gas pocket with 'air' handled
    by the caller). ``texture_gain`` (window-shaped) multiplies the trabecular density: this is
    how trabecular groups and Ward's triangle are drawn. Returns the window and the normalised
    radius map (< 1 inside), for masks.
    """
    a, b = axes
    r = max(a, b)
    win = scene.window(_bbox_corners(centre[0] - r, centre[0] + r, centre[1] - r, centre[1] + r))
    if win is None:
        return None
    th = np.deg2rad(angle_deg)
    dx = win.x - centre[0]
    dy = win.y - centre[1]
    xr = dx * np.cos(th) + dy * np.sin(th)
    yr = -dx * np.sin(th) + dy * np.cos(th)
    rho2 = (xr / a) ** 2 + (yr / b) ** 2
    total = 2.0 * depth * np.sqrt(np.maximum(1.0 - rho2, 0.0))
    sl = win.slc
    if material is not None:
        scene.path(material)[sl] += (total / 10.0).astype(F32)
        return win, np.sqrt(rho2)
    if cortex > 0:
        k = max(1.0 - cortex / min(a, b, depth), 0.05)
        inner_rho2 = rho2 / (k * k)
        inner = 2.0 * depth * k * np.sqrt(np.maximum(1.0 - inner_rho2, 0.0))
    else:
        inner = total
    scene.path("bone")[sl] += (np.maximum(total - inner, 0.0) / 10.0).astype(F32)
    if fill == "trabecular":
        tex = scene.texture_in(win)
        if texture_gain is not None:
            tex = tex * texture_gain
        bone = np.clip(bvtv * tex, 0.0, 1.0) * inner
        scene.path("bone")[sl] += (bone / 10.0).astype(F32)
        scene.path("marrow")[sl] += ((inner - bone) / 10.0).astype(F32)
    else:
        scene.path(fill)[sl] += (inner / 10.0).astype(F32)
    return win, np.sqrt(rho2).astype(F32)


def polygon_mask(scene: Scene, pts_mm: NDArray) -> NDArray:
    """Boolean detector mask of a polygon given in anatomy millimetres."""
    mask = np.zeros(scene.shape, dtype=np.uint8)
    px = np.round(scene.placement.to_pixel(pts_mm) * 4).astype(np.int32)
    cv2.fillPoly(mask, [px.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=2)
    return mask.astype(bool)


def capsule_mask(
    scene: Scene, p0: tuple[float, float], p1: tuple[float, float], radius_mm: float
) -> NDArray:
    """Boolean detector mask of a rounded segment (a 'capsule')."""
    mask = np.zeros(scene.shape, dtype=np.uint8)
    a, b = scene.placement.to_pixel(np.array([p0, p1]))
    thick = max(
        int(round(2 * radius_mm * scene.placement.magnification / scene.placement.pitch_mm)), 1
    )
    cv2.line(mask, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 1, thickness=thick)
    return mask.astype(bool)


def tube_band_mask(res: TubeResult, u_range: tuple[float, float], region: str) -> NDArray:
    """Mask (window-shaped) of a tube's cortex, canal or whole section within ``u_range``."""
    along = (res.u >= u_range[0]) & (res.u <= u_range[1])
    inside_outer = np.abs(res.v) <= res.outer
    inner = np.where(res.v < 0, res.inner_lo, res.inner_hi)
    inside_inner = np.abs(res.v) <= inner
    if region == "cortex":
        return along & inside_outer & ~inside_inner
    if region == "canal":
        return along & inside_inner
    return along & inside_outer


def paste(scene: Scene, name: str, win: Window, window_mask: NDArray) -> None:
    scene.mask(name)[win.slc] |= window_mask
