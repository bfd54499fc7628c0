"""Hand PA radiograph (docs/cohort.md §3.4): metacarpal radiogrammetry carries the signal.

The anatomy frame is a right hand seen PA, fingers up (y < 0), thumb towards -x; a left hand is
the mirror image (``Placement.mirror``). Lengths are in millimetres, scaled with body height.
"""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from cohort.geometry import (
    Scene,
    capsule_mask,
    draw_ellipsoid,
    draw_tube,
    paste,
    polygon_mask,
    tube_band_mask,
)
from cohort.nuisance import AcquisitionSpec
from cohort.sampler import Table
from cohort.sites.base import CaseInputs
from cohort.texture import profile, smooth_field, trabecular_texture

# Per ray (I thumb .. V little): metacarpal base (x, y) mm, direction (deg from vertical, + to the
# ulnar side), metacarpal length, phalanx lengths (proximal, middle, distal; thumb has no middle),
# shaft width relative to MC II.
_RAYS = (
    ((-21.0, 50.0), -38.0, 46.0, (31.0, 0.0, 23.0), 1.00),
    ((-12.0, 44.0), -7.0, 68.0, (40.0, 23.0, 17.0), 1.00),
    ((-2.0, 41.0), 0.0, 65.0, (45.0, 27.0, 18.0), 0.95),
    ((8.0, 43.0), 6.0, 58.0, (42.0, 26.0, 18.0), 0.85),
    ((17.0, 47.0), 13.0, 54.0, (33.0, 19.0, 16.0), 0.82),
)
# Carpal bones as (centre x, y, semi-axis a, b) mm: two rows.
_CARPALS = (
    (-14.0, 66.0, 7.5, 6.0),
    (-2.0, 64.0, 6.0, 6.5),
    (8.0, 62.0, 5.0, 6.5),
    (16.0, 64.0, 5.0, 5.0),
    (-16.0, 54.0, 6.0, 5.0),
    (-7.0, 53.0, 5.0, 5.5),
    (2.0, 52.0, 6.5, 6.0),
    (13.0, 53.0, 6.0, 5.5),
)
_OFFSET = np.array([0.0, 12.0])  # centres the hand from fingertips to distal forearm on the plate
SIGNAL_RAYS = (1, 2, 3)  # metacarpals II-IV
MIDSHAFT = (0.35, 0.65)  # central 30 % of the metacarpal length (BoneXpert-like ROI [S3])


