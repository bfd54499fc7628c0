"""``osteofy demo``: what this version can show end to end on one machine.

This version makes the virtual cohort: it renders a few synthetic hand and hip radiographs as
DICOM, checks them, writes a contact sheet, and prints a summary. The screening chain (edge
runtime, MQTT, dashboard) is not part of this version; the demo says so rather than pretend.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

SITES = ("hand", "hip")


def run_demo(out: Path, scans: int = 4, quiet: bool = False, seed: int = 2026) -> int:
    from cohort.generate import SimulateOptions, simulate
    from cohort.sheet import series, write_sheet

    out.mkdir(parents=True, exist_ok=True)
    print("Osteofy Edge demo - synthetic data only (virtual cohort); not for clinical use.")
    rows: list[dict] = []
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
        print(f"  {site}: {len(site_rows)} DICOM files in {out / site} ({elapsed:.1f} s)")
    sheet = write_sheet(out / "contact_sheet.png", [series(s, 0, seed, tile=300) for s in SITES])
    print()
    print(
        f"{'file':<24} {'class':<13} {'T-score':>7} {'site T':>7} {'age':>4} {'sex':>3} "
        f"{'render ms':>9}"
    )
    for r in rows:
        print(
            f"{r['file']:<24} {r['class']:<13} {float(r['tscore']):7.2f} "
            f"{float(r['t_site']):7.2f} {float(r['age_years']):4.0f} {r['sex']:>3} "
            f"{float(r['render_ms']):9.0f}"
        )
    print()
    print(f"contact sheet (same patient at site T = 0, -1.5, -3): {sheet}")
    print("screening chain (model, edge runtime, MQTT, dashboard): not in this version yet.")
    return 0
