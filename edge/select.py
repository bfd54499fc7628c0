"""Which backend and precision run a model package on this machine, and why.

Rules (STYLE.md, habit 4 — no silent downgrade):

* ``backend: auto`` uses TensorRT when the library (10 or newer), a GPU and a built engine
  are all present, else ONNX Runtime; TensorRT's one-line reason goes into the choice's
  reason (shown by ``osteofy doctor`` and the local screen) and the log, at INFO. If the
  TensorRT engine fails later, at run time (a CUDA error such as out of memory),
  ``fall_back`` swaps in ONNX Runtime the same way. ``backend: tensorrt`` asked explicitly
  fails when TensorRT cannot run.
* ``precision: auto`` on ONNX Runtime runs INT8 only when the package's INT8 file passed the
  fidelity gates, and only when it is faster *on this CPU* (measured interleaved, a fraction
  of a second): on CPUs without fast INT8 instructions FP32 wins. The measurement is kept in
  ``<data_dir>/precision.json``, keyed by both model files' sha256, the CPU, the thread count
  and the ONNX Runtime version, so a restart (after a power cut, say) does not repeat it;
  any change to those measures again, and deleting the file does too.
* An explicit precision is honoured or refused, never replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.backends import Backend
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.latency import cpu_name, interleaved
from edge.package import ModelPackage
from osteofy.errors import Unavailable, UsageError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime")
PRECISIONS = ("auto", "int8", "fp16", "fp32")


@dataclass
class Choice:
    """The backend that will run, and the reasons, for doctor and the status message."""

    backend: Backend
    reason: str
    latency_ms: dict = field(default_factory=dict)
    may_fall_back: bool = False  # ``auto`` chose TensorRT: ONNX Runtime may replace it
    fallback: str = ""  # why ``auto`` runs ONNX Runtime instead of TensorRT ("" if it does not)

    @property
    def summary(self) -> dict:
        return {
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "reason": self.reason,
            **({"fallback": self.fallback} if self.fallback else {}),
            **({"latency_ms": self.latency_ms} if self.latency_ms else {}),
        }


def int8_usable(pkg: ModelPackage) -> tuple[bool, str]:
    """Whether the package's INT8 file may run: present, listed, and gates passed."""
    if "model.int8.onnx" not in pkg.card.get("files", {}):
        return False, "the package has no INT8 model (run `osteofy quantize`)"
    q = pkg.card.get("quantization", {})
    if not q.get("gates_passed", False):
        return False, "the package's INT8 model has no record of passing the fidelity gates"
    return True, "INT8 passed the fidelity gates"


