"""``osteofy simulate``: render a virtual cohort to DICOM files, masks and a manifest.

Output folder:
- ``<case>.dcm``: the radiograph (CR or DX, For Presentation);
- ``<case>.masks.npz``: region masks (bit-packed) and the counterfactual attribution map;
- ``manifest.csv``: one row per image with clinical variables, latent T-scores, class,
  biomarkers, anatomical variation (``anat_``) and nuisance (``nz_``) columns;
- ``cohort.json``: how the cohort was made (seed, preset, site, software version).

Every case depends only on (seed, site, index), never on the worker that rendered it.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cohort.dicom_out import RadiographMeta, write_radiograph
from cohort.plan import CohortPlan, plan_cohort
from cohort.render import render_case
from cohort.sampler import CLASS_NAMES, RISK_FACTORS
from osteofy import __version__
from osteofy.fsutil import atomic_write

COMPRESSION_MODES = ("auto", "none", "j2k")
SYNTHETIC_NOTE = (
    "Synthetic data from the Osteofy virtual cohort (simulated patients and radiographs). "
    "Not real patients; no figure computed on it is a clinical accuracy."
)
_SID_MM = {"hand": 1000.0, "hip": 1150.0}
_NOMINAL_MAS = {"hand": 2.5, "hip": 20.0}


@dataclass(frozen=True)
class SimulateOptions:
    max_side: int | None = None
    compression: str = "auto"
    counterfactual: bool = True
    workers: int = 1
    shift: str | None = None


def case_stem(plan: CohortPlan, i: int) -> str:
    return f"{plan.site.name}_{plan.seed}_{i:06d}"


def _meta(
    plan: CohortPlan, i: int, rendered_pitch: float, window: tuple[float, float], compression: str
) -> RadiographMeta:
    p, nz = plan.case(i).patient, plan.case(i).nuisance
    site = plan.site.name
    day = np.datetime64("2016-01-01") + np.timedelta64(int(nz["study_day"]), "D")
    secs = int(nz["acquisition_seconds"])
    if compression == "auto":
        compression = "j2k_lossy" if nz["lossy_j2k"] else "none"
    elif compression == "j2k":
        compression = "j2k_lossless"
    return RadiographMeta(
        modality="CR" if nz["detector"] == "CR" else "DX",
        photometric="MONOCHROME1" if nz["monochrome1"] else "MONOCHROME2",
        bits_stored=int(nz["bits_stored"]),
        pitch_mm=rendered_pitch,
        magnification=round(float(nz["magnification"]), 3),
        sid_mm=_SID_MM.get(site, 1000.0),
        kvp=float(nz["kvp"]),
        exposure_uas=round(1000.0 * _NOMINAL_MAS.get(site, 5.0) * float(nz["dose_scale"]), 0),
        exposure_index=float(nz["exposure_index"]),
        target_exposure_index=400.0,
        grid=bool(nz["grid"]),
        detector=str(nz["detector"]),
        body_part=plan.site.body_part,
        laterality="L" if nz["left"] else "R",
        view_position=plan.site.view_position,
        burned_in_annotation=bool(nz["marker"] or nz["text"]),
        windowing=str(nz["windowing"]),
        window=window,
        patient_name=f"SYNTHETIC^CASE-{i:06d}",
        patient_id=f"SYN-{plan.seed}-{site.upper()}-{i:06d}",
        # Completed years of the age the manifest records (rounded to 0.01 y there).
        age_years=int(round(float(p["age_years"]), 2)),
        sex="M" if p["sex_male"] else "F",
        weight_kg=round(float(p["weight_kg"]), 1),
        height_m=round(float(p["height_m"]), 2),
        study_date=str(day).replace("-", ""),
        study_time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
        uid_seed=f"osteofy-cohort/{plan.preset.name}/{site}/{plan.seed}/{i}",
        institution=f"SYNTHETIC CLINIC {int(nz['facility']):02d}",
        compression=compression,
        j2k_ratio=round(float(nz["j2k_ratio"]), 1),
    )


def render_one(plan: CohortPlan, i: int, out: Path, opts: SimulateOptions) -> dict:
    """Render case ``i`` and write its files; returns the render columns of the manifest."""
    t0 = time.perf_counter()
    cf_case, cf_t = plan.counterfactual(i) if opts.counterfactual else (None, None)
    r = render_case(
        plan.site,
        plan.case(i),
        plan.render_seed(i),
        max_side=opts.max_side,
        counterfactual=cf_case,
        counterfactual_t=cf_t,
    )
    render_ms = (time.perf_counter() - t0) * 1000.0
    stem = case_stem(plan, i)
    meta = _meta(plan, i, r.pitch_mm, r.window, opts.compression)
    write_radiograph(out / f"{stem}.dcm", r.pixels, meta)
    arrays: dict[str, np.ndarray] = {
        f"mask_{k}": np.packbits(v, axis=None) for k, v in sorted(r.masks.items())
    }
    arrays["shape"] = np.asarray(r.pixels.shape, dtype=np.int32)
    if r.counterfactual is not None:
        arrays["counterfactual"] = r.counterfactual
        arrays["counterfactual_t"] = np.asarray(r.counterfactual_t, dtype=np.float32)
    atomic_write(out / f"{stem}.masks.npz", lambda fh: np.savez_compressed(fh, **arrays))  # type: ignore[arg-type]
    return {
        "file": f"{stem}.dcm",
        "masks_file": f"{stem}.masks.npz",
        "rows": r.pixels.shape[0],
        "cols": r.pixels.shape[1],
        "pixel_pitch_mm": r.pitch_mm,
        "photometric": r.photometric,
        "compression": meta.compression,
        "counterfactual_t": "" if cf_t is None else round(cf_t, 4),
        "render_ms": round(render_ms, 1),
        "signal_area_px": int(r.masks["signal"].sum()),
    }


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """Read a ``.masks.npz`` back into boolean masks (and 'counterfactual' if present)."""
    with np.load(path) as z:
        shape = tuple(int(x) for x in z["shape"])
        out = {}
        for key in z.files:
            if key.startswith("mask_"):
                n = shape[0] * shape[1]
                out[key[5:]] = np.unpackbits(z[key], count=n).reshape(shape).astype(bool)
        if "counterfactual" in z.files:
            out["counterfactual"] = z["counterfactual"].astype(np.float32)
    return out


_WORKER: dict = {}


def _init_worker(plan: CohortPlan, out: Path, opts: SimulateOptions) -> None:
    cv2.setNumThreads(1)
    _WORKER.update(plan=plan, out=out, opts=opts)


def _work(i: int) -> tuple[int, dict]:
    return i, render_one(_WORKER["plan"], i, _WORKER["out"], _WORKER["opts"])


def _render_all(
    plan: CohortPlan, out: Path, opts: SimulateOptions, cases: list[int]
) -> Iterator[tuple[int, dict]]:
    if opts.workers <= 1 or len(cases) <= 1:
        _init_worker(plan, out, opts)
        for i in cases:
            yield _work(i)
        return
    # Never plain fork: a process with threads (ONNX Runtime, MQTT, HTTP servers in the same
    # process) can fork a child that deadlocks on a lock held by a thread that is not copied.
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(opts.workers, initializer=_init_worker, initargs=(plan, out, opts)) as pool:
        yield from pool.imap(_work, cases, chunksize=1)


def manifest_rows(plan: CohortPlan) -> list[dict]:
    """The plan's columns of the manifest (everything but what rendering adds)."""
    rows = []
    for i in range(plan.n):
        c = plan.case(i)
        p = c.patient
        r: dict = {
            "case_id": case_stem(plan, i),
            "patient_id": f"SYN-{plan.seed}-{plan.site.name.upper()}-{i:06d}",
            "site": plan.site.name,
            "class": CLASS_NAMES[int(p["class_index"])],
            "tscore": round(p["tscore"], 4),
            "t_site": round(float(plan.t_site[i]), 4),
            "bmd_fn": round(p["bmd_fn"], 4),
            "age_years": round(p["age_years"], 2),
            "sex": "M" if p["sex_male"] else "F",
            "weight_kg": round(p["weight_kg"], 2),
            "height_m": round(p["height_m"], 4),
            "bmi": round(p["bmi"], 3),
        }
        for rf in RISK_FACTORS:
            r[rf] = int(p[rf])
        ysm = p["years_since_menopause"]
        r["years_since_menopause"] = "" if np.isnan(ysm) else round(ysm, 2)
        r["ost"] = round(p["ost"], 3)
        for k, v in c.biomarkers.items():
            r[f"bm_{k}"] = round(v, 5) if isinstance(v, float) else v
        for k, v in c.variation.items():
            r[f"anat_{k}"] = round(v, 5) if isinstance(v, float) else v
        for k, v in c.nuisance.items():
            r[f"nz_{k}"] = round(v, 6) if isinstance(v, float) else v
        rows.append(r)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)

    def _write(fh) -> None:
        text = _TextAdapter(fh)
        w = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, _write)