class HandSite:
    name: ClassVar[str] = "hand"
    body_part: ClassVar[str] = "HAND"
    view_position: ClassVar[str] = "PA"
    acquisition: ClassVar[AcquisitionSpec] = AcquisitionSpec(
        plates_mm=((180.0, 240.0), (240.0, 300.0)),
        cr_pitches_mm=((0.10, 0.15), (0.15, 0.20)),
        kvp=(45.0, 60.0),
        photons_per_pixel=1500.0,
        spr_grid=(0.1, 0.3),
        spr_no_grid=(0.1, 0.3),
        p_grid=0.0,
        magnification=(1.0, 1.05),
    )
    biomarker_columns: ClassVar[tuple[str, ...]] = (
        "mci",
        "mc2_width_mm",
        "mc2_cortex_mm",
        "mc2_medulla_mm",
        "dxr_index",
        "cortical_porosity",
        "endosteal_roughness_mm",
        "bvtv",
        "hurst",
    )

    def sample_variation(self, patients: Table, rng: np.random.Generator) -> Table:
        n = int(patients["age_years"].shape[0])
        male = patients["sex_male"].astype(bool)
        height_scale = patients["height_m"] / np.where(male, 1.72, 1.59)
        width = np.where(male, rng.uniform(8.5, 9.5, n), rng.uniform(7.5, 8.5, n)) * height_scale
        return {
            "mc2_width_mm": width,
            "length_scale": np.clip(height_scale * rng.normal(1.0, 0.03, n), 0.85, 1.2)
            * np.where(male, 1.06, 0.97),
            "mci_noise": rng.normal(0.0, 0.04, n),
            "porosity_noise": rng.normal(0.0, 0.01, n),
            "bvtv_noise": rng.normal(0.0, 0.015, n),
            "hurst_noise": rng.normal(0.0, 0.045, n),
            "finger_spread_deg": rng.uniform(-10.0, 10.0, n),
            "soft_tissue_mm": np.clip(
                18.0 + 0.5 * (patients["bmi"] - 25.0) + rng.normal(0, 2, n), 15, 30
            ),
            "joint_space_mm": np.clip(
                1.7 - 0.012 * (patients["age_years"] - 50) + rng.normal(0, 0.2, n), 0.4, 2.2
            ),
            "ring": (rng.random(n) < 0.035).astype(np.int8),
            "watch": (rng.random(n) < 0.015).astype(np.int8),
        }

    def biomarkers(self, t_site: np.ndarray, variation: Table, patients: Table) -> Table:
        t = np.asarray(t_site, dtype=float)
        w = variation["mc2_width_mm"]
        mci = np.clip(0.52 + 0.08 * t + variation["mci_noise"], 0.20, 0.75)  # 2T/W [S9, E]
        cortex = mci * w / 2.0
        return {
            "mci": mci,
            "mc2_width_mm": w,
            "mc2_cortex_mm": cortex,
            "mc2_medulla_mm": w - 2.0 * cortex,
            # DXR-style index pi*T*(1 - T/W), proportional to cortical area per width [S3].
            "dxr_index": np.pi * cortex * (1.0 - cortex / w),
            "cortical_porosity": np.clip(0.05 - 0.02 * t + variation["porosity_noise"], 0.02, 0.12),
            "endosteal_roughness_mm": np.clip(0.05 - 0.03 * t, 0.02, 0.15),
            "bvtv": np.clip(0.12 + 0.03 * t + variation["bvtv_noise"], 0.04, 0.25),
            "hurst": np.clip(0.68 + 0.03 * t + variation["hurst_noise"], 0.5, 0.8),
        }

    def scatter_scale(self, case: CaseInputs) -> float:
        return float(case.variation["soft_tissue_mm"]) / 20.0

    def build(self, scene: Scene, case: CaseInputs, rng: np.random.Generator) -> None:
        v, b, p = case.variation, case.biomarkers, case.patient
        s = float(v["length_scale"])
        w2 = float(v["mc2_width_mm"])
        gap = float(v["joint_space_mm"])
        scene.texture = trabecular_texture(
            scene.shape, float(b["hurst"]), rng, scene.placement.mm_per_pixel
        )
        porosity_field = 2.0 * smooth_field(
            scene.shape, rng, max(0.4 / scene.placement.mm_per_pixel, 1.0)
        )
        silhouette = np.zeros(scene.shape, dtype=bool)
        spread = float(v["finger_spread_deg"])
        mci = float(b["mci"])
        bvtv = float(b["bvtv"])
        rough = float(b["endosteal_roughness_mm"])
        joints = []
        for k, (base, angle, mc_len, phal, rel_w) in enumerate(_RAYS):
            ang = np.deg2rad(angle + spread * (k - 2) / 2.0)
            direction = np.array([np.sin(ang), -np.cos(ang)])
            start = (np.array(base) + _OFFSET) * s
            width = w2 * rel_w
            lengths = (mc_len, *[x for x in phal if x > 0])
            widths: tuple[float, ...] = (width, 0.85 * width, 0.72 * width, 0.62 * width)
            if k == 0:
                widths = (width, 0.85 * width, 0.70 * width)
            for j, (length, wj) in enumerate(zip(lengths, widths, strict=False)):
                end = start + direction * length * s
                is_mc = j == 0
                cortex = (mci if is_mc else 0.45 + 0.6 * (mci - 0.52)) * wj / 2.0
                if is_mc:
                    # Radial cortex (v < 0 side in this frame) 10 % thicker than ulnar [S7c].
                    cx = (1.05 * cortex, 1.05 * cortex, 0.95 * cortex, 0.95 * cortex)
                else:
                    cx = (cortex, cortex, cortex, cortex)
                rough_profiles = (
                    rough * profile(64, 0.6, rng),
                    rough * profile(64, 0.6, rng),
                )
                a0 = start + direction * 0.18 * length * s
                a1 = start + direction * 0.82 * length * s
                shaft = draw_tube(
                    scene,
                    tuple(a0),
                    tuple(a1),
                    (wj / 2, wj / 2),
                    cx,
                    fill="marrow",
                    porosity=float(b["cortical_porosity"]),
                    porosity_field=porosity_field,
                    endosteal=rough_profiles,
                )
                thin = 0.3 * cortex
                head_r = 0.68 * wj
                # Metaphyses: the cortex thins from the shaft's towards the joint.
                taper = 0.5 * head_r
                for m0, m1, r0, r1, c0, c1, tp in (
                    (
                        start + direction * 0.07 * length * s,
                        a0,
                        head_r,
                        wj / 2,
                        thin,
                        cortex,
                        (taper, 0.0),
                    ),
                    (
                        a1,
                        end - direction * 0.07 * length * s,
                        wj / 2,
                        head_r * 0.92,
                        cortex,
                        thin,
                        (0.0, taper),
                    ),
                ):
                    draw_tube(
                        scene,
                        tuple(m0),
                        tuple(m1),
                        (r0, r1),
                        (c0, c1),
                        fill="trabecular",
                        bvtv=bvtv,
                        end_taper_mm=tp,
                    )
                for c, r in (
                    (start + direction * 0.07 * length * s, head_r),
                    (end - direction * 0.07 * length * s, head_r * 0.92),
                ):
                    res = draw_ellipsoid(
                        scene,
                        tuple(c),
                        (r, 0.08 * length * s + 1.0),
                        r,
                        angle_deg=float(np.rad2deg(ang)) + 90.0,
                        cortex=0.3,
                        bvtv=bvtv,
                    )
                    if res is not None:
                        paste(scene, "epiphyseal_trabecular", res[0], res[1] < 0.85)
                if is_mc and k in SIGNAL_RAYS and shaft is not None:
                    paste(
                        scene, "mc_cortex_roi", shaft.win, tube_band_mask(shaft, MIDSHAFT, "cortex")
                    )
                    paste(
                        scene, "mc_medullary", shaft.win, tube_band_mask(shaft, MIDSHAFT, "canal")
                    )
                if is_mc:
                    joints.append(end)
                silhouette |= capsule_mask(scene, tuple(start), tuple(end), wj / 2 + 5.5)
                if j == 1 and v["ring"] and k == 3:
                    self._ring(scene, start + direction * 0.4 * length * s, ang, wj)
                start = end + direction * gap
        for cx_, cy_, a, bb in _CARPALS:
            res = draw_ellipsoid(
                scene,
                (cx_ * s, (cy_ + _OFFSET[1]) * s),
                (a * s, bb * s),
                7.0 * s,
                cortex=0.5,
                bvtv=bvtv,
            )
            if res is not None:
                paste(scene, "epiphyseal_trabecular", res[0], res[1] < 0.85)
        # Distal radius and ulna: shafts with trabecular metaphyses.
        for x0, r_shaft, r_end in ((-8.0, 10.5, 14.0), (16.0, 6.5, 8.0)):
            top = (np.array([x0, 74.0]) + _OFFSET) * s
            mid = (np.array([x0, 92.0]) + _OFFSET) * s
            far = (np.array([x0 - 1.0, 160.0]) + _OFFSET) * s
            draw_tube(
                scene,
                tuple(mid),
                tuple(far),
                (r_shaft, r_shaft),
                (0.22 * r_shaft, 0.22 * r_shaft),
                porosity=float(b["cortical_porosity"]),
                porosity_field=porosity_field,
            )
            draw_tube(
                scene,
                tuple(top),
                tuple(mid),
                (r_end, r_shaft),
                (0.6, 1.2),
                fill="trabecular",
                bvtv=bvtv,
            )
            silhouette |= capsule_mask(scene, tuple(top), tuple(far), r_end + 4.0)
        palm = np.array([[-30, 40], [-14, 30], [25, 34], [30, 60], [28, 80], [-26, 82], [-33, 62]])
        silhouette |= polygon_mask(scene, (palm + _OFFSET) * s)
        forearm = np.array([[-27, 75], [29, 75], [30, 200], [-30, 200]])
        silhouette |= polygon_mask(scene, (forearm + _OFFSET) * s)
        if v["watch"]:
            self._watch(scene, s)
        self._soft_tissue(scene, silhouette, float(v["soft_tissue_mm"]), float(p["bmi"]))
        if p.get("rheumatoid_arthritis"):
            self._erosions(scene, joints, w2, rng)
        bone = scene.path("bone") > 0
        scene.masks["bone"] = bone
        scene.masks["signal"] = bone.copy()

    def _soft_tissue(
        self, scene: Scene, silhouette: np.ndarray, thickness_mm: float, bmi: float
    ) -> None:
        mmpp = scene.placement.mm_per_pixel
        dist = cv2.distanceTransform(silhouette.astype(np.uint8), cv2.DIST_L2, 5) * mmpp
        rounding = 10.0
        total = np.minimum(
            2.0 * np.sqrt(np.maximum(dist * (2 * rounding - dist), 0.0)), thickness_mm
        )
        total = np.where(dist >= rounding, thickness_mm, total).astype(np.float32)
        occupied = (scene.path("bone") + scene.path("marrow")) * 10.0
        soft = np.maximum(total - occupied, 0.0)
        fat = float(np.clip(0.15 + 0.015 * (bmi - 22.0), 0.10, 0.50))
        scene.path("soft")[:] += (1.0 - fat) * soft / 10.0
        scene.path("adipose")[:] += fat * soft / 10.0
        scene.masks["body"] = silhouette
        scene.masks["soft_tissue"] = silhouette & ~(scene.path("bone") > 0)

    def _ring(self, scene: Scene, centre: np.ndarray, ang: float, width: float) -> None:
        half = width / 2 + 3.0
        d = np.array([np.sin(ang), -np.cos(ang)])
        n = np.array([d[1], -d[0]])
        pts = np.array(
            [
                centre - n * half - d * 1.5,
                centre + n * half - d * 1.5,
                centre + n * half + d * 1.5,
                centre - n * half + d * 1.5,
            ]
        )
        m = polygon_mask(scene, pts)
        scene.path("iron")[m] += 0.12
        scene.masks["ring"] = scene.mask("ring") | m

    def _watch(self, scene: Scene, s: float) -> None:
        band = np.array([[-24, 100], [26, 100], [26, 118], [-24, 118]]) + _OFFSET
        m = polygon_mask(scene, band * s)
        scene.path("iron")[m] += 0.08
        scene.masks["ring"] = scene.mask("ring") | m

    def _erosions(self, scene: Scene, joints: list, w2: float, rng: np.random.Generator) -> None:
        """Marginal erosions at metacarpal heads, tied to rheumatoid arthritis (§3.4)."""
        bone = scene.path("bone")
        for j in joints[1:]:
            for side in (-1, 1):
                c = (float(j[0] + side * 0.55 * w2), float(j[1] + rng.uniform(-2, 2)))
                r = float(rng.uniform(0.8, 1.8))
                win = scene.window(np.array([[c[0] - r, c[1] - r], [c[0] + r, c[1] + r]]))
                if win is None:
                    continue
                inside = (win.x - c[0]) ** 2 + (win.y - c[1]) ** 2 < r * r
                bone[win.slc][inside] *= 0.45
                paste(scene, "erosion", win, inside)
