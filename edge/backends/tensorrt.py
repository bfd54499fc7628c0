"""TensorRT backend (Jetson / NVIDIA GPU): a cached engine run with pycuda.

Two layers, so that everything but the GPU calls can be tested on any machine:

* pure logic — ``ExpectedIO`` (what the model card promises), ``TensorDesc`` (what the engine
  says about each I/O tensor) and ``plan_bindings``, which checks the two against each other
  BY NAME and computes each tensor's shape and byte size for a batch. A mismatch (an engine
  built for another input size, a missing output, float16 I/O) is a clear ``Unavailable``
  before any memory is allocated;
* ``TensorRTBackend`` — deserializes the engine, makes ONE execution context and ONE CUDA
  stream, allocates pinned host and device buffers once for the engine's maximum batch, and
  per call does async H2D copies, ``execute_async_v3``, async D2H copies and one synchronize.

tensorrt and pycuda are imported only inside the constructor (STYLE.md, habit 2). The
TensorRT 10 API is used throughout: named I/O tensors (``num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode``, ``set_input_shape``, ``set_tensor_address``); the binding-index API of
TensorRT 8 is gone.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.backends import INPUTS, OUTPUTS
from edge.engines import (
    DeviceInfo,
    check_precision,
    find_engine,
    key_for,
    probe_device,
)
from edge.package import ModelPackage
from osteofy.errors import Unavailable

log = logging.getLogger(__name__)

DYNAMIC = -1
REBUILD = "rebuild it with `osteofy build-engine MODEL_DIR --force`"


@dataclass(frozen=True)
class ExpectedIO:
    """The I/O contract of a model package (DESIGN.md, "ONNX inputs/outputs"), from its card."""

    image_size: int
    clinical_width: int
    n_classes: int = 3
    outputs: tuple[str, ...] = OUTPUTS

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> ExpectedIO:
        try:
            c, h, w = (int(v) for v in card["input"]["image"])
            f = int(card["input"]["clinical"])
        except (KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"model card has no usable input shapes ({exc})") from None
        if c != 1 or h != w:
            raise Unavailable(f"model card input image {[c, h, w]} is not [1, S, S]")
        missing = [o for o in OUTPUTS if o not in card.get("outputs", OUTPUTS)]
        if missing:
            raise Unavailable(f"model card lacks the outputs {missing}")
        return cls(h, f, len(card.get("classes", ())) or 3, OUTPUTS)

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every tensor (no batch dimension); -1 where the card is silent."""
        k, f, s = self.n_classes, self.clinical_width, self.image_size
        known = {
            "image": (1, s, s),
            "clinical": (f,),
            "probs": (k,),
            "tscore": (1,),
            "cam": (k, DYNAMIC, DYNAMIC),  # feature resolution h, w is not in the card
            "clinical_attr": (k, f),
            "ood": (1,),
        }
        return {n: known.get(n, ()) for n in (*INPUTS, *self.outputs)}


@dataclass(frozen=True)
class TensorDesc:
    """One engine I/O tensor as TensorRT reports it (-1 for a dynamic dimension)."""

    name: str
    is_input: bool
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]
    max_shape: tuple[int, ...] | None = None  # inputs: optimization profile 0's maximum


@dataclass(frozen=True)
class BindingPlan:
    """Per-tensor sample shapes and dtypes, checked against the card, for batches ≤ max_batch."""

    max_batch: int
    sample_shapes: Mapping[str, tuple[int, ...]]  # by tensor name, without the batch dim
    dtypes: Mapping[str, str]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]  # every engine output (each needs an address), expected ones first

    def shape(self, name: str, batch: int) -> tuple[int, ...]:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} outside 1..{self.max_batch}")
        dims = self.sample_shapes[name]
        if any(d < 0 for d in dims):
            raise ValueError(f"shape of {name!r} is not resolved yet: {dims}")
        return (batch, *dims)

    def nbytes(self, name: str, batch: int) -> int:
        return math.prod(self.shape(name, batch)) * np.dtype(self.dtypes[name]).itemsize

    def with_output_shapes(self, shapes: Mapping[str, Sequence[int]]) -> BindingPlan:
        """Fill dynamic output dims from the shapes the context reports at ``max_batch``."""
        resolved = dict(self.sample_shapes)
        for name in self.outputs:
            got = tuple(int(d) for d in shapes[name])
            want = self.sample_shapes[name]
            if len(got) != len(want) + 1 or any(d < 0 for d in got):
                raise Unavailable(f"TensorRT engine output {name!r} has unresolved shape {got}")
            if got[0] != self.max_batch:
                raise Unavailable(
                    f"TensorRT engine output {name!r} has batch {got[0]} for "
                    f"{self.max_batch} inputs"
                )
            if not _compatible(got[1:], want):
                raise Unavailable(f"TensorRT engine output {name!r} is {list(got)}; {REBUILD}")
            resolved[name] = got[1:]
        return BindingPlan(self.max_batch, resolved, self.dtypes, self.inputs, self.outputs)


