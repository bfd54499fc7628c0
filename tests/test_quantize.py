"""INT8 quantization: gates, OOD taps, installation only with evidence, package integrity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge.package import load_package
from osteofy.cli import main
from quantize import fidelity
from quantize.fidelity import Outputs

ROOT = Path(__file__).parent.parent


def _outputs(probs, cam, ood, tscore=None) -> Outputs:  # noqa: ANN001
    n = len(probs)
    return Outputs(
        np.asarray(probs, dtype=np.float32),
        np.zeros(n, np.float32) if tscore is None else np.asarray(tscore, np.float32),
        np.asarray(cam, dtype=np.float32),
        np.asarray(ood, dtype=np.float32),
    )


def test_gates_pass_on_identical_outputs_and_fail_on_each_kind_of_damage() -> None:
    rng = np.random.default_rng(0)
    n = 200
    probs = rng.dirichlet([1, 1, 1], n)
    labels = rng.integers(0, 3, n)
    cam = rng.random((n, 3, 10, 10))
    ref = _outputs(probs, cam, rng.random(n) * 10)
    same = fidelity.compare(ref, ref, labels, np.full(n, np.nan), ood_threshold=20.0)
    assert fidelity.check_gates(same) == []
    assert same["top1_agreement"] == 1.0 and same["cam_pearson_median"] == 1.0
    # Flipped argmax on 3 % of images: top-1 gate fails.
    flipped = probs.copy()
    for i in range(6):
        flipped[i] = 0.05
        flipped[i, (probs[i].argmax() + 1) % 3] = 0.9
    m = fidelity.compare(ref, _outputs(flipped, cam, ref.ood), labels, np.full(n, np.nan), 20.0)
    assert any(g.startswith("top1_agreement") for g in fidelity.check_gates(m))
    # Scrambled heat maps: the CAM gate fails even though the probabilities agree.
    scrambled = rng.permutation(cam.reshape(n, 3, -1), axis=2).reshape(cam.shape)
    m = fidelity.compare(ref, _outputs(probs, scrambled, ref.ood), labels, np.full(n, np.nan), 20.0)
    assert any(g.startswith("cam_pearson_median") for g in fidelity.check_gates(m))


def test_pearson_of_flat_maps_is_defined() -> None:
    z = np.zeros((2, 4, 4))
    r = fidelity.pearson_maps(z, np.stack([np.zeros((4, 4)), np.eye(4)]))
    assert r.tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cohort.generate import SimulateOptions, simulate

    out = tmp_path_factory.mktemp("calib")
    opts = SimulateOptions(max_side=1024, workers=2, counterfactual=False, compression="none")
    simulate(out, "hand", 56, 77, options=opts, progress=False)
    return out


@pytest.mark.slow
def test_quantize_installs_int8_only_with_passing_gates(calib_folder, tmp_path) -> None:
    from quantize.run import GatesFailed, QuantizeOptions, quantize_package

    pkg_dir = tmp_path / "hand-v1"
    shutil.copytree(ROOT / "models" / "hand-v1", pkg_dir)
    before = json.loads((pkg_dir / "card.json").read_text())
    int8 = pkg_dir / "model.int8.onnx"  # the shipped one, installed by an earlier passing run
    int8_before = int8.read_bytes() if int8.exists() else None
    # 56 images at min/max ranges: the verdict rests on a handful of images, so either branch
    # can happen (it depends on the CPU's arithmetic); each is checked for what it must do.
    opts = QuantizeOptions(method="minmax", min_calibration=32, latency_runs=5)
    try:
        report = quantize_package(pkg_dir, calib_folder, None, opts, progress=False)
    except GatesFailed as exc:
        assert exc.exit_code == 1
        # Nothing installed: the package is exactly as it was (no new or replaced INT8 model).
        assert (int8.read_bytes() if int8.exists() else None) == int8_before
        assert json.loads((pkg_dir / "card.json").read_text()) == before
        report = json.loads((pkg_dir / "quantization.json").read_text())
        assert report["failed_gates"]
    else:
        assert report["gates_passed"]
        pkg = load_package(pkg_dir)  # verifies the new sha256 too
        assert "model.int8.onnx" in pkg.card["files"]
        assert pkg.card["quantization"]["gates_passed"] is True
    assert (pkg_dir / "quantization.md").is_file()
    assert set(report["latency_onnxruntime_cpu"]) >= {"fp32", "int8", "faster"}
    assert report["calibration"]["n"] >= 32


def test_quantized_graph_is_symmetric_int8_and_the_head_reads_float(calib_folder, tmp_path):
    from quantize import ptq
    from quantize.calib import load_inputs

    pkg = load_package(ROOT / "models" / "hand-v1")
    inputs = load_inputs(pkg, calib_folder, progress=False)
    fp32 = pkg.model_file("fp32")
    cache = ptq.calibrate(fp32, inputs.take(np.arange(32)), "minmax", tmp_path / "ranges.json")
    out = ptq.quantize(fp32, tmp_path / "q.onnx", cache, "minmax")
    model = onnx.load(str(out))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    qnodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qnodes
    for n in qnodes:  # TensorRT explicit quantization: signed INT8, zero point 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    for n in model.graph.node:
        if not n.name.startswith("/body.") and n.op_type not in (
            "QuantizeLinear",
            "DequantizeLinear",
        ):
            assert not (set(n.input) & (dq_outputs - weights)), n.name


def test_a_one_byte_flip_in_a_package_is_refused_with_exit_4(tmp_path, capsys, device_scans):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "hand-v1", models / "hand-v1")
    onnx_file = models / "hand-v1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models_dir: {models}\ndata_dir: {tmp_path / 'var'}\nmqtt: {{url: ''}}\n")
    rc = main(["screen", str(device_scans[0]), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 4
    assert "integrity check" in err and "Traceback" not in err
