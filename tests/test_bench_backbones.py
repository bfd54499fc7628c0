"""`bench.backbones`: the cost of each backbone/size is measured and the trained packages listed.

Timings are measurements, not tests: nothing here asserts a threshold on a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.backbones import REFERENCE, markdown, run  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_the_quick_run_measures_the_reference_and_lists_every_package() -> None:
    res = run(quick=True, models_dir=MODELS)
    (ref,) = res["costs"]
    assert (ref["backbone"], ref["size"]) == REFERENCE
    assert ref["feature_map"] == [REFERENCE[1] // 16] * 2  # output stride 16
    assert ref["params_m"] > 0 and ref["gmacs"] > 0
    assert ref["ort_fp32_ms_p50"] > 0 and ref["ort_int8_ms_p50"] > 0
    assert ref["latency_vs_reference"] == 1.0

    names = {p["package"] for p in res["packages"]}
    assert names == {p.parent.name for p in MODELS.glob("*/card.json")}
    for p in res["packages"]:
        assert p["backbone"] and p["size"] > 0 and p["test_n"] >= 1000
        assert 0.5 < p["auroc_osteoporosis"] <= 1.0
        assert abs(p["gap_to_oracle"] - (p["oracle"] - p["auroc_osteoporosis"])) < 1e-3
    text = markdown(res)
    assert "synthetic virtual cohort" in text and "not a clinical accuracy" in text
    for p in res["packages"]:
        assert f"| {p['package']} |" in text
