"""``osteofy demo``: what this version can show end to end on one machine.

It renders a few synthetic hand and hip radiographs as DICOM, screens each with the shipped
reference model of its site (ONNX Runtime, the device's default backend), writes a contact
sheet, and prints a summary. The edge service, MQTT and the dashboard are not part of this
version; the demo says so rather than pretend.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

SITES = ("hand", "hip")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def _screen(site: str, folder: Path, rows: list[dict]) -> dict[str, dict]:
    """P(osteoporosis), estimated T-score and latency per file, with the site's reference model."""
    from edge.backends.onnxruntime import OnnxRuntimeBackend
    from edge.clinical import clinical_vector
    from edge.package import load_package
    from edge.preprocess import normalise, preprocess_to_uint8
    from model.data import facts_from_row, read_raw

    pkg = load_package(MODELS_DIR / f"{site}-v1")
    backend = OnnxRuntimeBackend(pkg.model_file("fp32"))
    out = {}
    for r in rows:
        t0 = time.perf_counter()
        square, _ = preprocess_to_uint8(read_raw(folder / r["file"]), pkg.preprocess)
        res = backend.run(
            normalise(square, pkg.preprocess)[None],
            clinical_vector(facts_from_row(r), pkg.clinical)[None],
        )
        probs = res["probs"][0]
        out[r["file"]] = {
            "class": pkg.classes[int(np.argmax(probs))],
            "p_osteoporosis": float(probs[2]),
            "tscore": float(res["tscore"][0, 0]),
            "ms": (time.perf_counter() - t0) * 1000.0,
        }
    return out


def run_demo(out: Path, scans: int = 4, quiet: bool = False, seed: int = 2026) -> int:
    from cohort.generate import SimulateOptions, simulate
    from cohort.sheet import series, write_sheet

    out.mkdir(parents=True, exist_ok=True)
    print("Osteofy Edge demo - synthetic data only (virtual cohort); not for clinical use.")
    rows: list[dict] = []
    screened: dict[str, dict] = {}
    for site in SITES:
        t0 = time.perf_counter()
        manifest = simulate(
            out / site,
            site,
            scans,
            seed,
            options=SimulateOptions(max_side=1024, workers=2),
            progress=not quiet,
        )
        elapsed = time.perf_counter() - t0
        with manifest.open(newline="") as fh:
            site_rows = list(csv.DictReader(fh))
        rows.extend(site_rows)
        screened.update(_screen(site, out / site, site_rows))
        print(f"  {site}: {len(site_rows)} DICOM files in {out / site} ({elapsed:.1f} s)")
    sheet = write_sheet(out / "contact_sheet.png", [series(s, 0, seed, tile=300) for s in SITES])
    print()
    print("truth (from the simulator) | model (reference package, trained on synthetic data)")
    print(
        f"{'file':<22} {'class':<12} {'T':>5} | {'class':<12} {'P(op)':>5} {'T est':>5} {'ms':>5}"
    )
    for r in rows:
        m = screened[r["file"]]
        print(
            f"{r['file']:<22} {r['class']:<12} {float(r['tscore']):5.1f} | {m['class']:<12} "
            f"{m['p_osteoporosis']:5.2f} {m['tscore']:5.1f} {m['ms']:5.0f}"
        )
    print()
    print(f"contact sheet (same patient at site T = 0, -1.5, -3): {sheet}")
    print("screening aid, not a diagnosis: confirm with DXA.")
    print("edge service, MQTT and dashboard: not in this version yet.")
    return 0
