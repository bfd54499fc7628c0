"""Build (and cache) the TensorRT engine of a model package on the device: ``osteofy build-engine``.

Precision rules, chosen so the result is never a silent downgrade (STYLE.md, habit 4):

* **int8** (the default) is built ONLY from ``model.int8.onnx`` — explicit quantization from the
  QDQ graph, in a *strongly typed* network: TensorRT takes every tensor's type from the graph
  (INT8 where the Q/DQ nodes say so, FP32 elsewhere) and no precision flag is set. That is
  NVIDIA's recommended path for Q/DQ models in TensorRT 10 ("Use explicit quantization with
  Strong Typing. Precision-control build flags are not required and should not be specified."),
  and the only one left in TensorRT 11, where the FP16/INT8 builder flags are removed. Implicit
  (calibrator) quantization is deprecated since 10.1 and is not used. A missing INT8 file, a
  file without Q/DQ nodes, or a GPU without INT8 is an error — never a fallback.
* **fp16** is built only when asked for, from ``model.onnx`` with ``BuilderFlag.FP16`` in a
  weakly typed network (TensorRT 10.x). On a TensorRT without that flag it is an error.

Networks are always explicit-batch in TensorRT 10 (``EXPLICIT_BATCH`` is deprecated and
ignored), so the flag is not passed. The batch dimension is dynamic with one optimization
profile: min 1, opt 1 (the device screens one radiograph at a time), max ``max_batch``.

A cached engine is reused only after TensorRT has deserialized it (``plan_refusal``); one that
does not load is rebuilt. Builds share one timing cache per device (``timing_cache_path``).

The pure helpers (``build_settings``, ``profile_shapes``, ``check_*``, ``check_qdq_model``) are
testable without TensorRT; ``_serialize`` is the only code that touches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge.backends import INPUTS
from edge.backends.tensorrt import ExpectedIO
from edge.engines import (
    SOURCE_FILES,
    DeviceInfo,
    check_precision,
    key_for,
    load_entry,
    plan_refusal,
    probe_device,
    source_onnx,
    store_engine,
)
from edge.package import load_package
from osteofy.errors import Unavailable, UsageError
from osteofy.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

MIN_WORKSPACE_MB = 64
MAX_BATCH_LIMIT = 64
OPT_BATCH = 1
Shape = tuple[int, ...]


def check_build_args(precision: str, workspace_mb: int, max_batch: int) -> None:
    check_precision(precision)
    if not MIN_WORKSPACE_MB <= workspace_mb <= 1 << 20:
        raise UsageError(f"workspace {workspace_mb} MB: use {MIN_WORKSPACE_MB}..{1 << 20} MB")
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise UsageError(f"max batch {max_batch}: use 1..{MAX_BATCH_LIMIT}")


def _cc(compute_capability: str) -> tuple[int, int]:
    major, _, minor = compute_capability.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise Unavailable(f"unknown compute capability {compute_capability!r}") from None


def check_int8_platform(compute_capability: str, platform_has_fast_int8: bool | None) -> None:
    """Refuse INT8 on GPUs that lack it, rather than let TensorRT emulate it in FP32.

    Per the TensorRT support matrix (hardware precision table), INT8 needs compute capability
    6.1 or 7.0+; Jetson Nano (5.3), TX2 (6.2) and P100 (6.0) have none. ``platform_has_fast_int8``
    is the builder's own answer where the TensorRT version still offers it (deprecated in 10.5).
    """
    major, minor = _cc(compute_capability)
    if platform_has_fast_int8 is False or not (major >= 7 or (major, minor) == (6, 1)):
        raise Unavailable(
            f"this GPU (compute capability {compute_capability}) has no fast INT8; an INT8 "
            "engine cannot be built here (ask for --precision fp16 explicitly)"
        )


def check_fp16_platform(compute_capability: str, platform_has_fast_fp16: bool | None) -> None:
    """Refuse FP16 where it would silently run as FP32 (compute capability 6.1 has no FP16)."""
    major, minor = _cc(compute_capability)
    fast = major >= 7 or (major, minor) in ((5, 3), (6, 0), (6, 2))
    if platform_has_fast_fp16 is False or not fast:
        raise Unavailable(
            f"this GPU (compute capability {compute_capability}) has no fast FP16; use the "
            "onnxruntime backend for FP32"
        )


def profile_shapes(expected: ExpectedIO, max_batch: int) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of each input for the one optimization profile (dynamic batch)."""
    s, f = expected.image_size, expected.clinical_width
    sample = {"image": (1, s, s), "clinical": (f,)}
    return {
        name: ((1, *dims), (min(OPT_BATCH, max_batch), *dims), (max_batch, *dims))
        for name, dims in sample.items()
    }


