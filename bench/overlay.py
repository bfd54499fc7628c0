"""Benchmark of explanation rendering: heat map + overlay + PNG, ours vs full resolution.

    python -m bench.overlay [--quick] [--json]

For a simulated hand (1200 px) and hip (2150 px) radiograph, times in one process:
ours = ``cam_to_display`` at the 768 px working image, ``render_overlay(max_side=768)``,
``encode_png`` (<= 200 KB); baseline = the same at source resolution with OpenCV's default
PNG. Prints p50 ms of each step, PNG bytes and the ratio baseline / ours. OpenCV runs on
one thread; figures vary between processes on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from cohort.plan import plan_cohort  # noqa: E402
from cohort.render import render_case  # noqa: E402
from edge.overlay import cam_to_display, encode_png, render_overlay  # noqa: E402
from edge.preprocess import PreprocessConfig, RawImage, display_work, preprocess_to_uint8  # noqa: E402

SIZES = {"hand": 1200, "hip": 2150}
PROBS = {"normal": 0.08, "osteopenia": 0.21, "osteoporosis": 0.71}


def _p50(fn: Callable[[], Any], n: int) -> tuple[Any, float]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return out, float(np.percentile(times, 50))


def _pipeline(display: np.ndarray, geom: Any, cam: np.ndarray, full: bool, n: int) -> dict:
    side = max(display.shape) if full else 768  # full: the source-resolution image
    heat, cam_ms = _p50(lambda: cam_to_display(cam, geom, display.shape), n)
    over, render_ms = _p50(
        lambda: render_overlay(
            display, heat, label="osteoporosis", probs=PROBS, tscore=-2.7, max_side=side
        ),
        n,
    )
    if full:
        png, enc_ms = _p50(lambda: cv2.imencode(".png", over)[1].tobytes(), n)
    else:
        png, enc_ms = _p50(lambda: encode_png(over), n)
    return {
        "shape": list(over.shape[:2]),
        "cam_ms": round(cam_ms, 2),
        "render_ms": round(render_ms, 2),
        "encode_ms": round(enc_ms, 2),
        "total_ms": round(cam_ms + render_ms + enc_ms, 2),
        "png_bytes": len(png),
    }


def run(quick: bool = False) -> dict:
    cv2.setNumThreads(1)
    n = 5 if quick else 21
    res: dict = {"threads": 1, "n": n, "sites": {}}
    for site, max_side in SIZES.items():
        plan = plan_cohort(site, 1, 5)
        r = render_case(plan.site, plan.case(0), plan.render_seed(0), max_side=max_side)
        raw = RawImage(pixels=r.pixels, photometric=r.photometric, window=r.window)
        noise = np.random.default_rng(0).normal(0.0, 1.0, (10, 10)).astype(np.float32)
        cam: np.ndarray = cv2.GaussianBlur(noise, (0, 0), 1.0)
        row = {}
        for name, work_side, full in (("ours", 768, False), ("baseline", max_side, True)):
            cfg = PreprocessConfig(work_side=work_side)
            display, _ = display_work(raw, cfg)
            _, geom = preprocess_to_uint8(raw, cfg)
            row[name] = _pipeline(display, geom, cam, full, n)
        row["speedup_vs_baseline"] = round(row["baseline"]["total_ms"] / row["ours"]["total_ms"], 2)
        res["sites"][site] = row
    return res


def table(res: dict) -> str:
    lines = [
        f"explanation rendering, p50 of {res['n']} runs, OpenCV 1 thread",
        f"{'site':5} {'variant':9} {'output':>10} {'cam ms':>7} {'render ms':>9} "
        f"{'encode ms':>9} {'total ms':>8} {'PNG bytes':>10}",
    ]
    for site, row in res["sites"].items():
        for name in ("ours", "baseline"):
            r = row[name]
            shape = "x".join(str(v) for v in r["shape"])
            lines.append(
                f"{site:5} {name:9} {shape:>10} {r['cam_ms']:7.1f} {r['render_ms']:9.1f} "
                f"{r['encode_ms']:9.1f} {r['total_ms']:8.1f} {r['png_bytes']:10,}"
            )
        lines.append(f"{site:5} speedup vs baseline: {row['speedup_vs_baseline']}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print(json.dumps(res) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
