"""The screening pipeline, `osteofy screen` and `osteofy edge serve` on real cohort files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from edge.result import Result
from edge.runtime import Screener
from edge.serve import EdgeService
from osteofy.cli import main
from osteofy.errors import InputRejected

ROOT = Path(__file__).parent.parent


def _write_config(cfg, path: Path) -> Path:
    data = {
        "data_dir": str(cfg.data_dir),
        "models_dir": str(cfg.models_dir),
        "precision": cfg.precision,
        "mqtt": {"url": ""},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _with_identity(src: Path, dst: Path, i: int, name: str = "DOE^JANE") -> Path:
    """A copy of ``src`` that is another study of another patient (distinct bytes)."""
    ds = pydicom.dcmread(src)
    ds.PatientID = f"MRN-{i:06d}"
    ds.PatientName = name
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.{1000 + i}"
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{900000 + i}"
    ds.save_as(dst)
    return dst


def test_screen_gives_a_valid_result_without_identifiers(device_scans, device_config, tmp_path):
    screener = Screener(device_config)
    src = _with_identity(device_scans[0], tmp_path / "a.dcm", 1, "CANARY^PERSON")
    outcome = screener.screen(src)
    payload = outcome.result.payload()
    Result.model_validate(payload)  # the published model accepts it
    text = json.dumps(payload)
    for canary in ("CANARY", "MRN-000001", "1.2.826.0.1.3680043.8.498"):
        assert canary not in text
    assert len(payload["patient_key"]) == 64 and len(payload["study_key"]) == 64
    assert payload["schema"] == "osteofy.result.v1"
    assert payload["body_part"] == "hand"
    assert abs(sum(payload["prediction"]["probs"].values()) - 1.0) < 1e-3
    assert payload["model"]["backend"] == "onnxruntime"
    assert payload["model"]["precision"] == "fp32"
    assert {"decode", "preprocess", "inference", "explanation", "total"} <= set(
        payload["timings_ms"]
    )
    # The cohort header carries age/sex/weight/height but no risk factors: flagged, not guessed.
    assert "missing_clinical_facts" in payload["quality"]["flags"]
    assert "prior_fracture" in payload["quality"]["missing_facts"]
    # Same patient again -> same key; another patient -> another key.
    again = screener.screen(_with_identity(device_scans[1], tmp_path / "b.dcm", 1)).result
    other = screener.screen(_with_identity(device_scans[1], tmp_path / "c.dcm", 2)).result
    assert again.patient_key == outcome.result.patient_key != other.patient_key


def test_clinical_facts_change_the_result_and_clear_the_flag(device_scans, device_config):
    screener = Screener(device_config)
    facts = {
        "prior_fracture": 1,
        "parental_hip_fracture": 1,
        "smoking": 1,
        "glucocorticoids": 1,
        "rheumatoid_arthritis": 1,
        "alcohol": 1,
        "secondary_osteoporosis": 1,
    }
    base = screener.screen(device_scans[0]).result
    more = screener.screen(device_scans[0], facts).result
    assert "missing_clinical_facts" not in more.quality.flags
    assert more.prediction.probs.osteoporosis > base.prediction.probs.osteoporosis
    pushed = {c.factor: c.log_odds for c in more.explanation.clinical}
    assert pushed["prior_fracture"] > 0


def test_screen_cli_json_lines_in_order_and_exit_3(device_scans, device_config, tmp_path, capsys):
    cfg = _write_config(device_config, tmp_path / "config.yaml")
    bad = tmp_path / "not-dicom.dcm"
    bad.write_bytes(b"hello, this is not a radiograph")
    files = [str(device_scans[0]), str(bad), str(device_scans[-1])]
    rc = main(["screen", *files, "--json", "--config", str(cfg), "--overlay", str(tmp_path / "o")])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 3
    assert [x["input"] for x in lines] == files
    assert "rejected" in lines[1] and "prediction" not in lines[1]
    for r in (lines[0], lines[2]):
        r = dict(r)
        r.pop("input")
        Result.model_validate(r)
    assert lines[2]["body_part"] == "hip"
    pngs = list((tmp_path / "o").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size <= 200_000 for p in pngs)


def test_screen_cli_all_good_exits_0_and_bad_clinical_is_usage(
    device_scans, device_config, tmp_path, capsys
):
    cfg = _write_config(device_config, tmp_path / "config.yaml")
    assert main(["screen", str(device_scans[0]), "--config", str(cfg)]) == 0
    assert "T-score estimate" in capsys.readouterr().out
    rc = main(["screen", str(device_scans[0]), "--config", str(cfg), "--clinical", '{"smokes": 1}'])
    assert rc == 2


def test_a_chest_with_a_lying_header_is_rejected_by_ood(device_scans, device_config, tmp_path):
    """A non-hand image sent as BodyPartExamined=HAND: the ood score rejects it."""
    from edge.preprocess import raw_from_dataset
    from model.ood_probes import probes

    ds = pydicom.dcmread(device_scans[0])
    raw = raw_from_dataset(ds)
    chest = probes(raw, np.random.default_rng(0))["chest"]
    px = chest.pixels
    if px.dtype != ds.pixel_array.dtype:
        px = np.clip(px, 0, 2 ** int(ds.BitsStored) - 1).astype(ds.pixel_array.dtype)
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = px.tobytes()
    ds.PhotometricInterpretation = chest.photometric
    for kw in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if kw in ds:
            delattr(ds, kw)
    path = tmp_path / "chest.dcm"
    ds.save_as(path)
    from osteofy.errors import InputRejected

    with pytest.raises(InputRejected, match="does not look like a hand radiograph"):
        Screener(device_config).screen(path)


def test_serve_once_results_rejections_and_no_duplicates(device_scans, device_config, tmp_path):
    service = EdgeService(device_config)
    inbox = service.folders.inbox
    for i, src in enumerate(device_scans[:3]):
        _with_identity(src, inbox / f"s{i}.dcm", i)
    (inbox / "junk.dcm").write_bytes(b"\x00" * 300)
    (inbox / ".partial-upload").write_bytes(b"half")  # hidden: the writer is not done
    assert service.run_once() == 4
    assert service.store.count() == 3
    assert sorted(p.name for p in service.folders.done.iterdir()) == ["s0.dcm", "s1.dcm", "s2.dcm"]
    reasons = list(service.folders.quarantine.glob("*.reason.json"))
    assert len(reasons) == 1 and "reason" in json.loads(reasons[0].read_text())
    assert (inbox / ".partial-upload").exists()
    # The same bytes arriving again make no second result.
    _with_identity(device_scans[0], inbox / "again.dcm", 0)
    service.run_once()
    assert service.store.count() == 3
    for payload in service.store.results():
        _, local, public = service.store.result(payload["result_id"])
        assert (service.folders.overlays / local).is_file()
        assert (service.folders.overlays / public).stat().st_size <= 200_000
    service.close()


@pytest.mark.slow
def test_kill_9_during_100_studies_loses_nothing_and_duplicates_nothing(
    device_scans, device_config, tmp_path
):
    cfg_path = _write_config(device_config, tmp_path / "config.yaml")
    service = EdgeService(device_config)  # creates the folders
    service.close()
    inbox = service.folders.inbox
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(100):
        f = _with_identity(device_scans[i % len(device_scans)], staging / f"study{i:03d}.dcm", i)
        os.replace(f, inbox / f.name)
    cmd = [sys.executable, "-m", "osteofy.cli", "edge", "serve", "--config", str(cfg_path)]
    rng = random.Random(7)
    deadline = time.monotonic() + 240
    kills = 0
    while kills < 5 and time.monotonic() < deadline:
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    # A last run drains what is left and stops on its own.
    done = subprocess.run([*cmd, "--once"], cwd=ROOT, capture_output=True, timeout=240)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    check = EdgeService(device_config)
    digests = [r[0] for r in check.store.db.execute("SELECT input_sha256 FROM results").fetchall()]
    assert len(digests) == 100 and len(set(digests)) == 100
    assert not [p for p in check.folders.inbox.iterdir()]
    assert not [p for p in check.folders.work.iterdir()]
    assert len(list(check.folders.done.iterdir())) == 100
    overlays = {p.name for p in check.folders.overlays.iterdir()}
    assert not [n for n in overlays if n.startswith(".") or n.endswith(".tmp")]
    for payload in check.store.results(limit=200):
        _, local, public = check.store.result(payload["result_id"])
        assert local in overlays and public in overlays
    check.close()


def test_doctor_says_what_runs_and_fails_without_models(device_config, tmp_path, capsys):
    cfg = _write_config(device_config, tmp_path / "config.yaml")
    assert main(["doctor", "--json", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["can_screen"] is True
    sites = {c["name"]: c for c in report["checks"] if c["name"].startswith("site ")}
    assert sites["site hand"]["ok"] and "onnxruntime/fp32" in sites["site hand"]["detail"]
    empty = tmp_path / "no-models"
    empty.mkdir()
    (tmp_path / "bad.yaml").write_text(f"models_dir: {empty}\ndata_dir: {tmp_path}/v\n")
    assert main(["doctor", "--config", str(tmp_path / "bad.yaml")]) == 4
    assert "CANNOT screen" in capsys.readouterr().out


def test_rescreen_with_completed_facts_and_feedback_are_stored_and_queued(
    device_scans, device_config
):
    from edge.outbox import Outbox

    service = EdgeService(device_config)
    _with_identity(device_scans[0], service.folders.inbox / "s.dcm", 5)
    service.run_once()
    (first,) = service.store.results()
    rid = first["result_id"]
    for cls in ("normal", "osteopenia", "osteoporosis"):
        assert (service.folders.overlays / f"{rid}.heat-{cls}.png").is_file()
    outcome = service.rescreen(rid, {"prior_fracture": 1, "glucocorticoids": 1})
    new = outcome.result
    assert new.result_id != rid
    assert "prior_fracture" not in new.quality.missing_facts
    assert new.prediction.probs.osteoporosis > first["prediction"]["probs"]["osteoporosis"]
    row = service.store.db.execute(
        "SELECT supersedes FROM results WHERE result_id = ?", (new.result_id,)
    ).fetchone()
    assert row[0] == rid
    with pytest.raises(InputRejected):
        service.rescreen(rid, {"smokes": True})
    fb = service.feedback(rid, agree=False, dxa_tscore=-2.9)
    assert service.store.feedback_for(rid)[0]["dxa_tscore"] == -2.9
    kinds = [
        m.kind for m in Outbox(service.store, "clinic-001", "edge-01", 1000).pending(set(), 50)
    ]
    assert kinds.count("result") == 2 and kinds.count("feedback") == 1
    assert fb["result_id"] == rid
    service.close()


def test_a_restart_removes_half_written_overlays_but_never_a_study(device_scans, device_config):
    """Regression: kill -9 during an overlay write left `.ID.png.XXXX.tmp` behind."""
    first = EdgeService(device_config)
    stale = first.folders.overlays / ".0000.heat-normal.png.abcd1234.tmp"
    stale.write_bytes(b"half")
    study = first.folders.inbox / ".upload.tmp"  # a hidden temp file in the inbox is not ours
    study.write_bytes(b"x")
    first.close()
    again = EdgeService(device_config)
    assert not stale.exists() and study.exists()
    again.close()


def test_precision_auto_is_measured_once_then_kept_per_model_and_cpu(
    device_config, tmp_path, monkeypatch
):
    import json

    import edge.select as select
    from edge.runtime import Screener

    cfg = device_config.model_copy(update={"precision": "auto"})
    calls = []
    measure = select.interleaved
    monkeypatch.setattr(select, "interleaved", lambda *a, **k: calls.append(1) or measure(*a, **k))
    first = Screener(cfg)
    measured = len(calls)
    assert measured == len(first.models) >= 1  # every site with an INT8 file, once
    kept = json.loads((cfg.data_dir / "precision.json").read_text())
    assert len(kept) == measured
    again = Screener(cfg)  # a restart: nothing measured, the same choice, the reason says why
    assert len(calls) == measured
    for site, m in again.models.items():
        assert m.choice.backend.precision == first.models[site].choice.backend.precision
        assert "kept in" in m.choice.reason
    # Another CPU (or model file, or runtime version) is another key: measured again.
    monkeypatch.setattr(select, "cpu_name", lambda: "another CPU")
    Screener(cfg)
    assert len(calls) == 2 * measured
    # A damaged file is measured over, not trusted; a read-only check (doctor) writes nothing.
    (cfg.data_dir / "precision.json").write_text("{not json")
    Screener(cfg, create_secret=False)
    assert len(calls) == 3 * measured
    assert (cfg.data_dir / "precision.json").read_text() == "{not json"


def test_the_newest_fusion_package_of_a_site_is_preferred(tmp_path):
    from edge.runtime import _preferred

    def package(name: str, clinical: bool) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "card.json").write_text(json.dumps({"clinical_inputs": clinical}))
        return d

    paths = [
        package("hip-image-only-v9", False),
        package("hip-v1", True),
        package("hip-v10", True),
        package("hip-v2", True),
    ]
    order = [p.name for p in _preferred(paths)]
    assert order == ["hip-v10", "hip-v2", "hip-v1", "hip-image-only-v9"]
