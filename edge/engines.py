"""TensorRT engine cache shared by the builder (``quantize.engine``) and the runtime backend.

A serialized TensorRT engine is only valid for the TensorRT version and the GPU it was built
on (TensorRT developer guide, "engines are specific to the TensorRT version and GPU"), and of
course for the exact ONNX file and precision it came from. So engines are built on the device
at first start and cached under a key made of every fact that could make TensorRT refuse the
plan: the full TensorRT version (build number included), the CUDA driver version, the L4T
(JetPack) release on a Jetson, the GPU's name and compute capability, the model file's sha256
and the precision. Even then the key is not proof: ``quantize.engine`` deserializes a cached
plan before reusing it and rebuilds it when TensorRT refuses it.

    <cache>/<model-name>/<digest>.engine   the serialized engine (opaque bytes)
    <cache>/<model-name>/<digest>.json     sidecar: the key, the engine's sha256, build settings

The sidecar is written last and is the commit record: an engine without a matching sidecar
(a crash mid-write, a hand-copied file, an edited key) is never used. Both files are written
atomically (temp -> fsync -> rename), so a reader never sees half an engine.

Nothing here imports TensorRT or pycuda at module import time: ``probe_device`` imports them
inside the function, so the ONNX Runtime path never loads them (STYLE.md, habit 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from edge.package import PRECISION_FILES, ModelPackage, sha256_file
from osteofy.compat import UTC
from osteofy.errors import Unavailable, UsageError
from osteofy.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

ENGINE_SCHEMA = "osteofy.engine.v2"  # v2: the key has CUDA and L4T; v1 entries rebuild
DIGEST_CHARS = 24  # 96 bits of sha256: ample for a per-model folder of a few engines
ENGINE_PRECISIONS = ("int8", "fp16")
# Which ONNX file of the package each engine precision is built from. INT8 comes only from the
# QDQ file (explicit quantization); FP16 only from the FP32 file and only when asked for.
SOURCE_FILES = {"int8": PRECISION_FILES["int8"], "fp16": PRECISION_FILES["fp32"]}
MIN_TENSORRT_MAJOR = 10
TEGRA_RELEASE = "/etc/nv_tegra_release"  # L4T's release line, on Jetsons only
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class DeviceInfo:
    """What about this machine makes an engine valid or not."""

    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "7.2" (Xavier)
    tensorrt_version: str  # full, with the build number: "10.3.0.30"
    cuda_version: str  # of the CUDA driver: "12.6"
    l4t_release: str  # "R36.4.0" on a Jetson (JetPack 6.1), "" elsewhere

    @property
    def digest(self) -> str:
        """Names this device's timing cache (TensorRT: specific to device, CUDA, TensorRT)."""
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its digest names the cached file."""

    model_name: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_version: str
    l4t_release: str
    model_sha256: str  # of the ONNX file the engine is built from
    precision: str  # "int8" | "fp16"

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @property
    def digest(self) -> str:
        """Stable across processes and Python versions: sha256 of canonical JSON."""
        payload = json.dumps(
            {"schema": ENGINE_SCHEMA, **self.as_dict()}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:DIGEST_CHARS]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        names = [f.name for f in fields(cls)]
        if set(data) != set(names):
            raise ValueError(f"engine key fields {sorted(data)} != {sorted(names)}")
        return cls(**{n: str(data[n]) for n in names})


@dataclass(frozen=True)
class CacheEntry:
    engine_path: Path
    meta: dict


def check_precision(precision: str) -> str:
    """A TensorRT engine is INT8 (from QDQ) or FP16 (on request); FP32 runs on ONNX Runtime."""
    if precision not in ENGINE_PRECISIONS:
        raise UsageError(
            f"TensorRT engine precision {precision!r}: use int8 or fp16 "
            "(fp32 runs on the onnxruntime backend)"
        )
    return precision


def source_onnx(pkg: ModelPackage, precision: str) -> Path:
    """The ONNX file an engine of ``precision`` is built from — never a silent substitute.

    INT8 needs ``model.int8.onnx`` (QDQ); if the package has none, that is an error, not a
    reason to fall back to FP16 or FP32.
    """
    check_precision(precision)
    name = SOURCE_FILES[precision]
    if name not in pkg.card.get("files", {}) or not (pkg.path / name).is_file():
        if precision == "int8":
            raise Unavailable(
                f"model {pkg.name} has no {name} (INT8 QDQ): run `osteofy quantize` first, "
                "or ask for --precision fp16 explicitly"
            )
        raise Unavailable(f"model {pkg.name} has no {name}")
    return pkg.path / name


def model_dir_name(model_name: str) -> str:
    """The card's name as a cache folder name; refuse anything that could escape the cache."""
    if not _SAFE_NAME.fullmatch(model_name) or ".." in model_name:
        raise Unavailable(f"model name {model_name!r} cannot be used as a cache folder name")
    return model_name


