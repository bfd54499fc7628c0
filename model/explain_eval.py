"""Does the heat map point at the bone, and is it the model's reason? (``osteofy evaluate``)

Every figure is taken on exactly what a technician sees: the heat map as the device draws it
(``edge.overlay.cam_to_display`` onto the working image) and the top peak it publishes
(``edge.overlay.peak_regions``), against the virtual cohort's ground truth carried into the
same working image — the signal mask (bone whose look depends on the bone density), the body,
markers and text, the counterfactual map (where the pixels change when only the bone density
does) and the measurement regions a radiologist reads (femur on a hip, metacarpal cortices on
a hand). Per map:

- ``energy_in_signal`` against ``signal_area_share`` (both over the image content);
- ``pointing_game``: the top peak within one feature cell of the signal;
- ``peaks_off_body``: top peaks farther than 3 % of the image's long side from the body;
- ``counterfactual_spearman``: rank correlation with the counterfactual map (ties share ranks);
- ``deletion``: blanking the hottest 10 % of the map (in the model's input) moves
  P(osteoporosis) more than blanking a random 10 % of the body in blobs of the map's cell size
  (mean of three draws) — the map is faithful to the model, not only plausible.

A map with no positive evidence on the image is ``empty``: counted, and a failure of the
pointing game and the deletion test. Synthetic cohort: these figures check the software.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from edge.answer import AnswerRule
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.overlay import cam_to_display, peak_regions
from edge.package import ModelPackage
from edge.preprocess import Geometry, display_work, map_to_input, normalise, square_from_display
from model.data import MEASUREMENT_REGIONS, Dataset, read_raw

MAPS = ("predicted_class", "osteoporosis_class")
REGIONS = MEASUREMENT_REGIONS
OFF_BODY = 0.03
DELETE_SHARE = 0.10
RANDOM_DRAWS = 3


def average_ranks(x: NDArray) -> NDArray:
    """Ranks with ties given their mean rank (as Spearman's coefficient requires)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=float)
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = 0.5 * (a + b - 1)
    return ranks


def spearman(a: NDArray, b: NDArray) -> float | None:
    ra, rb = average_ranks(a.ravel()), average_ranks(b.ravel())
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _to_work(mask: NDArray, shape: tuple[int, int], area: bool = False) -> NDArray:
    interp = cv2.INTER_AREA if area else cv2.INTER_NEAREST
    out = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=interp)
    return out if area else out > 0.5


def _near(mask: NDArray, radius: float) -> NDArray:
    """Pixels within ``radius`` of the mask."""
    if not mask.any():
        return mask
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    return dist <= radius


class _Scores:
    def __init__(self) -> None:
        self.v: dict[str, list[float]] = {}
        self.empty = 0

    def add(self, name: str, value: float | None) -> None:
        if value is not None:
            self.v.setdefault(name, []).append(float(value))

    def summary(self) -> dict:
        def mean(k: str) -> float | None:
            x = self.v.get(k, [])
            return round(float(np.mean(x)), 4) if x else None

        return {
            "scored": len(self.v.get("in_signal", [])),
            "empty_maps": self.empty,
            "cam_energy_in_signal": mean("in_signal"),
            "cam_energy_on_markers_text": mean("on_markers_text"),
            "energy_to_area_ratio": mean("ratio"),
            "pointing_game": mean("pointing_game"),
            "peak_in_measurement_region": mean("in_region"),
            "peaks_off_body": int(sum(self.v.get("off_body", []))),
            "cam_vs_counterfactual_spearman": mean("spearman"),
            "deletion_pass_rate": mean("deletion_pass"),
            "deletion_delta_hot": mean("delta_hot"),
            "deletion_delta_random": mean("delta_random"),
        }


def _deletion(
    backend: OnnxRuntimeBackend,
    pkg: ModelPackage,
    square: NDArray,
    geom: Geometry,
    cam: NDArray,
    body_in: NDArray,
    clin: NDArray,
    rng: np.random.Generator,
) -> tuple[float, float] | None:
    """|dP(osteoporosis)| when blanking the hottest 10 % vs a random 10 % of the body."""
    s = geom.size
    ir0, ir1, ic0, ic1 = geom.input_box()
    content = np.zeros((s, s), dtype=bool)
    content[ir0:ir1, ic0:ic1] = True
    body = body_in & content
    area = int(round(DELETE_SHARE * body.sum()))
    heat = np.maximum(cv2.resize(cam.astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR), 0)
    heat[~content] = 0.0
    if area < 1 or float(heat.max()) <= 0.0:
        return None
    x = normalise(square, pkg.preprocess)
    fill = float(x[0][body].mean())

    def top(field: NDArray, where: NDArray) -> NDArray:
        vals = np.where(where, field, -np.inf).ravel()
        idx = np.argpartition(-vals, area)[:area]
        m = np.zeros(s * s, dtype=bool)
        m[idx] = True
        return m.reshape(s, s)

    masks = [top(heat, content)]
    fh, fw = cam.shape
    for _ in range(RANDOM_DRAWS):
        noise = rng.random((fh, fw)).astype(np.float32)
        masks.append(top(cv2.resize(noise, (s, s), interpolation=cv2.INTER_LINEAR), body))
    batch = np.repeat(x[None], len(masks) + 1, axis=0)
    for j, m in enumerate(masks, start=1):
        batch[j, 0][m] = fill
    p = backend.run(batch, np.repeat(clin, len(masks) + 1, axis=0))["probs"][:, 2]
    delta = np.abs(p[1:] - p[0])
    return float(delta[0]), float(delta[1:].mean())


