"""Post-training static quantization to QDQ ONNX (ONNX Runtime's quantizer).

Choices, and why:

* **QDQ format, symmetric signed INT8 for weights and activations.** The one ``model.int8.onnx``
  must serve ONNX Runtime *and* TensorRT explicit quantization; TensorRT accepts only
  symmetric INT8 Q/DQ (zero point 0). Weights per output channel.
* **Only the backbone is quantized.** The fusion head, the analytic Grad-CAM, the clinical
  attribution and the OOD distance are a few small matrix products on pooled features; INT8
  would save nothing there and would distort exactly the outputs that explain the result.
* **The head reads unquantized activations.** Where a head node (the OOD statistics of an early
  layer, the input thumbnail) taps a tensor that also feeds the quantized backbone, the
  quantizer would hand it the fake-quantized copy; :func:`float_taps` rewires such taps to the
  original float tensor, so INT8 rounding does not leak into the OOD distance.
* **Calibrate once, quantize many times.** Ranges are computed once and cached as JSON; the
  sensitivity search then re-quantizes with different layers kept in FP32 without
  re-running calibration.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from quantize.calib import Inputs, Reader

log = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
PERCENTILE = 99.999
STRIDE = 32  # images per calibrator pass: histograms stream, memory stays bounded
BATCH = 16  # images per calibration run; STRIDE is a multiple of it
BACKBONE_PREFIX = "/body."


class _DropOrtAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage() and "onnxruntime-inference" not in (
            record.getMessage()
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer prints progress to stdout and advice to the root logger;
    our command's stdout is its report, so both are kept out of it."""
    flt = _DropOrtAdvice()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(flt)


def backbone_nodes(model_path: Path) -> list[str]:
    """Names of the backbone's nodes (the quantizable part), in graph order."""
    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.name.startswith(BACKBONE_PREFIX)]


def quantizable_layers(model_path: Path) -> list[str]:
    """The backbone's Conv nodes: the units the sensitivity search may keep in FP32."""
    model = onnx.load(str(model_path), load_external_data=False)
    return [
        n.name
        for n in model.graph.node
        if n.name.startswith(BACKBONE_PREFIX) and n.op_type in ("Conv", "Mul", "Add")
    ]


def _extra_options(method: str) -> dict:
    opts: dict = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if method == "percentile":
        opts["CalibPercentile"] = PERCENTILE
    return opts


def calibrate(model_path: Path, inputs: Inputs, method: str, cache: Path) -> Path:
    """Compute activation ranges over ``inputs`` and store them in ``cache`` (JSON)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}")
    calib_opts = {"symmetric": True}
    if method == "percentile":
        calib_opts["percentile"] = PERCENTILE  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="osteofy-calib-") as tmp, _quiet():
        calibrator = create_calibrator(
            Path(model_path),
            None,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[method],
            providers=["CPUExecutionProvider"],
            extra_options=calib_opts,
        )
        # Histogram calibrators stack a pass's outputs, so every batch has the same size:
        # the few images beyond a multiple of BATCH are left out (and the report says so).
        usable = len(inputs) - len(inputs) % BATCH
        reader = Reader(inputs, batch=BATCH)
        for start in range(0, usable, STRIDE):
            reader.set_range(start, min(start + STRIDE, usable))
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache)
    return cache


def quantize(
    model_path: Path,
    out: Path,
    cache: Path,
    method: str,
    keep_fp32: Iterable[str] = (),
) -> Path:
    """Write a QDQ INT8 model; nodes in ``keep_fp32`` stay in floating point."""
    with _quiet():
        _quantize_static(model_path, out, cache, method, keep_fp32)
    float_taps(out, set(backbone_nodes(model_path)))
    return out


def _quantize_static(
    model_path: Path, out: Path, cache: Path, method: str, keep_fp32: Iterable[str]
) -> None:
    quantize_static(
        str(model_path),
        str(out),
        calibration_data_reader=None,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=backbone_nodes(model_path),
        nodes_to_exclude=list(keep_fp32),
        calibrate_method=METHODS[method],
        extra_options=_extra_options(method),
        calibration_cache_path=str(cache),
    )


def float_taps(path: Path, quantized: set[str]) -> int:
    """Point non-quantized consumers of ``X_DequantizeLinear_Output`` back at ``X``.

    Returns how many inputs were rewired. Only activations are touched (the Q node's input is
    produced by a node or is a graph input), never weights.
    """
    model = onnx.load(str(path))
    graph = model.graph
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    inits = {i.name for i in graph.initializer}
    dq_source: dict[str, str] = {}
    q_input = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_input:
            src = q_input[n.input[0]]
            if src in produced and src not in inits:
                dq_source[n.output[0]] = src
    changed = 0
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.name in quantized:
            continue
        for i, name in enumerate(n.input):
            if name in dq_source:
                n.input[i] = dq_source[name]
                changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def _ood_tensors(model: onnx.ModelProto) -> tuple[str, str]:
    """(feature tensor, mean initializer) of the OOD distance: the ``Sub`` reading ``ood_mean``."""
    for n in model.graph.node:
        if n.op_type == "Sub" and any(i.endswith("ood_mean") for i in n.input):
            mean = next(i for i in n.input if i.endswith("ood_mean"))
            feat = next(i for i in n.input if i != mean)
            return feat, mean
    raise ValueError("no OOD distance (Sub with ood_mean) in this graph")


def _features(path: Path, inputs: Inputs, tensor: str, batch: int = 32) -> NDArray:
    import onnxruntime as ort

    model = onnx.load(str(path))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = [
        sess.run(
            [tensor],
            {"image": inputs.image[a : a + batch], "clinical": inputs.clinical[a : a + batch]},
        )[0]
        for a in range(0, len(inputs), batch)
    ]
    return np.concatenate(out)


def ood_features(path: Path, inputs: Inputs) -> NDArray:
    """The OOD distance's input features [N, D] of a model on ``inputs``."""
    return _features(path, inputs, _ood_tensors(onnx.load(str(path)))[0])


def correct_ood_bias(int8: Path, fp32_features: NDArray, inputs: Inputs) -> float:
    """Re-centre the INT8 model's OOD distance on its own features; returns the shift's norm.

    INT8 rounding moves the pooled features by a small, *systematic* amount; the Mahalanobis
    whitening, fitted on FP32 features, magnifies it in low-variance directions, so every
    in-distribution image would look far from home. Shifting ``ood_mean`` by the mean
    feature difference on the calibration images (the bias correction used for batch-norm
    statistics after quantization) removes that offset; the whitening and the card's threshold
    stay those fitted on the training set.
    """
    model = onnx.load(str(int8))
    feat, mean_name = _ood_tensors(model)
    shift = (_features(int8, inputs, feat) - fp32_features).mean(0)
    for init in model.graph.initializer:
        if init.name == mean_name:
            mean = onnx.numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(mean + shift.astype(np.float32), mean_name))
            break
    else:
        raise ValueError(f"initializer {mean_name} not found")
    onnx.save(model, str(int8))
    return float(np.linalg.norm(shift))
