"""``osteofy simulate`` end to end: files, manifest, DICOM validity, determinism, bad input."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cohort.generate import SimulateOptions, load_masks, simulate
from osteofy.cli import main

DESIGN_COLUMNS = (
    "file",
    "site",
    "class",
    "tscore",
    "age_years",
    "sex",
    "weight_kg",
    "height_m",
    "bmi",
    "prior_fracture",
    "parental_hip_fracture",
    "smoking",
    "glucocorticoids",
    "rheumatoid_arthritis",
    "alcohol",
    "secondary_osteoporosis",
)


def _rows(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _pixel_digest(folder: Path) -> list[str]:
    out = []
    for r in _rows(folder):
        ds = pydicom.dcmread(folder / r["file"])
        out.append(hashlib.sha256(ds.pixel_array.tobytes()).hexdigest())
    return out


def test_manifest_has_the_design_columns_and_one_row_per_file(small_hand_cohort: Path) -> None:
    rows = _rows(small_hand_cohort)
    assert len(rows) == 6
    for col in DESIGN_COLUMNS:
        assert col in rows[0], col
    for r in rows:
        assert (small_hand_cohort / r["file"]).is_file()
        assert (small_hand_cohort / r["masks_file"]).is_file()
        assert r["class"] in ("normal", "osteopenia", "osteoporosis")
        t = float(r["tscore"])
        expected = "osteoporosis" if t <= -2.5 else "osteopenia" if t < -1 else "normal"
        assert r["class"] == expected


def test_dicom_attributes_follow_the_manifest(small_hand_cohort: Path) -> None:
    for r in _rows(small_hand_cohort):
        ds = pydicom.dcmread(small_hand_cohort / r["file"])
        assert ds.Modality in ("CR", "DX")
        assert ds.BodyPartExamined == "HAND"
        assert ds.PatientAge == f"{int(float(r['age_years'])):03d}Y"
        assert ds.PatientSex == r["sex"]
        assert ds.PhotometricInterpretation == r["photometric"]
        assert 10 <= ds.BitsStored <= 16
        assert str(ds.PatientName).startswith("SYNTHETIC^")
        assert ds.pixel_array.shape == (int(r["rows"]), int(r["cols"]))
        burned = r["nz_marker"] == "1" or r["nz_text"] == "1"
        assert ds.BurnedInAnnotation == ("YES" if burned else "NO")


def test_masks_and_counterfactual_are_beside_each_image(small_hand_cohort: Path) -> None:
    for r in _rows(small_hand_cohort):
        masks = load_masks(small_hand_cohort / r["masks_file"])
        shape = (int(r["rows"]), int(r["cols"]))
        for name in ("signal", "bone", "body", "mc_cortex_roi"):
            assert masks[name].shape == shape and masks[name].any()
        cf = masks["counterfactual"]
        assert cf.shape == shape and float(cf.max()) > 0
        assert int(r["signal_area_px"]) == int(masks["signal"].sum())


@pytest.mark.dcmtk
def test_every_generated_file_passes_dciodvfy(small_hand_cohort: Path, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    lossless = tmp_path / "j2k"
    simulate(
        lossless,
        "hip",
        2,
        4,
        options=SimulateOptions(max_side=384, compression="j2k"),
        progress=False,
    )
    files = sorted(small_hand_cohort.glob("*.dcm")) + sorted(lossless.glob("*.dcm"))
    for f in files:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
        assert not errors, f"{f.name}: {errors}"


def test_same_seed_identical_pixels_regardless_of_workers(tmp_path: Path) -> None:
    opts1 = SimulateOptions(max_side=256, workers=1, counterfactual=False)
    opts2 = SimulateOptions(max_side=256, workers=2, counterfactual=False)
    simulate(tmp_path / "a", "hand", 4, 77, options=opts1, progress=False)
    simulate(tmp_path / "b", "hand", 4, 77, options=opts2, progress=False)
    simulate(tmp_path / "c", "hand", 4, 78, options=opts1, progress=False)
    assert _pixel_digest(tmp_path / "a") == _pixel_digest(tmp_path / "b")
    a = {r["patient_id"]: r["tscore"] for r in _rows(tmp_path / "a")}
    c = {r["patient_id"]: r["tscore"] for r in _rows(tmp_path / "c")}
    assert list(a.values()) != list(c.values())
    assert set(a).isdisjoint(c)


def test_lossless_j2k_decodes_to_the_same_pixels_as_uncompressed(tmp_path: Path) -> None:
    base = SimulateOptions(max_side=256, counterfactual=False, compression="none")
    j2k = SimulateOptions(max_side=256, counterfactual=False, compression="j2k")
    simulate(tmp_path / "raw", "hand", 2, 5, options=base, progress=False)
    simulate(tmp_path / "j2k", "hand", 2, 5, options=j2k, progress=False)
    for r in _rows(tmp_path / "raw"):
        a = pydicom.dcmread(tmp_path / "raw" / r["file"])
        b = pydicom.dcmread(tmp_path / "j2k" / r["file"])
        assert b.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert np.array_equal(a.pixel_array, b.pixel_array)


def test_cli_simulate_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cohort"
    rc = main(
        [
            "simulate",
            "--site",
            "hand",
            "--n",
            "3",
            "--seed",
            "2",
            "--out",
            str(out),
            "--max-side",
            "200",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0
    assert (out / "manifest.csv").is_file() and (out / "cohort.json").is_file()
    rc = main(["simulate", "--check", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "files missing (dcm or masks)" in text
    assert "oracle AUROC" in text or "n/a" in text


def test_cli_check_sampler_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc = main(["simulate", "--check-sampler", "--site", "hand", "--n", "12000", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"] is True
    assert 0.70 <= report["oracle_auroc"]["image"] <= 0.90


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["simulate", "--site", "hand", "--n", "0", "--out", "x"], 2, "must be >= 1"),
        (["simulate", "--site", "knee", "--n", "1", "--out", "x"], 2, "invalid choice"),
        (["simulate", "--site", "hand", "--n", "1"], 2, "--out and --n are required"),
        (["simulate", "--n", "1", "--out", "x", "--preset", "nope"], 2, "unknown cohort preset"),
        (["screen", "no/such.dcm", "--precision", "int9"], 2, "invalid choice"),
        (["edge"], 2, "give a command"),
        (["quantize", "models/x"], 2, "required: --calib"),
        (["train", "--data", "x", "--site", "hand"], 2, "required"),
        (["evaluate", "no/such/model", "--data", "x"], 4, "no card.json"),
        (["bogus"], 2, "invalid choice"),
    ],
)
def test_bad_usage_gives_one_line_and_exit_code(
    argv: list[str],
    code: int,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_check_on_a_folder_without_manifest_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--check", str(tmp_path)]) == 3
    assert "no manifest.csv" in capsys.readouterr().err


def test_chosen_cases_are_rendered_exactly_as_in_the_full_cohort(tmp_path: Path) -> None:
    """``simulate(cases=...)`` (the demo's chosen scans): the same rows and pixels, only fewer."""
    opts = SimulateOptions(max_side=256, counterfactual=False)
    simulate(tmp_path / "all", "hand", 4, 5, options=opts, progress=False)
    simulate(tmp_path / "some", "hand", 4, 5, options=opts, progress=False, cases=[3, 1])
    full, some = _rows(tmp_path / "all"), _rows(tmp_path / "some")
    assert [r["case_id"] for r in some] == [full[1]["case_id"], full[3]["case_id"]]

    def same(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "render_ms"}  # a timing, not content

    assert [same(r) for r in some] == [same(full[1]), same(full[3])]
    for r in some:
        a = pydicom.dcmread(tmp_path / "all" / r["file"]).pixel_array
        assert np.array_equal(a, pydicom.dcmread(tmp_path / "some" / r["file"]).pixel_array)
    with pytest.raises(Exception, match="cases must be indices"):
        simulate(tmp_path / "bad", "hand", 4, 5, options=opts, progress=False, cases=[4])
