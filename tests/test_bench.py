"""`bench.pipeline`: the quick run completes and reports every figure the issue asks for.

Timings are measurements, not tests: nothing here asserts a threshold on a time, only that
each figure was measured (present, positive) in the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# ``bench`` is not an installed package (pyproject's packages.find lists the runtime ones):
# import it from the repository root, as ``python -m bench.pipeline`` does.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.pipeline import BASELINE, STAGES, run_bench  # noqa: E402

SYNTHETIC_GROUPS = ("none", "j2k", "all")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    res = run_bench(quick=True, out_json=out, docs=None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    return res


@pytest.mark.slow
def test_headline_figures(quick_result: dict) -> None:
    res = quick_result
    assert res["quick"] is True
    assert res["total_ms_p50"] > 0
    assert res["total_ms_p95"] >= res["total_ms_p50"]
    assert res["speedup_vs_baseline"] > 0
    assert res["peak_rss_mb"] > 0
    assert res["cold_start_s"] > 0
    assert res["cold_start"]["breakdown_s"]["model_load_s"] > 0
    assert res["cold_start"]["restart_first_result_s"] > 0  # the precision choice kept
    assert {t["name"] for t in res["targets"]} == {
        "total_ms_p50",
        "explanation_overhead_pct",
        "speedup_vs_baseline",
        "peak_rss_mb",
        "cold_start_s",
    }


@pytest.mark.slow
def test_every_stage_has_p50_and_p95_for_ours_and_the_baseline(quick_result: dict) -> None:
    pipelines = quick_result["pipelines"]
    assert {"ours", BASELINE} <= set(pipelines)
    for name in ("ours", BASELINE):
        for group in SYNTHETIC_GROUPS:
            g = pipelines[name][group]
            assert g["n"] > 0, (name, group)
            for stage in STAGES:
                assert g[stage]["p95_ms"] >= g[stage]["p50_ms"] >= 0, (name, group, stage)
    # The speedup is the ratio of the two totals measured in this run.
    ours = pipelines["ours"]["none"]["total"]["p50_ms"]
    base = pipelines[BASELINE]["none"]["total"]["p50_ms"]
    assert quick_result["speedup_vs_baseline"] == pytest.approx(base / ours, rel=0.01)


@pytest.mark.slow
def test_baseline_is_the_same_model_and_our_worker_has_no_torch(quick_result: dict) -> None:
    fid = quick_result["baseline_fidelity"]
    assert fid["probs_max_abs_diff"] < 1e-3
    assert fid["cam_pearson_min"] > 0.99
    rss = quick_result["peak_rss"]
    assert rss["ours"]["torch_imported"] is False
    assert rss[BASELINE]["torch_imported"] is True


@pytest.mark.slow
def test_explanation_overhead_png_and_scans_are_reported(quick_result: dict) -> None:
    e = quick_result["explanation"]
    assert set(e["per_site"]) == {"hand", "hip"}
    for site in e["per_site"].values():
        k = site["kernels_per_run"]
        assert k["graph_without_cam"] < k["model_all_outputs"]
        assert 0 < site["cam_kernel_ms"] < site["all_kernels_ms"]
        assert site["no_cam_ms_p50"] > 0
    assert e["overhead_pct"] is not None
    assert quick_result["mqtt_png"]["p50_ms"] > 0
    assert 0 < quick_result["mqtt_png"]["bytes_max"] <= 200_000
    scans = quick_result["scans"]
    assert scans["synthetic"] is True
    assert set(scans["bits"]) == {12, 16}
    assert all(max(int(x) for x in shape.split("x")) >= 2000 for shape in scans["shapes"])
    m = quick_result["machine"]
    assert m["cores"] and m["onnxruntime"] and m["torch"] and m["date"]