def _compatible(engine: Sequence[int], expected: Sequence[int]) -> bool:
    return len(engine) == len(expected) and all(
        DYNAMIC in (e, x) or e == x for e, x in zip(engine, expected, strict=True)
    )


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join("N" if i == 0 else str(d) for i, d in enumerate(shape)) + "]"


def plan_bindings(tensors: Sequence[TensorDesc], expected: ExpectedIO) -> BindingPlan:
    """Check the engine's I/O tensors against the card, by name; plan shapes and dtypes.

    Raises ``Unavailable`` with one line naming the first mismatch.
    """
    by_name = {t.name: t for t in tensors}
    want = expected.sample_shapes()
    for name in (*INPUTS, *expected.outputs):
        t = by_name.get(name)
        role = "input" if name in INPUTS else "output"
        if t is None:
            have = ", ".join(sorted(by_name)) or "none"
            raise Unavailable(f"TensorRT engine has no {role} {name!r} (it has: {have}); {REBUILD}")
        if t.is_input != (role == "input"):
            raise Unavailable(f"TensorRT engine tensor {name!r} is not an {role}; {REBUILD}")
        if t.dtype != "float32":
            raise Unavailable(
                f"TensorRT engine {role} {name!r} is {t.dtype}, expected float32; {REBUILD}"
            )
        engine_dims = t.max_shape if (t.is_input and t.max_shape) else t.shape
        if len(t.shape) != len(want[name]) + 1 or not _compatible(engine_dims[1:], want[name]):
            raise Unavailable(
                f"TensorRT engine {role} {name!r} is {_fmt(t.shape)} but the model card wants "
                f"{_fmt((DYNAMIC, *want[name]))} (built for another model?); {REBUILD}"
            )
    extra_inputs = [t.name for t in tensors if t.is_input and t.name not in INPUTS]
    if extra_inputs:
        raise Unavailable(f"TensorRT engine wants inputs {extra_inputs} the model card lacks")
    for t in tensors:  # extra outputs still need a buffer, hence a numpy dtype
        try:
            np.dtype(t.dtype)
        except TypeError:
            raise Unavailable(f"TensorRT engine output {t.name!r} has type {t.dtype}") from None
    max_batch = min(_max_batch(by_name[n]) for n in INPUTS)
    samples: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        dims = (t.max_shape if (t.is_input and t.max_shape) else t.shape)[1:]
        if t.name in want:  # fill what the engine leaves dynamic from the card
            dims = tuple(e if e != DYNAMIC else x for e, x in zip(dims, want[t.name], strict=True))
        samples[t.name] = tuple(dims)
    outputs = tuple(expected.outputs) + tuple(
        t.name for t in tensors if not t.is_input and t.name not in expected.outputs
    )
    return BindingPlan(
        max_batch=max_batch,
        sample_shapes=samples,
        dtypes={t.name: t.dtype for t in tensors},
        inputs=INPUTS,
        outputs=outputs,
    )


def _max_batch(t: TensorDesc) -> int:
    dims = t.max_shape if t.max_shape else t.shape
    if not dims or dims[0] < 1:
        raise Unavailable(f"TensorRT engine input {t.name!r} has no maximum batch; {REBUILD}")
    return int(dims[0])


