"""Backbone x input size: what each choice costs, and what the trained packages achieved.

    python -m bench.backbones [--quick] [--json] [--docs docs/backbones.md]

Cost, measured here for every backbone in ``model.mobilenet.BACKBONES`` at 256, 320 and
384 px, each as the full fusion model with in-graph Grad-CAM (random weights: cost does not
depend on them): parameters, multiply-adds of one forward pass, the final feature map (the
heat map's resolution) and ONNX Runtime latency at batch 1 with the device's session
options, FP32 and INT8 (every backbone block quantized with the project's QDQ recipe,
calibrated on noise), all models run round-robin so machine drift hits them alike. The shipped
choice (MobileNetV3-Small OS16 at 320 px) is the reference row of the same run.

Quality is not measured here (each point is a training run of 20-70 min on this CPU): the
page lists, per backbone and size, the packages under ``models/`` trained with it, with
their held-out AUROC against the oracle ceiling and their INT8 fidelity, read from each
card and quantization report. A combination with no package says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (256, 320, 384)
REFERENCE = ("mobilenet_v3_small_os16", 320)
N_CLINICAL = 26


def _macs(net: Any, size: int) -> int:
    """Multiply-adds of one forward pass (convolutions and linear layers)."""
    import torch
    from torch import nn

    total = 0

    def conv(m: nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out.numel()) * k

    def linear(m: nn.Linear, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += int(out.numel()) * m.in_features

    hooks = [
        m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
        for m in net.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        net(torch.zeros(1, 1, size, size), torch.zeros(1, N_CLINICAL))
    for h in hooks:
        h.remove()
    return total


def _int8(path: Path, size: int, tmp: Path) -> Path:
    """Every backbone block in INT8 (the project's QDQ recipe), calibrated on noise images:
    for latency only (a shipped package keeps its sensitive blocks in FP32)."""
    from quantize.calib import Inputs
    from quantize.ptq import BATCH, calibrate, quantize

    rng = np.random.default_rng(1)
    n = 2 * BATCH
    inputs = Inputs(
        rng.standard_normal((n, 1, size, size)).astype(np.float32),
        np.zeros((n, N_CLINICAL), np.float32),
        np.zeros(n, np.int64),
        np.full(n, np.nan, np.float32),
        tmp,
    )
    cache = calibrate(path, inputs, "minmax", tmp / f"{path.stem}.ranges.json")
    return quantize(path, tmp / f"{path.stem}.int8.onnx", cache, "minmax")


def _ort_latency(paths: dict[tuple, Path], runs: int) -> dict[tuple, float]:
    """ONNX Runtime FP32 p50 ms per model, the models run round-robin so drift hits all alike."""
    import onnxruntime as ort

    from edge.backends.onnxruntime import session_options

    rng = np.random.default_rng(0)
    sessions, feeds = {}, {}
    for key, path in paths.items():
        sessions[key] = ort.InferenceSession(
            str(path), session_options(2, 1), providers=["CPUExecutionProvider"]
        )
        feeds[key] = {
            "image": rng.standard_normal((1, 1, key[1], key[1])).astype(np.float32),
            "clinical": np.zeros((1, N_CLINICAL), np.float32),
        }
        for _ in range(3):
            sessions[key].run(None, feeds[key])
    times: dict[tuple, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds[key])
            times[key].append((time.perf_counter() - t0) * 1000.0)
    return {k: round(float(np.median(v)), 2) for k, v in times.items()}


def measure_costs(quick: bool) -> list[dict]:
    import torch

    from model.export import export_onnx
    from model.fusion import ExportModule, FusionNet
    from model.mobilenet import BACKBONES

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    backbones = [REFERENCE[0]] if quick else list(BACKBONES)
    sizes = (REFERENCE[1],) if quick else SIZES
    paths: dict[tuple[str, int], Path] = {}
    int8_paths: dict[tuple[str, int], Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in backbones:
            for size in sizes:
                net = FusionNet(name, N_CLINICAL).eval()
                with torch.no_grad():
                    feat = net.parts(torch.zeros(1, 1, size, size), torch.zeros(1, N_CLINICAL))
                paths[(name, size)] = path = Path(tmp) / f"{name}-{size}.onnx"
                export_onnx(ExportModule(net), size, N_CLINICAL, path)
                int8_paths[(name, size)] = _int8(path, size, Path(tmp))
                rows.append(
                    {
                        "backbone": name,
                        "size": size,
                        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                        "gmacs": round(_macs(net, size) / 1e9, 3),
                        "feature_map": list(feat["features"].shape[2:]),
                    }
                )
                print(f"{name} @{size}: {rows[-1]}", file=sys.stderr)
        keys = list(paths)
        both = {
            **{(*k, "fp32"): paths[k] for k in keys},
            **{(*k, "int8"): int8_paths[k] for k in keys},
        }
        latency = _ort_latency(both, 10 if quick else 60)
    for r in rows:
        r["ort_fp32_ms_p50"] = latency[(r["backbone"], r["size"], "fp32")]
        r["ort_int8_ms_p50"] = latency[(r["backbone"], r["size"], "int8")]
    ref = next(r for r in rows if (r["backbone"], r["size"]) == REFERENCE)
    for r in rows:
        r["latency_vs_reference"] = round(r["ort_fp32_ms_p50"] / ref["ort_fp32_ms_p50"], 2)
        r["macs_vs_reference"] = round(r["gmacs"] / ref["gmacs"], 2)
    return rows


def trained_packages(models_dir: Path) -> list[dict]:
    """What each package under ``models_dir`` achieved, from its card and quantization report."""
    out = []
    for card_path in sorted(models_dir.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        cfg = card.get("training", {}).get("config", {})
        test = card.get("evaluation", {}).get("virtual-cohort-test", {})
        metrics = test.get("metrics", {})
        oracle = test.get("baselines", {}).get("oracle", {})
        auroc = metrics.get("auroc_osteoporosis", {}).get("value")
        fused = card.get("clinical_inputs", True)
        ceiling = oracle.get("fused" if fused else "image")
        row: dict[str, Any] = {
            "package": card_path.parent.name,
            "site": ",".join(card.get("sites", [])),
            "backbone": card.get("backbone") or cfg.get("backbone"),
            "size": int(card["input"]["image"][-1]),
            "fusion": fused,
            "epochs": cfg.get("epochs"),
            "train_minutes": round(float(card.get("training", {}).get("seconds", 0)) / 60, 1),
            "test_n": test.get("n"),
            "auroc_osteoporosis": auroc,
            "auroc_ci95": metrics.get("auroc_osteoporosis", {}).get("ci95"),
            "oracle": ceiling,
            "gap_to_oracle": (
                None if auroc is None or ceiling is None else round(ceiling - auroc, 3)
            ),
            "ece": metrics.get("ece", {}).get("value"),
        }
        q_path = card_path.parent / "quantization.json"
        if q_path.is_file():
            q = json.loads(q_path.read_text())
            row["int8"] = {
                "gates_passed": q.get("gates_passed"),
                "top1_agreement": (q.get("fidelity") or {}).get("top1_agreement"),
                "kept_fp32": len(q.get("kept_fp32") or []),
            }
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    return "–" if v is None else str(v)


def markdown(res: dict) -> str:
    lines = [
        "# Backbone and input size",
        "",
        f"Written by `python -m bench.backbones` on {res['when']}. Machine: {res['machine']}. "
        "Cost figures are measured in this run for every combination (random weights); "
        "single figures vary by about +/-30 % between runs on this shared machine, so compare "
        "within the table. Quality figures come from the packages under `models/`, trained "
        "and evaluated on the **synthetic virtual cohort** (`docs/cohort.md`): they check the "
        "software and are not a clinical accuracy.",
        "",
        "## Cost (every combination, this run)",
        "",
        "Full fusion model with in-graph Grad-CAM. Latency: ONNX Runtime FP32, batch 1, "
        "2 threads, the device's session options, p50 of 60 runs, all models round-robin. "
        "Multiply-adds of one forward pass (training costs about three times that per image; "
        "the trained packages' wall-clock training time is in the next table). Reference: "
        f"{REFERENCE[0]} at {REFERENCE[1]} px.",
        "",
        "| backbone | size | params (M) | GMACs (x ref) | heat map | ORT FP32 ms p50 (x ref) | "
        "ORT INT8 ms p50, every block INT8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["costs"]:
        fm = "x".join(str(v) for v in r["feature_map"])
        lines.append(
            f"| {r['backbone']} | {r['size']} | {r['params_m']} | {r['gmacs']} "
            f"({r['macs_vs_reference']}) | {fm} | {r['ort_fp32_ms_p50']} "
            f"({r['latency_vs_reference']}) | {r['ort_int8_ms_p50']} |"
        )
    lines += [
        "",
        "## Quality (trained packages)",
        "",
        "Held-out virtual-cohort test set of each site (`docs/model.md`); gap = the cohort's "
        "oracle ceiling (fused, or image-only for an image-only package) minus the model's "
        "AUROC. INT8: the verdict of `osteofy quantize` (top-1 agreement on unseen images, "
        "blocks kept in FP32). Train min: wall clock of `osteofy train` as its package "
        "recorded it, on whatever else the machine was doing then (`docs/model.md` says which "
        "runs shared the CPU), so it compares runs only roughly; the GMACs above compare cost.",
        "",
        "| package | site | backbone | size | fusion | epochs | train min | AUROC osteoporosis "
        "(95 % CI) | oracle | gap | ECE | INT8 top-1 (FP32 blocks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["packages"]:
        ci = p["auroc_ci95"]
        auroc = _fmt(p["auroc_osteoporosis"]) + (f" ({ci[0]}–{ci[1]})" if ci else "")
        q = p.get("int8")
        int8 = f"{_fmt(q['top1_agreement'])} ({q['kept_fp32']})" if q else "not quantized"
        lines.append(
            f"| {p['package']} | {p['site']} | {p['backbone']} | {p['size']} | "
            f"{'yes' if p['fusion'] else 'no'} | {_fmt(p['epochs'])} | {p['train_minutes']} | "
            f"{auroc} | {_fmt(p['oracle'])} | "
            f"{_fmt(p['gap_to_oracle'])} | {_fmt(p['ece'])} | {int8} |"
        )
    trained = {(p["backbone"], p["size"]) for p in res["packages"]}
    missing = [
        f"{r['backbone']} at {r['size']}"
        for r in res["costs"]
        if (r["backbone"], r["size"]) not in trained
    ]
    if missing:
        lines += ["", "No trained package yet for: " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def run(quick: bool, models_dir: Path) -> dict:
    import os

    from edge.latency import cpu_name

    cpu = cpu_name()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "quick": quick,
        "costs": measure_costs(quick),
        "packages": trained_packages(models_dir),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.backbones", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the reference combination only")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--docs", type=Path, default=Path("docs/backbones.md"))
    ap.add_argument("--no-docs", action="store_true", help="do not write the markdown page")
    args = ap.parse_args(argv)
    res = run(args.quick, args.models)
    text = markdown(res)
    if not args.no_docs and not args.quick:
        from osteofy.fsutil import atomic_write_bytes

        atomic_write_bytes(args.docs, text.encode())
    print(json.dumps(res) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