def choose(
    pkg: ModelPackage,
    backend: str = "auto",
    precision: str = "auto",
    engine_cache: Path | None = None,
    threads: int | None = None,
    decisions: Path | None = None,
    record: bool = True,
) -> Choice:
    """``decisions``: the file of earlier ``precision: auto`` measurements (read, and written
    when ``record``); None measures every time."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}")
    trt_reason = ""
    if backend in ("auto", "tensorrt"):
        try:
            chosen = _tensorrt(pkg, precision, engine_cache)
            chosen.may_fall_back = backend == "auto"
            return chosen
        except Unavailable as exc:
            if backend == "tensorrt":
                raise
            trt_reason = f"TensorRT unavailable: {exc}; "
            log.info("%s: backend auto: no TensorRT (%s); ONNX Runtime runs", pkg.name, exc)
    choice = _onnxruntime(pkg, precision, threads, decisions, record)
    choice.reason = trt_reason + choice.reason
    choice.fallback = trt_reason.removesuffix("; ")
    return choice


def fall_back(
    pkg: ModelPackage,
    failed: Choice,
    error: Exception,
    precision: str = "auto",
    threads: int | None = None,
    decisions: Path | None = None,
    record: bool = True,
) -> Choice:
    """ONNX Runtime in place of a TensorRT choice that failed at run time; the old one closed.

    Only for choices made by ``backend: auto`` (``may_fall_back``); the reason says what
    failed, so the downgrade is visible on the screen and in doctor, and logged.
    """
    if not failed.may_fall_back:
        raise UsageError("this backend was configured explicitly; it does not fall back")
    failed.backend.close()
    log.warning(
        "%s: TensorRT failed (%s); backend auto falls back to ONNX Runtime", pkg.name, error
    )
    choice = _onnxruntime(pkg, precision, threads, decisions, record)
    choice.fallback = f"TensorRT failed at run time: {error}"
    choice.reason = f"{choice.fallback}; {choice.reason}"
    return choice


def _tensorrt(pkg: ModelPackage, precision: str, cache: Path | None) -> Choice:
    from edge.engines import probe_device

    device = probe_device()  # Unavailable without TensorRT/pycuda/GPU; imports only here
    if cache is None:
        raise Unavailable("no engine cache folder configured")
    from edge.backends.tensorrt import backend_for_package

    want = "int8" if precision in ("auto", "int8") else precision
    if want == "fp32":
        raise Unavailable("fp32 is not built as a TensorRT engine; use ONNX Runtime")
    b = backend_for_package(pkg, cache, want, device)
    return Choice(b, f"TensorRT {device.tensorrt_version} on {device.gpu_name}, {want} engine")


def _onnxruntime(
    pkg: ModelPackage,
    precision: str,
    threads: int | None,
    decisions: Path | None = None,
    record: bool = True,
) -> Choice:
    if precision == "fp16":
        raise Unavailable("fp16 runs on TensorRT only; ONNX Runtime here runs fp32 or int8")
    if precision == "fp32":
        return Choice(
            OnnxRuntimeBackend(pkg.model_file("fp32"), threads, "fp32", batch=1),
            "fp32 as configured",
        )
    ok, why = int8_usable(pkg)
    if precision == "int8":
        if not ok:
            raise Unavailable(f"{pkg.name}: int8 asked but {why}")
        return Choice(
            OnnxRuntimeBackend(pkg.model_file("int8"), threads, "int8", batch=1),
            "int8 as configured",
        )
    fp32 = OnnxRuntimeBackend(pkg.model_file("fp32"), threads, "fp32", batch=1)
    if not ok:
        return Choice(fp32, f"precision auto: fp32, because {why}")
    key = _decision_key(pkg, threads)
    known = _recall(decisions, key)
    if known is not None:
        faster, lat, when = known
        reason = (
            f"precision auto: {faster} is faster on this CPU (measured {when}: p50 fp32 "
            f"{lat['fp32']['p50_ms']:.1f} ms, int8 {lat['int8']['p50_ms']:.1f} ms; kept in "
            f"{decisions} for these model files, this CPU and ONNX Runtime); {why}"
        )
        log.info("%s: %s", pkg.name, reason)
        if faster == "fp32":
            return Choice(fp32, reason, lat)
        return Choice(
            OnnxRuntimeBackend(pkg.model_file("int8"), threads, "int8", batch=1), reason, lat
        )
    int8 = OnnxRuntimeBackend(pkg.model_file("int8"), threads, "int8", batch=1)
    size = int(pkg.card["input"]["image"][-1])
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 1, size, size)).astype(np.float32)
    clinical = np.zeros((1, pkg.clinical.width), dtype=np.float32)
    lat = interleaved({"fp32": fp32, "int8": int8}, image, clinical, runs=12, budget_s=2.0)
    faster = "int8" if lat["int8"]["p50_ms"] < lat["fp32"]["p50_ms"] else "fp32"
    reason = (
        f"precision auto: {faster} is faster on this CPU (p50 fp32 "
        f"{lat['fp32']['p50_ms']:.1f} ms, int8 {lat['int8']['p50_ms']:.1f} ms); {why}"
    )
    log.info("%s: %s", pkg.name, reason)
    if decisions is not None and record:
        _remember(decisions, key, faster, lat)
    return Choice(int8 if faster == "int8" else fp32, reason, lat)


def _decision_key(pkg: ModelPackage, threads: int | None) -> str:
    """What a precision measurement depends on, hashed: the models, the CPU, the runtime."""
    import onnxruntime as ort

    files = pkg.card.get("files", {})
    parts = [
        files.get("model.onnx", ""),
        files.get("model.int8.onnx", ""),
        cpu_name(),
        str(os.cpu_count()),
        str(threads or 0),
        ort.__version__,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_decisions(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("%s: unreadable, precision will be measured again", path)
        return {}
    return data if isinstance(data, dict) else {}


def _recall(path: Path | None, key: str) -> tuple[str, dict, str] | None:
    if path is None:
        return None
    entry = _read_decisions(path).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        faster = entry["faster"]
        lat = {p: {"p50_ms": float(entry["latency_ms"][p]["p50_ms"])} for p in ("fp32", "int8")}
        when = str(entry["measured_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (faster, lat, when) if faster in ("fp32", "int8") else None


def _remember(path: Path, key: str, faster: str, lat: dict) -> None:
    from osteofy.fsutil import atomic_write_bytes

    data = _read_decisions(path)
    data[key] = {
        "faster": faster,
        "latency_ms": {p: {"p50_ms": lat[p]["p50_ms"]} for p in ("fp32", "int8")},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    except OSError as exc:  # a full or read-only disk: measured again at the next start
        log.warning("%s: precision choice not kept (%s)", path, exc.strerror)
