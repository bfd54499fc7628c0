"""Stand-ins for ``tensorrt`` and ``pycuda.driver``, to test everything around the GPU calls.

They model just enough of the TensorRT 10 Python API (named I/O tensors, ``Runtime``,
``execute_async_v3``) and of pycuda (primary context, pinned memory, device allocations) for
``probe_device``, ``TensorRTBackend`` and ``quantize.engine`` to run their own logic, with
failures injected where a real device fails: out of memory, a broken context, an old version.

They NEVER compute a result: ``execute_async_v3`` always raises, so no test can mistake a
fake for a TensorRT answer. Install them with ``install(monkeypatch, ...)``.
"""

from __future__ import annotations

import enum
import itertools
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

PLAN = b"fake-plan-v1"  # the only bytes the fake Runtime deserializes

IO = {  # hand-v1's engine: dynamic batch 1..4
    "image": (True, (-1, 1, 320, 320), (4, 1, 320, 320)),
    "clinical": (True, (-1, 26), (4, 26)),
    "probs": (False, (-1, 3), None),
    "tscore": (False, (-1, 1), None),
    "cam": (False, (-1, 3, 10, 10), None),
    "clinical_attr": (False, (-1, 3, 26), None),
    "ood": (False, (-1, 1), None),
}


class CudaError(RuntimeError):
    """What pycuda raises (``pycuda.driver.Error`` and its MemoryError/LogicError...)."""


@dataclass
class Faults:
    """Where the fakes fail, and what they recorded."""

    version: str = "10.3.0.30"
    driver_version: int = 12060  # cuDriverGetVersion: 12.6
    gpu_name: str = "Orin"
    cc: tuple[int, int] = (8, 7)
    mem_alloc: str | None = None  # message of a CudaError raised by mem_alloc
    execute: str = "cudaErrorIllegalAddress: an illegal memory access was encountered"
    allocations: list = field(default_factory=list)
    freed: list = field(default_factory=list)
    detached: list = field(default_factory=list)
    deserialized: list = field(default_factory=list)


class _Mode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class _Engine:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.names = list(IO)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = 1

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> _Mode:
        return _Mode.INPUT if IO[name][0] else _Mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return IO[name][1]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        mx = IO[name][2]
        assert mx is not None
        return ((1, *mx[1:]), (1, *mx[1:]), mx)

    def create_execution_context(self) -> _Context:
        return _Context(self.faults)


class _Context:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.batch = 1

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.batch, *IO[name][1][1:])

    def set_tensor_address(self, name: str, address: int) -> bool:
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        raise CudaError(self.faults.execute)


def tensorrt_module(faults: Faults) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = faults.version  # type: ignore[attr-defined]
    trt.TensorIOMode = _Mode  # type: ignore[attr-defined]
    trt.nptype = lambda dtype: np.float32  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class Runtime:
        def __init__(self, logger: object) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            faults.deserialized.append(bytes(data))
            return _Engine(faults) if bytes(data) == PLAN else None

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Runtime = Runtime  # type: ignore[attr-defined]
    return trt


def pycuda_driver(faults: Faults) -> types.ModuleType:
    cuda = types.ModuleType("pycuda.driver")
    counter = itertools.count(0x1000, 0x1000)

    class Allocation:
        def __init__(self, nbytes: int) -> None:
            self.address = next(counter)
            faults.allocations.append(nbytes)

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            faults.freed.append(self.address)

    class PrimaryContext:
        def push(self) -> None:
            pass

        def detach(self) -> None:
            faults.detached.append(1)

    class Device:
        def __init__(self, index: int) -> None:
            self.index = index

        @staticmethod
        def count() -> int:
            return 1

        def compute_capability(self) -> tuple[int, int]:
            return faults.cc

        def name(self) -> str:
            return faults.gpu_name

        def retain_primary_context(self) -> PrimaryContext:
            return PrimaryContext()

    def mem_alloc(nbytes: int) -> Allocation:
        if faults.mem_alloc:
            raise CudaError(faults.mem_alloc)
        return Allocation(nbytes)

    class Stream:
        handle = 7

        def synchronize(self) -> None:
            pass

    def noop(*args: object, **kw: object) -> None:
        return None

    cuda.init = noop  # type: ignore[attr-defined]
    cuda.Device = Device  # type: ignore[attr-defined]
    cuda.Context = types.SimpleNamespace(pop=noop)  # type: ignore[attr-defined]
    cuda.Stream = Stream  # type: ignore[attr-defined]
    cuda.mem_alloc = mem_alloc  # type: ignore[attr-defined]
    cuda.pagelocked_empty = lambda n, dtype: np.empty(n, dtype)  # type: ignore[attr-defined]
    cuda.memcpy_htod_async = noop  # type: ignore[attr-defined]
    cuda.memcpy_dtoh_async = noop  # type: ignore[attr-defined]
    cuda.get_driver_version = lambda: faults.driver_version  # type: ignore[attr-defined]
    cuda.Error = CudaError  # type: ignore[attr-defined]
    return cuda


def install(monkeypatch: pytest.MonkeyPatch, faults: Faults | None = None) -> Faults:
    """Put the fakes in ``sys.modules`` for this test; returns their ``Faults``."""
    faults = faults or Faults()
    driver = pycuda_driver(faults)
    pkg = types.ModuleType("pycuda")
    pkg.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_module(faults))
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return faults