def build_settings(
    precision: str, workspace_mb: int, max_batch: int, expected: ExpectedIO
) -> dict[str, Any]:
    """How an engine is built; recorded in the cache sidecar and compared before reuse."""
    check_precision(precision)
    return {
        "precision": precision,
        "source": SOURCE_FILES[precision],
        "network": "strongly_typed" if precision == "int8" else "weakly_typed",
        "builder_flags": [] if precision == "int8" else ["FP16"],
        "quantization": "explicit (QDQ)" if precision == "int8" else "none",
        "workspace_mb": workspace_mb,
        "profile": {
            name: {"min": list(mn), "opt": list(opt), "max": list(mx)}
            for name, (mn, opt, mx) in profile_shapes(expected, max_batch).items()
        },
    }


def check_qdq_model(onnx_path: Path) -> int:
    """Number of Q/DQ nodes of a QDQ model; ``Unavailable`` if TensorRT cannot use it as INT8.

    TensorRT's INT8 is symmetric signed: QuantizeLinear/DequantizeLinear must have INT8 zero
    points equal to 0 (onnx-tensorrt operator table), and an "INT8" file with no Q/DQ node at
    all would build a plain FP32 engine under an INT8 label. Needs the ``onnx`` package; where
    it is absent (a lean device image) the check is skipped and the TensorRT network check in
    ``_serialize`` still refuses a graph without Q/DQ layers.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        log.info("onnx not installed: skipping the QDQ pre-check of %s", onnx_path.name)
        return -1
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise Unavailable(f"{onnx_path.name} is not a readable ONNX model ({exc})") from None
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        if len(node.input) < 3 or not node.input[2]:
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            continue
        if zp.data_type != onnx.TensorProto.INT8:
            kind = onnx.TensorProto.DataType.Name(zp.data_type)
            raise Unavailable(
                f"{onnx_path.name}: {node.op_type} {node.name!r} has a {kind} zero point; "
                "TensorRT needs symmetric signed INT8 (re-quantize with QInt8, symmetric)"
            )
        if numpy_helper.to_array(zp).any():
            raise Unavailable(
                f"{onnx_path.name}: {node.op_type} {node.name!r} has a non-zero zero point; "
                "TensorRT needs symmetric quantization"
            )
    if count == 0:
        raise Unavailable(f"{onnx_path.name} has no Q/DQ nodes: it is not an INT8 QDQ model")
    return count


def build_engine(
    model_dir: Path,
    cache_dir: Path,
    precision: str = "int8",
    workspace_mb: int = 1024,
    max_batch: int = 4,
    force: bool = False,
) -> Path:
    """Build the TensorRT engine of the package at ``model_dir`` into ``cache_dir``; its path.

    Reuses a cached engine with the same key and settings unless ``force``. Raises
    ``UsageError`` for bad arguments and ``Unavailable`` for an unusable package (integrity,
    missing INT8 file), a machine without TensorRT/GPU/INT8, or a failed parse or build.
    """
    check_build_args(precision, workspace_mb, max_batch)
    pkg = load_package(Path(model_dir))  # verifies every file against the card's sha256
    onnx_path = source_onnx(pkg, precision)  # int8 -> model.int8.onnx or an error
    if precision == "int8":
        check_qdq_model(onnx_path)
    expected = ExpectedIO.from_card(pkg.card)
    settings = build_settings(precision, workspace_mb, max_batch, expected)
    device = probe_device()
    key = key_for(pkg, device, precision)
    entry = None if force else load_entry(cache_dir, key)
    if entry is not None and entry.meta.get("settings") == settings:
        refused = plan_refusal(entry.engine_path)  # trusted only once TensorRT has loaded it
        if not refused:
            log.info(
                "TensorRT %s engine of %s is cached: %s", precision, pkg.name, entry.engine_path
            )
            return entry.engine_path
        log.warning("cached engine %s does not load (%s); rebuilding", entry.engine_path, refused)
    elif entry is not None:
        log.info("cached engine %s was built with other settings; rebuilding", entry.engine_path)
    log.info(
        "building the TensorRT %s engine of %s on %s (TensorRT %s); this takes minutes",
        precision,
        pkg.name,
        device.gpu_name,
        device.tensorrt_version,
    )
    t0 = time.monotonic()
    data = _serialize(
        onnx_path,
        precision,
        workspace_mb,
        expected,
        max_batch,
        device.compute_capability,
        timing_cache_path(cache_dir, device),
    )
    seconds = time.monotonic() - t0
    path = store_engine(cache_dir, key, data, settings, build_seconds=seconds)
    log.info("TensorRT engine written: %s (%.0f s, %d bytes)", path, seconds, len(data))
    return path


def _serialize(
    onnx_path: Path,
    precision: str,
    workspace_mb: int,
    expected: ExpectedIO,
    max_batch: int,
    compute_capability: str,
    timing_cache: Path | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build the serialized engine (TensorRT 10 Python API).

    Every TensorRT exception (the bindings raise RuntimeError/TypeError, and an older
    TensorRT AttributeError) becomes a one-line ``Unavailable``.
    """
    try:
        return _build(
            onnx_path,
            precision,
            workspace_mb,
            expected,
            max_batch,
            compute_capability,
            timing_cache,
        )
    except Unavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - one line instead of a traceback
        text = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise Unavailable(f"TensorRT failed building {onnx_path.name} ({detail})") from None


