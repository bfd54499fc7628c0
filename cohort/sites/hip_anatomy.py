"""Hip anatomy for the AP pelvis (docs/cohort.md §3.5): layout constants, outlines, DXA closure.

Everything here is a pure function of a case's variation and biomarkers and none of it touches
a ``Scene``: ``HipSite`` and the hip drawing modules (``hip_pelvis``, ``hip_trabecular``,
``hip_soft_tissue``, ``hip_nuisance``) read it.

Closure to DXA: the femoral neck is a cylinder of radius R with a cortex c (superior and
inferior thicknesses averaging c) and trabecular BV/TV f, c = 1.6 mm s and f = 0.18 s, with the
scale s solved (``closure_scale``) so that rho_min [pi (R^2 - (R-c)^2) + f pi (R-c)^2] / (2R)
(``closure_abmd``) equals the target aBMD. The neck is drawn in the image plane
(``femur_geometry``): leg rotation foreshortens its length and opens the apparent neck-shaft
angle but leaves the cross-section, so the projected mineral per unit neck width in the FN ROI
is the target once the trabecular field is normalised there (``hip_trabecular``).

Outlines: the hemipelvis, obturator foramen, pelvic ridges and bumps, sacrum and sacral
foramina as landmark offsets from the femoral-head centre at size 1; the proximal femur as a
``FemurGeometry`` (head, neck and shaft frames) and its closed silhouette (``femur_outline``).
``grade_weights`` maps the Singh grade to the weights of the trabecular groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cohort.sites.silhouette import chaikin, line_points, unit

RHO_MIN = 1.15  # g/cm3, mineral density of the closure model (docs/cohort.md §3.5) [E]
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

# --------------------------------------------------------------------------- pelvis outlines

# Hemipelvis outline as (lateral, down) offsets from the head centre in mm, lateral > 0: iliac
# crest from the sacro-iliac joint to the ASIS, AIIS, the acetabular rim, the posterior wall over
# the head, the ischium to the tuberosity, the ischiopubic ramus, the symphysis, the superior
# ramus and back up the pelvic brim.
HEMIPELVIS = (
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
OBTURATOR = (
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
PELVIS_BASE_MM = 7.0  # thin iliac fossa
RAMI_MM = 12.0  # extra depth below the acetabulum: rami and ischium are bars, not plates
# Thickened ridges of the hemipelvis: polyline (lateral, down), amplitude and sigma (mm).
PELVIS_RIDGES = (
    (((-33.0, -100.0), (-10.0, -122.0), (20.0, -122.0), (40.0, -103.0), (49.0, -78.0)), 9.0, 6.0),
    (((10.0, -30.0), (28.0, -70.0), (36.0, -100.0)), 9.0, 9.0),  # iliac pillar
    (((-34.0, -85.0), (-30.0, -55.0), (-27.0, -30.0)), 10.0, 8.0),  # SI / sciatic buttress
    (((-26.0, -50.0), (-22.0, -22.0), (-25.0, -8.0), (-34.0, 2.0), (-55.0, 10.0)), 5.0, 4.0),
    (((2.0, 0.0), (6.0, 40.0), (6.0, 78.0)), 8.0, 8.0),  # posterior column to the tuberosity
    (((-18.0, -2.0), (-17.0, 12.0), (-21.0, 20.0), (-26.0, 14.0), (-26.0, -2.0)), 5.0, 1.3),
)
PELVIS_BUMPS = (
    (-6.0, -16.0, 22.0, 18.0),  # acetabular body over the head
    (4.0, 76.0, 12.0, 11.0),  # ischial tuberosity
    (-76.0, 30.0, 8.0, 11.0),  # pubic body
)
# Sacrum: right half (x, down from the head level) mm, mirrored to close it.
SACRUM_HALF = (
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
SACRAL_FORAMINA = ((22.0, -88.0, 5.0), (20.0, -68.0, 4.5), (17.0, -49.0, 4.0), (14.0, -32.0, 3.5))

# --------------------------------------------------------------------------- DXA closure


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


def grade_weights(grade: int) -> dict[str, float]:
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


# --------------------------------------------------------------------------- proximal femur


@dataclass(frozen=True)
class FemurGeometry:
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


def femur_geometry(variation: dict, sx: int, rotation_deg: float) -> FemurGeometry:
    """Landmarks of the femur on side ``sx`` (-1: image left) from a case's variation row."""
    v = variation
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
    to_head = unit(np.cos(beta_app) * -distal + np.sin(beta_app) * -lateral)
    superior = np.array([-to_head[1], to_head[0]])
    if superior[1] > 0:
        superior = -superior
    r_shaft = float(v["shaft_radius_mm"]) * k
    roi0 = float(np.sqrt(r_h * r_h - r_n * r_n)) + 4.0
    return FemurGeometry(
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


def femur_outline(g: FemurGeometry, lt_prominence: float) -> NDArray:
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
            chaikin(
                np.array(
                    [
                        g.sh(-r_sh, end),
                        g.sh(-r_sh, meta),
                        g.sh(-r_sh, meta - 12.0 * k),
                        g.sh(-(r_sh + 0.5), lt + 30.0 * k),
                        g.sh(-(r_sh + 2.5), lt + 12.0),
                        g.sh(-(r_sh + 3.5 + 5.0 * lt_prominence), lt + 2.0),  # lesser trochanter
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
            line_points(neck_s, nb_s)[1:-1],
            chaikin(lateral_chain, 4),
            medial_chain,
            line_points(nb_i, neck_i)[1:-1],
            bezier(neck_i, hn_i, arc_i)[:-1],
        ]
    )