def batch_slices(n: int, max_batch: int) -> list[slice]:
    """Split ``n`` samples into runs of at most ``max_batch`` (the engine's profile maximum)."""
    if n < 1 or max_batch < 1:
        raise ValueError(f"cannot split {n} samples into batches of {max_batch}")
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def check_inputs(image: NDArray, clinical: NDArray, expected: ExpectedIO) -> int:
    """The batch size of a well-formed (image, clinical) pair; ValueError otherwise."""
    s, f = expected.image_size, expected.clinical_width
    if image.ndim != 4 or image.shape[1:] != (1, s, s):
        raise ValueError(f"image must be [N, 1, {s}, {s}], got {list(image.shape)}")
    if clinical.ndim != 2 or clinical.shape[1] != f:
        raise ValueError(f"clinical must be [N, {f}], got {list(clinical.shape)}")
    if image.shape[0] != clinical.shape[0] or image.shape[0] < 1:
        raise ValueError(
            f"batch sizes differ: image {image.shape[0]}, clinical {clinical.shape[0]}"
        )
    return int(image.shape[0])


def describe_engine(engine: Any) -> list[TensorDesc]:
    """The I/O tensors of a deserialized ``tensorrt.ICudaEngine`` (TensorRT 10 named API)."""
    import tensorrt as trt

    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        except TypeError:  # BF16/FP8/INT4 have no numpy type: report the TensorRT name
            dtype = str(engine.get_tensor_dtype(name))
        max_shape = None
        if is_input and engine.num_optimization_profiles > 0:
            max_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[2])
        out.append(
            TensorDesc(
                name=name,
                is_input=is_input,
                dtype=dtype,
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                max_shape=max_shape,
            )
        )
    return out