class _TextAdapter:
    """Lets csv write text into a binary file handle (UTF-8)."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, s: str) -> int:
        return int(self.fh.write(s.encode("utf-8")))


def simulate(
    out: Path,
    site: str,
    n: int,
    seed: int,
    *,
    preset: str = "brief_cohort",
    options: SimulateOptions | None = None,
    progress: bool = True,
    cases: Sequence[int] | None = None,
) -> Path:
    """Render a cohort into ``out``; returns the manifest path.

    ``cases``: render only these patients of the seeded cohort of ``n`` (each exactly as the
    full cohort would have it), for example cases chosen by their planned T-score.
    """
    from osteofy.errors import UsageError

    opts = options or SimulateOptions()
    if n < 1:
        raise UsageError("--n must be at least 1")
    if opts.compression not in COMPRESSION_MODES:
        raise UsageError(f"--compress must be one of {', '.join(COMPRESSION_MODES)}")
    if opts.max_side is not None and opts.max_side < 64:
        raise UsageError("--max-side must be at least 64 pixels")
    chosen = list(range(n)) if cases is None else sorted({int(i) for i in cases})
    if not chosen or not 0 <= chosen[0] <= chosen[-1] < n:
        raise UsageError(f"cases must be indices in 0..{n - 1}")
    plan = plan_cohort(site, n, seed, preset, opts.shift)
    out.mkdir(parents=True, exist_ok=True)
    rows = manifest_rows(plan)
    from tqdm import tqdm

    desc = f"simulate {site}"
    bar = tqdm(total=len(chosen), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    for i, extra in _render_all(plan, out, opts, chosen):
        rows[i] = {"file": extra["file"], **rows[i], **extra}
        bar.update(1)
    bar.close()
    manifest = out / "manifest.csv"
    write_csv(manifest, [rows[i] for i in chosen])
    info = {
        "generator": "osteofy virtual cohort",
        "software_version": __version__,
        "site": site,
        "n": n,
        "seed": seed,
        **({"cases": chosen} if cases is not None else {}),
        "preset": preset,
        "max_side": opts.max_side,
        "compression": opts.compression,
        "counterfactual": opts.counterfactual,
        "shift": opts.shift,
        "note": SYNTHETIC_NOTE,
    }
    atomic_write(out / "cohort.json", lambda fh: fh.write(json.dumps(info, indent=2).encode()))
    return manifest