def key_for(pkg: ModelPackage, device: DeviceInfo, precision: str) -> EngineKey:
    """The cache key of ``pkg``'s engine of ``precision`` on ``device``.

    The ONNX digest comes from the card (``load_package`` verified the file against it), so a
    re-quantized or re-exported model gets a new key and its old engine is never reused.
    """
    onnx = source_onnx(pkg, precision)
    digest = pkg.card.get("files", {}).get(onnx.name) or sha256_file(onnx)
    return EngineKey(
        model_name=pkg.name,
        gpu_name=device.gpu_name,
        compute_capability=device.compute_capability,
        tensorrt_version=device.tensorrt_version,
        cuda_version=device.cuda_version,
        l4t_release=device.l4t_release,
        model_sha256=str(digest),
        precision=precision,
    )


def entry_paths(cache_dir: Path, key: EngineKey) -> tuple[Path, Path]:
    """(engine file, sidecar file) of ``key`` under ``cache_dir``."""
    folder = Path(cache_dir) / model_dir_name(key.model_name)
    return folder / f"{key.digest}.engine", folder / f"{key.digest}.json"


def load_entry(cache_dir: Path, key: EngineKey) -> CacheEntry | None:
    """The cached engine of ``key`` with its sidecar, or None when absent or not trustworthy."""
    engine, sidecar = entry_paths(cache_dir, key)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("engine cache: ignoring unreadable sidecar %s (%s)", sidecar, exc)
        return None
    if not isinstance(meta, dict) or meta.get("schema") != ENGINE_SCHEMA:
        log.warning("engine cache: ignoring %s (unknown schema)", sidecar)
        return None
    if meta.get("key") != key.as_dict():
        log.warning("engine cache: %s was recorded for another key; ignoring it", sidecar)
        return None
    try:
        size = engine.stat().st_size
    except FileNotFoundError:
        log.warning("engine cache: %s has no engine file beside it", sidecar)
        return None
    if size != meta.get("engine_bytes") or sha256_file(engine) != meta.get("engine_sha256"):
        log.warning("engine cache: %s does not match its sidecar (partial or replaced)", engine)
        return None
    return CacheEntry(engine_path=engine, meta=meta)


def find_engine(cache_dir: Path, key: EngineKey) -> Path | None:
    """The verified cached engine for ``key``, or None (then it must be built)."""
    entry = load_entry(cache_dir, key)
    return entry.engine_path if entry else None


