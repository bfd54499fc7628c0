"""train -> export -> evaluate on a tiny virtual cohort: the wiring, not the accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch (the 'train' extra) is not installed")

from cohort.generate import SimulateOptions, simulate  # noqa: E402
from edge.package import load_package  # noqa: E402
from osteofy.cli import main  # noqa: E402
from osteofy.errors import Unavailable  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    opts = SimulateOptions(max_side=192, workers=1)
    simulate(root / "train", "hand", 40, 1, options=opts, progress=False)
    simulate(root / "test", "hand", 24, 2, options=opts, progress=False)
    return root / "train", root / "test"


@pytest.fixture(scope="module")
def package(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "hand-tiny"
    rc = main(
        [
            "train",
            "--data",
            str(tiny[0]),
            "--site",
            "hand",
            "--out",
            str(out),
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    assert main(["export", str(out)]) == 0
    return out


def test_package_has_the_design_files_and_card_fields(package: Path) -> None:
    card = json.loads((package / "card.json").read_text())
    for key in (
        "name",
        "version",
        "sites",
        "input",
        "preprocessing",
        "clinical",
        "classes",
        "temperature",
        "referral",
        "training_data",
        "files",
        "ood",
    ):
        assert key in card, key
    assert card["training_data"]["synthetic"] is True
    assert card["classes"] == ["normal", "osteopenia", "osteoporosis"]
    assert card["preprocessing"]["version"].startswith("osteofy-pre-")
    pkg = load_package(package)
    assert pkg.model_file("fp32").is_file()


def test_tampered_model_is_refused(package: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(Unavailable, match="integrity"):
        load_package(copy)


def test_evaluate_reports_metrics_baselines_and_explanations(
    package: Path, tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "evaluate",
            str(package),
            "--data",
            str(tiny[1]),
            "--json",
            "--record",
            "tiny-test",
            "--explain",
            "4",
            "--out",
            str(tmp_path / "eval"),
            "-q",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 24 and report["synthetic_data"] is True
    auc = report["metrics"]["auroc_osteoporosis"]
    assert 0.0 <= auc["ci95"][0] <= auc["value"] <= auc["ci95"][1] <= 1.0
    assert {"ost_rule", "clinical_only", "oracle"} <= set(report["baselines"])
    assert set(report["baselines"]["oracle"]) == {"clinical", "image", "fused"}
    e = report["explanations"]
    assert e["n"] == 4
    for which in ("predicted_class", "osteoporosis_class"):
        assert e[which]["scored"] + e[which]["empty_maps"] == 4
    for name in ("metrics.json", "report.md", "roc.png", "calibration.png", "confusion.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert np.isfinite(report["metrics"]["tscore_mae"]["value"])
    card = json.loads((package / "card.json").read_text())
    assert card["evaluation"]["tiny-test"]["n"] == 24
    load_package(package)  # recording an evaluation does not break the integrity check