def explanation_quality(
    pkg: ModelPackage,
    ds: Dataset,
    clinical: NDArray,
    precision: str,
    n: int,
    seed: int = 0,
) -> dict:
    """The figures above for the first ``n`` images of ``ds`` (with ``clinical`` [N, 2F])."""
    from cohort.generate import load_masks

    backend = OnnxRuntimeBackend(pkg.model_file(precision))
    rule = AnswerRule.from_card(pkg.card)
    rng = np.random.default_rng(seed)
    site = pkg.card["sites"][0]
    scores = {m: _Scores() for m in MAPS}
    area_share: list[float] = []
    for i in range(min(n, len(ds))):
        row = ds.rows[i]
        raw = read_raw(ds.folder / row["file"])
        display8, work_scale = display_work(raw, pkg.preprocess)
        square, geom = square_from_display(display8, work_scale, raw.pixels.shape, pkg.preprocess)
        clin = clinical[i : i + 1]
        out = backend.run(normalise(square, pkg.preprocess)[None], clin)
        masks = load_masks(ds.folder / row["masks_file"])
        shape = display8.shape[:2]
        r0, r1, c0, c1 = geom.crop
        content = np.zeros(shape, dtype=bool)
        content[r0:r1, c0:c1] = True
        signal = _to_work(masks["signal"], shape) & content
        body = _to_work(masks["body"], shape)
        nuis = np.zeros(shape, dtype=bool)
        for name in ("marker", "text"):
            if name in masks:
                nuis |= _to_work(masks[name], shape)
        region = np.zeros(shape, dtype=bool)
        for name in REGIONS.get(site, ()):
            if name in masks:
                region |= _to_work(masks[name], shape)
        cf = None
        if "counterfactual" in masks:
            cf = _to_work(masks["counterfactual"], shape, area=True)
        area_share.append(float(signal.sum()) / max(float(content.sum()), 1.0))
        cam = out["cam"][0]
        fh = cam.shape[1]
        cell = geom.size / fh / geom.scale  # one feature cell in working-image pixels
        body_in = map_to_input(masks["body"], geom, nearest=True) > 0.5
        k_pred = int(rule.classes(out["probs"], out["tscore"][:, 0])[0])
        for which, k in (("predicted_class", k_pred), ("osteoporosis_class", 2)):
            sc = scores[which]
            heat = cam_to_display(cam[k], geom, shape)
            total = float(heat[content].sum())
            peaks = peak_regions(cam[k], geom, k=1)
            if total <= 0.0 or not peaks:
                sc.empty += 1
                sc.add("pointing_game", 0.0)
                sc.add("deletion_pass", 0.0)
                continue
            share = float(heat[signal].sum()) / total
            sc.add("in_signal", share)
            sc.add("ratio", share / max(area_share[-1], 1e-6))
            sc.add("on_markers_text", float(heat[nuis & content].sum()) / total)
            py = min(int(peaks[0]["y"] * shape[0]), shape[0] - 1)
            px = min(int(peaks[0]["x"] * shape[1]), shape[1] - 1)
            sc.add("pointing_game", float(_near(signal, cell)[py, px]))
            if region.any():
                sc.add("in_region", float(_near(region, cell)[py, px]))
            off = not _near(body, OFF_BODY * max(shape))[py, px]
            sc.add("off_body", float(off))
            if cf is not None:
                sc.add("spearman", spearman(heat[content], cf[content]))
            d = _deletion(backend, pkg, square, geom, cam[k], body_in, clin, rng)
            if d is None:
                sc.add("deletion_pass", 0.0)
            else:
                sc.add("deletion_pass", float(d[0] > d[1]))
                sc.add("delta_hot", d[0])
                sc.add("delta_random", d[1])
    result: dict = {
        "n": len(area_share),
        "signal_area_share": round(float(np.mean(area_share)), 4) if area_share else None,
        "measurement_region": list(REGIONS.get(site, ())),
    }
    for which, sc in scores.items():
        result[which] = sc.summary()
    return result