def store_engine(
    cache_dir: Path,
    key: EngineKey,
    engine: bytes,
    settings: Mapping[str, Any],
    build_seconds: float | None = None,
) -> Path:
    """Write ``engine`` and then its sidecar, each atomically; return the engine's path.

    The sidecar records the engine's sha256, so a crash between the two writes leaves either
    no sidecar or an old one that no longer matches: ``find_engine`` then returns None.
    """
    engine_path, sidecar = entry_paths(cache_dir, key)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, engine)
    meta = {
        "schema": ENGINE_SCHEMA,
        "digest": key.digest,
        "key": key.as_dict(),
        "engine_file": engine_path.name,
        "engine_bytes": len(engine),
        "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": dict(settings),
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }
    atomic_write_bytes(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return engine_path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _python_hint() -> str:
    """On a Jetson, JetPack's TensorRT bindings exist for its system Python (3.10) only."""
    if Path(TEGRA_RELEASE).exists() and sys.version_info[:2] != (3, 10):
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        return f" from /usr/bin/python3 (3.10; this is Python {here})"
    return ""


def check_tensorrt_version(version: str) -> str:
    """``version`` if it is TensorRT 10 or newer; else ``Unavailable`` naming what was found.

    The builder and the backend use TensorRT 10's named-tensor API and strongly typed
    networks; TensorRT 8.x (JetPack 5 and 6.0) has neither, and would fail mid-build with an
    AttributeError instead of a reason.
    """
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        found = f"TensorRT {version}" if version else "a TensorRT without a version"
        raise Unavailable(
            f"{found} found; engines need TensorRT {MIN_TENSORRT_MAJOR} or newer "
            "(JetPack 6.1+; see docs/jetson.md)"
        )
    return version


def probe_device(index: int = 0) -> DeviceInfo:
    """GPU name, compute capability and TensorRT version; ``Unavailable`` with one line if not.

    Imports tensorrt and pycuda here, never at module import. Any failure of theirs (an old
    TensorRT, a CUDA error) becomes ``Unavailable`` so that ``backend: auto`` can fall back.
    """
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        raise Unavailable(
            "TensorRT is not installed (pip install tensorrt, or on a Jetson JetPack's "
            f"python3-libnvinfer in a venv made with --system-site-packages{_python_hint()}; "
            "see docs/jetson.md)"
        ) from None
    except (ImportError, OSError) as exc:  # the bindings exist but libnvinfer.so cannot load
        raise Unavailable(f"TensorRT's libraries cannot be loaded ({_first_line(exc)})") from None
    version = check_tensorrt_version(str(getattr(trt, "__version__", "")))
    try:
        import pycuda.driver as cuda
    except ModuleNotFoundError:
        raise Unavailable(
            "pycuda is not installed (pip install pycuda with nvcc on PATH; see docs/jetson.md)"
        ) from None
    except (ImportError, OSError) as exc:  # installed, but built for a CUDA that is not here
        raise Unavailable(f"pycuda cannot be loaded ({_first_line(exc)})") from None
    try:
        cuda.init()
        count = cuda.Device.count()
        if count <= index:
            raise Unavailable("no CUDA device")
        dev = cuda.Device(index)
        major, minor = dev.compute_capability()
        name = str(dev.name())
        driver = int(cuda.get_driver_version())  # 12060 -> CUDA 12.6
    except Unavailable:
        raise
    except Exception as exc:  # pycuda raises its own hierarchy (LogicError, RuntimeError...)
        raise Unavailable(f"no CUDA device ({_first_line(exc)})") from None
    return DeviceInfo(
        gpu_name=name,
        compute_capability=f"{major}.{minor}",
        tensorrt_version=version,
        cuda_version=f"{driver // 1000}.{driver % 1000 // 10}",
        l4t_release=l4t_release(),
    )


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one-line reason) for ``osteofy doctor``."""
    try:
        dev = probe_device()
    except Unavailable as exc:
        return False, str(exc)
    l4t = f", L4T {dev.l4t_release}" if dev.l4t_release else ""
    return True, (
        f"TensorRT {dev.tensorrt_version} on {dev.gpu_name} "
        f"(compute capability {dev.compute_capability}, CUDA {dev.cuda_version}{l4t})"
    )


_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def l4t_release(path: Path | str | None = None) -> str:
    """The L4T release of a Jetson, "R36.4.0", from ``/etc/nv_tegra_release``; "" elsewhere.

    Its first line reads ``# R36 (release), REVISION: 4.0, GCID: ..., BOARD: ...``. A file that
    exists but does not parse is kept whole (one line), so a JetPack change still changes
    the key instead of being hidden.
    """
    try:
        text = Path(path or TEGRA_RELEASE).read_text(encoding="utf-8", errors="replace")
        first = text.splitlines()[0]
    except (OSError, IndexError):
        return ""
    m = _L4T.match(first.strip())
    return f"R{m.group(1)}.{m.group(2)}" if m else " ".join(first.split())[:120]


def plan_refusal(path: Path) -> str:
    """Why TensorRT refuses to deserialize the plan at ``path``; "" when it loads.

    A matching key and sha256 say the bytes are the ones written, not that this TensorRT
    will load them (a driver update, a plan written by a build that crashed in TensorRT):
    only deserializing does. The engine is dropped at once; nothing runs.
    """
    import tensorrt as trt

    try:
        data = path.read_bytes()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # noqa: BLE001 - OSError, or TensorRT's RuntimeError/TypeError
        return _first_line(exc)
    if engine is None:
        return "TensorRT could not deserialize it"
    del engine, runtime
    return ""
