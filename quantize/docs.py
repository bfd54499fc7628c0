"""Writes ``docs/quantization.md`` from the packages' quantization reports.

``python -m quantize.docs [docs/quantization.md]`` — every figure in the page comes from a
``models/*/quantization.json`` written by ``osteofy quantize`` (and, for the method
comparison, from ``--compare`` reports kept beside them as ``quantization.<method>.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quantize.run import markdown

INTRO = """# INT8 quantization

`osteofy quantize MODEL_DIR --calib DIR [--heldout DIR] [--method minmax|entropy|percentile]`
writes `model.int8.onnx` — QDQ ONNX with symmetric signed INT8 (per-channel weights), the one
file that serves ONNX Runtime and TensorRT explicit quantization — **only when the fidelity
gates hold on held-out images**; otherwise it exits 1, installs nothing and leaves its report
in the package.

How it works:

1. **Calibration** through THE preprocessing function (`edge/preprocess.py`, the same code the
   device runs) on at least 500 images, in equal batches of 16.
2. **What is quantized**: the backbone only. The fusion head, the in-graph Grad-CAM, the
   clinical attribution and the OOD distance are a few small matrix products on pooled features;
   INT8 there would save nothing measurable and would distort exactly the outputs that explain
   a result. Head nodes that tap a backbone tensor read the float tensor, not its Q/DQ copy.
3. **OOD re-centring**: INT8 shifts the pooled features by a small systematic amount which the
   Mahalanobis whitening magnifies (measured on hand-v1: the median in-distribution OOD score
   went from 8.4 to 23.3, against a threshold of 26.5, so 17 % of ordinary radiographs would
   have been refused). The INT8 graph's `ood_mean` is shifted by the mean feature difference on
   the calibration images; whitening and threshold stay those fitted on the training set.
4. **Sensitivity search**: the held-out folder is split into a selection part (up to 400
   images) and a verdict part. If the gates fail on the selection part, each backbone block is
   scored by quantizing it alone; blocks are kept in FP32, worst first, until the gates hold on
   the selection part with half the allowed error. The verdict part, never seen by the search,
   decides. (Calibration images are not used for selection: they set the ranges and flatter
   INT8 — on hand-v1, 0.5 % top-1 flips on calibration images against 2 % on new ones.)
5. **Gates** (enforced; the command fails otherwise): top-1 agreement >= 99 %, |ΔAUROC| <= 0.005,
   median Grad-CAM Pearson >= 0.95 for *every* class (the local screen can show any class), and
   — beyond the three required — OOD decision agreement >= 99 %.
6. **Latency**: ONNX Runtime CPU FP32 vs INT8, batch 1, interleaved in the same run. On CPUs
   without fast INT8 paths INT8 can be slower; on the device `precision: auto` measures both at
   start and runs the faster one that passed the gates (`osteofy doctor` says which and why).

All figures below come from the virtual cohort (synthetic patients and simulated radiographs):
they check the software, they are not clinical accuracy.
"""


def build(models: Path) -> str:
    parts = [INTRO]
    for report_path in sorted(models.glob("*/quantization.json")):
        report = json.loads(report_path.read_text())
        parts.append(markdown(report).replace("# INT8 quantization of", "##", 1))
        comparisons = sorted(report_path.parent.glob("quantization.*.json"))
        if comparisons:
            parts.append(_comparison(report_path.parent.name, comparisons))
    return "\n".join(parts)


def _comparison(name: str, paths: list[Path]) -> str:
    rows = [
        f"Calibration methods compared on `{name}` (same calibration and held-out images):",
        "",
        "| method | verdict | kept FP32 | top-1 agr. | abs ΔAUROC | CAM r (worst class) | "
        "OOD agr. | INT8 p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in paths:
        r = json.loads(p.read_text())
        f = r["fidelity"]
        rows.append(
            f"| {r['method']} | {'pass' if r['gates_passed'] else 'fail'} | "
            f"{', '.join(r['kept_fp32']) or '-'} | {f['top1_agreement']:.4f} | "
            f"{f['abs_delta_auroc']:.4f} | {f['cam_pearson_median']:.4f} | "
            f"{f['ood_decision_agreement']:.4f} | "
            f"{r['latency_onnxruntime_cpu']['int8']['p50_ms']:.2f} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/quantization.md")
    out.write_text(build(Path("models")))
    print(out)
