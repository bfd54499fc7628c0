"""The reference packages under models/: intact, labelled synthetic, runnable without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.clinical import clinical_vector
from edge.package import load_package
from edge.preprocess import normalise, preprocess_to_uint8
from model.ood_probes import probes

MODELS = sorted(p.parent for p in (Path(__file__).parent.parent / "models").glob("*/card.json"))


def test_reference_packages_are_shipped() -> None:
    names = {p.name for p in MODELS}
    assert "hand-v1" in names


@pytest.mark.parametrize("model_dir", MODELS, ids=[p.name for p in MODELS])
def test_package_is_intact_and_says_synthetic(model_dir: Path) -> None:
    pkg = load_package(model_dir)  # verifies every sha256 in the card
    card = pkg.card
    assert card["training_data"]["synthetic"] is True
    assert "not a diagnosis" in card["intended_use"]
    test = card["evaluation"]["virtual-cohort-test"]
    assert test["synthetic_data"] is True and test["n"] >= 1000


@pytest.mark.parametrize("model_dir", MODELS, ids=[p.name for p in MODELS])
def test_package_runs_on_a_simulated_radiograph_and_flags_probes(model_dir: Path) -> None:
    from cohort.plan import plan_cohort
    from cohort.render import render_case
    from edge.preprocess import RawImage

    pkg = load_package(model_dir)
    site = pkg.card["sites"][0]
    plan = plan_cohort(site, 1, 4242)
    r = render_case(plan.site, plan.case(0), plan.render_seed(0), max_side=1024)
    raw = RawImage(pixels=r.pixels, photometric=r.photometric, window=r.window)
    backend = OnnxRuntimeBackend(pkg.model_file("fp32"))
    facts = {"age_years": 70, "sex": "F", "weight_kg": 60, "height_m": 1.6}
    clin = clinical_vector(facts, pkg.clinical)[None]
    square, _ = preprocess_to_uint8(raw, pkg.preprocess)
    out = backend.run(normalise(square, pkg.preprocess)[None], clin)
    stride = 16 if pkg.card["backbone"].endswith("_os16") else 32
    s = pkg.preprocess.size // stride
    assert out["probs"].shape == (1, 3) and abs(float(out["probs"].sum()) - 1) < 1e-4
    assert out["cam"].shape == (1, 3, s, s)
    assert out["clinical_attr"].shape == (1, 3, pkg.clinical.width)
    threshold = float(pkg.card["ood"]["threshold"])
    assert float(out["ood"][0, 0]) < threshold
    for name, probe in probes(raw, np.random.default_rng(0)).items():
        sq, _ = preprocess_to_uint8(probe, pkg.preprocess)
        ood = float(backend.run(normalise(sq, pkg.preprocess)[None], clin)["ood"][0, 0])
        assert ood > threshold, name


@pytest.mark.parametrize("model_dir", MODELS, ids=[p.name for p in MODELS])
def test_a_batch_of_one_fixed_at_load_gives_the_same_outputs(model_dir: Path) -> None:
    # The device fixes N = 1 so ONNX Runtime folds the CAM's shape arithmetic at load time.
    pkg = load_package(model_dir)
    size = int(pkg.card["input"]["image"][-1])
    rng = np.random.default_rng(5)
    image = rng.standard_normal((1, 1, size, size)).astype(np.float32)
    clinical = np.zeros((1, pkg.clinical.width), np.float32)
    files = pkg.card.get("files", {})
    for precision in ("fp32", "int8") if "model.int8.onnx" in files else ("fp32",):
        free = OnnxRuntimeBackend(pkg.model_file(precision)).run(image, clinical)
        fixed = OnnxRuntimeBackend(pkg.model_file(precision), batch=1).run(image, clinical)
        for name, value in free.items():
            np.testing.assert_allclose(fixed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