class TensorRTBackend:
    """Runs a cached TensorRT engine; outputs bound by name, buffers allocated once."""

    name = "tensorrt"

    def __init__(
        self, engine_path: Path, expected: ExpectedIO | Mapping[str, Any], precision: str
    ) -> None:
        self.device = probe_device()  # one-line Unavailable if TensorRT, pycuda or a GPU is missing
        import pycuda.driver as cuda
        import tensorrt as trt

        self.precision = check_precision(precision)
        self.engine_path = Path(engine_path)
        if not isinstance(expected, ExpectedIO):
            expected = ExpectedIO.from_card(expected)
        self.expected = expected
        self._cuda = cuda
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._device: dict[str, Any] = {}
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        try:
            cuda.init()
            # The primary context is the one the CUDA runtime (and so TensorRT) uses; retaining
            # it and pushing it around each call keeps pycuda and TensorRT on one context, from
            # any thread (pycuda.autoprimaryctx does the same for scripts).
            self._ctx = cuda.Device(0).retain_primary_context()
            self._ctx.push()
            try:
                self._setup(trt, cuda)
            finally:
                cuda.Context.pop()
        except Unavailable:
            self.close()
            raise
        except Exception as exc:  # pycuda.driver.Error (MemoryError, LogicError...), TensorRT's
            self.close()
            raise Unavailable(
                f"TensorRT/CUDA failed loading {self.engine_path.name} ({_first_line(exc)})"
            ) from None

    def _setup(self, trt: Any, cuda: Any) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            data = self.engine_path.read_bytes()
        except OSError as exc:
            raise Unavailable(f"cannot read TensorRT engine {self.engine_path} ({exc})") from None
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise Unavailable(
                f"TensorRT could not load {self.engine_path.name} (another TensorRT version "
                f"or GPU?); {REBUILD}"
            )
        try:
            plan = plan_bindings(describe_engine(self._engine), self.expected)
        except Unavailable as exc:
            raise Unavailable(f"{self.engine_path.name}: {exc}") from None
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise Unavailable(f"TensorRT could not make an execution context ({self.engine_path})")
        for name in plan.inputs:
            if not self._context.set_input_shape(name, plan.shape(name, plan.max_batch)):
                raise Unavailable(f"{self.engine_path.name}: {name!r} rejects the maximum batch")
        self.plan = plan.with_output_shapes(
            {n: tuple(self._context.get_tensor_shape(n)) for n in plan.outputs}
        )
        self._stream = cuda.Stream()
        self._host: dict[str, NDArray] = {}
        for name in (*self.plan.inputs, *self.plan.outputs):
            count = math.prod(self.plan.shape(name, self.plan.max_batch))
            self._host[name] = cuda.pagelocked_empty(count, np.dtype(self.plan.dtypes[name]))
            self._device[name] = cuda.mem_alloc(self.plan.nbytes(name, self.plan.max_batch))
            # Addresses never change (buffers are allocated once), so bind them once, by name.
            if not self._context.set_tensor_address(name, int(self._device[name])):
                raise Unavailable(f"{self.engine_path.name}: cannot bind tensor {name!r}")
        log.info(
            "TensorRT engine %s (%s, max batch %d) loaded",
            self.engine_path.name,
            self.precision,
            self.plan.max_batch,
        )

    def run(self, image: NDArray, clinical: NDArray) -> dict[str, NDArray]:
        n = check_inputs(image, clinical, self.expected)
        feeds = {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "clinical": np.ascontiguousarray(clinical, dtype=np.float32),
        }
        parts: dict[str, list[NDArray]] = {name: [] for name in self.expected.outputs}
        with self._lock:
            if self._context is None:
                raise Unavailable(f"TensorRT engine {self.engine_path.name} is closed")
            try:
                self._ctx.push()
                try:
                    for sl in batch_slices(n, self.plan.max_batch):
                        chunk = {k: v[sl] for k, v in feeds.items()}
                        out = self._run_chunk(chunk, sl.stop - sl.start)
                        for name in parts:
                            parts[name].append(out[name])
                finally:
                    self._cuda.Context.pop()
            except Unavailable:
                raise
            except Exception as exc:  # a CUDA error (out of memory, illegal address...)
                raise Unavailable(
                    f"TensorRT/CUDA failed running {self.engine_path.name} ({_first_line(exc)})"
                ) from None
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def _run_chunk(self, feeds: Mapping[str, NDArray], b: int) -> dict[str, NDArray]:
        cuda, ctx, stream, plan = self._cuda, self._context, self._stream, self.plan
        for name in plan.inputs:
            count = math.prod(plan.shape(name, b))
            host = self._host[name][:count]
            np.copyto(host, feeds[name].reshape(-1))
            if not ctx.set_input_shape(name, plan.shape(name, b)):
                raise Unavailable(f"TensorRT engine rejects input {name!r} of batch {b}")
            cuda.memcpy_htod_async(self._device[name], host, stream)
        if not ctx.execute_async_v3(stream_handle=stream.handle):
            raise Unavailable(f"TensorRT execution failed ({self.engine_path.name})")
        views = {}
        for name in plan.outputs:
            views[name] = self._host[name][: math.prod(plan.shape(name, b))]
            cuda.memcpy_dtoh_async(views[name], self._device[name], stream)
        stream.synchronize()
        return {n: views[n].reshape(plan.shape(n, b)).copy() for n in self.expected.outputs}

    def close(self) -> None:
        """Free device buffers, context, engine and runtime, then release the primary context.

        TensorRT 10's Python objects are destroyed when dropped (``destroy()`` is gone), so
        dropping them in order — context before engine before runtime — inside the pushed CUDA
        context is the release. Safe to call twice and after a failed construction.
        """
        with self._lock:
            if self._ctx is None:
                return
            try:
                self._ctx.push()
                try:
                    for buf in self._device.values():
                        buf.free()
                finally:
                    self._device = {}
                    self._context = None
                    self._engine = None
                    self._runtime = None
                    self._cuda.Context.pop()
                self._ctx.detach()
            except Exception as exc:  # noqa: BLE001 - a broken context cannot be freed further
                log.warning("TensorRT: releasing %s: %s", self.engine_path.name, _first_line(exc))
            finally:
                self._ctx = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def backend_for_package(
    pkg: ModelPackage, cache_dir: Path, precision: str, device: DeviceInfo | None = None
) -> TensorRTBackend:
    """The TensorRT backend for ``pkg`` from the engine cache; never builds, never downgrades.

    ``Unavailable`` when TensorRT/GPU is absent or no engine was built for this device, model
    and precision — the caller decides (visibly) whether to use ONNX Runtime instead.
    """
    check_precision(precision)
    dev = device or probe_device()
    key = key_for(pkg, dev, precision)
    path = find_engine(cache_dir, key)
    if path is None:
        flag = " --precision fp16" if precision == "fp16" else ""
        raise Unavailable(
            f"no TensorRT engine built for {pkg.name} ({precision}) on {dev.gpu_name} with "
            f"TensorRT {dev.tensorrt_version} in {cache_dir}: run `osteofy build-engine "
            f"{pkg.path}{flag} --cache {cache_dir}`"
        )
    return TensorRTBackend(path, ExpectedIO.from_card(pkg.card), precision)
