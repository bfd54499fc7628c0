"""Benchmark of the radiograph simulator: render time per image on one core.

    python -m bench.cohort_render [--quick] [--json] [--out docs/bench-cohort.md]

For each site it renders the same cases twice in one run, with the shipped chain and with a
baseline that samples exact Poisson noise (numpy) instead of the Gaussian approximation, and
reports p50/p95 milliseconds and the ratio. Hand images are 1024x1024-class (max side 1200 px,
about 1.1 megapixel); hip images at max side 2150 px (a 35x43 cm plate at 0.2 mm).
Figures vary by about +/-30 % between processes on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cohort.plan import plan_cohort  # noqa: E402
from cohort.render import render_case  # noqa: E402

SIZES = {"hand": 1200, "hip": 2150}


def _time_cases(
    site: str, n: int, seed: int, exact: bool, counterfactual: bool
) -> tuple[list, int]:
    plan = plan_cohort(site, n, seed)
    times, pixels = [], 0
    for i in range(n):
        cf, cf_t = plan.counterfactual(i) if counterfactual else (None, None)
        t0 = time.perf_counter()
        r = render_case(
            plan.site,
            plan.case(i),
            plan.render_seed(i),
            max_side=SIZES[site],
            counterfactual=cf,
            counterfactual_t=cf_t,
            exact_poisson=exact,
        )
        times.append((time.perf_counter() - t0) * 1000.0)
        pixels += r.pixels.size
    return times, pixels // n


def run(quick: bool = False) -> dict:
    cv2.setNumThreads(1)
    n = {"hand": 8 if quick else 30, "hip": 3 if quick else 10}
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}",
        "threads": 1,
        "sites": {},
    }
    for site in ("hand", "hip"):
        _time_cases(site, 1, 99, False, False)  # warm-up: imports, allocator
        ours, px = _time_cases(site, n[site], 7, exact=False, counterfactual=False)
        base, _ = _time_cases(site, n[site], 7, exact=True, counterfactual=False)
        with_cf, _ = _time_cases(site, n[site], 7, exact=False, counterfactual=True)
        p50 = float(np.percentile(ours, 50))
        results["sites"][site] = {
            "n": n[site],
            "mean_pixels": px,
            "render_ms_p50": round(p50, 1),
            "render_ms_p95": round(float(np.percentile(ours, 95)), 1),
            "baseline_exact_poisson_ms_p50": round(float(np.percentile(base, 50)), 1),
            "speedup_vs_baseline": round(float(np.percentile(base, 50)) / p50, 2),
            "with_counterfactual_ms_p50": round(float(np.percentile(with_cf, 50)), 1),
        }
    return results


def markdown(res: dict) -> str:
    lines = [
        "# Simulator benchmark (latest run)",
        "",
        "Written by `python -m bench.cohort_render`; synthetic images from the virtual cohort.",
        f"Machine: {res['machine']}; OpenCV and BLAS limited to {res['threads']} thread.",
        "",
        "| site | images | mean pixels | render p50 ms | p95 ms | baseline (exact Poisson) p50 ms "
        "| speedup | with counterfactual p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, r in res["sites"].items():
        lines.append(
            f"| {site} | {r['n']} | {r['mean_pixels']:,} | {r['render_ms_p50']} | "
            f"{r['render_ms_p95']} | {r['baseline_exact_poisson_ms_p50']} | "
            f"{r['speedup_vs_baseline']} | {r['with_counterfactual_ms_p50']} |"
        )
    lines += ["", "Render = anatomy, physics chain and presentation; DICOM encoding excluded.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="docs/bench-cohort.md")
    args = ap.parse_args(argv)
    res = run(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(res))
    print(json.dumps(res) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