def timing_cache_path(cache_dir: Path, device: DeviceInfo) -> Path:
    """Where this device's timing cache lives: one per device, CUDA and TensorRT version.

    The cache keeps the builder's tactic timings, so a rebuild (a new model version, another
    profile) takes a fraction of the first build's minutes; it only speeds up tactic
    selection and never changes which engines are valid.
    """
    return Path(cache_dir) / "timing" / f"{device.digest}.cache"


def _build(
    onnx_path: Path,
    precision: str,
    workspace_mb: int,
    expected: ExpectedIO,
    max_batch: int,
    compute_capability: str,
    timing_cache: Path | None,
) -> bytes:
    import tensorrt as trt

    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    if precision == "int8":
        check_int8_platform(compute_capability, getattr(builder, "platform_has_fast_int8", None))
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        check_fp16_platform(compute_capability, getattr(builder, "platform_has_fast_fp16", None))
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise Unavailable(
                f"TensorRT {trt.__version__} has no FP16 builder flag (weak typing removed); "
                "an FP16 engine would need an FP16 ONNX model"
            )
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        detail = "; ".join(" ".join(e.split()) for e in errors[:3]) or "no parser message"
        raise Unavailable(f"TensorRT cannot parse {onnx_path.name}: {detail}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(INPUTS):
        raise Unavailable(f"{onnx_path.name} has inputs {sorted(names)}, expected {list(INPUTS)}")
    if precision == "int8":
        qdq = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
        if not any(network.get_layer(i).type in qdq for i in range(network.num_layers)):
            raise Unavailable(f"{onnx_path.name} has no Q/DQ layers: not an INT8 QDQ model")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile_shapes(expected, max_batch).items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        _attach_timing_cache(config, timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = " ".join(logger.errors[-1].split()) if logger.errors else "no message"
        raise Unavailable(f"TensorRT could not build an engine from {onnx_path.name}: {detail}")
    if timing_cache is not None:
        _save_timing_cache(config, timing_cache)
    return bytes(serialized)


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Load the device's timing cache into ``config`` (a new, empty one if absent or bad)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    try:
        cache = config.create_timing_cache(data)
        ok = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception:  # noqa: BLE001 - a damaged file: TensorRT raises rather than returns
        ok = False
    if not ok:
        log.warning("timing cache %s refused by TensorRT; starting an empty one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write the timing cache back (atomically); a failure costs only build time later."""
    try:
        data = bytes(config.get_timing_cache().serialize())
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except (OSError, RuntimeError) as exc:
        log.warning("timing cache %s not saved (%s)", path, exc)


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to ``logging`` and keeps error lines for our message."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CollectingLogger()


def describe_settings(settings: Mapping[str, Any]) -> str:
    """One line for the CLI: what was built."""
    prof = settings["profile"]["image"]
    return (
        f"{settings['precision']} from {settings['source']} ({settings['network']}), "
        f"batch {prof['min'][0]}..{prof['max'][0]}, workspace {settings['workspace_mb']} MB"
    )
