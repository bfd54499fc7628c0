"""Latency of backends measured side by side, in one process, interleaved.

Single timings vary by about ±30 % between processes on a shared machine (PROBES.md), so
alternatives are only ever compared within one run, alternating A, B, A, B… so that a slow
moment of the machine hurts both alike. Used by ``osteofy quantize`` (FP32 vs INT8) and by
``precision: auto`` on the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edge.backends import Backend


def interleaved(
    backends: Mapping[str, Backend],
    image: NDArray,
    clinical: NDArray,
    runs: int = 30,
    warmup: int = 3,
    budget_s: float = 10.0,
) -> dict[str, dict[str, float]]:
    """p50/p95 milliseconds of ``run`` per backend; stops early when ``budget_s`` is spent."""
    for b in backends.values():
        for _ in range(warmup):
            b.run(image, clinical)
    times: dict[str, list[float]] = {k: [] for k in backends}
    names = list(backends)
    deadline = time.monotonic() + budget_s
    for i in range(runs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            backends[name].run(image, clinical)
            times[name].append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() > deadline and i >= 4:
            break
    return {
        k: {
            "p50_ms": round(float(np.percentile(v, 50)), 3),
            "p95_ms": round(float(np.percentile(v, 95)), 3),
            "runs": len(v),
        }
        for k, v in times.items()
    }


def cpu_name() -> str:
    """The CPU's model name (x86 ``model name``, Arm ``Model``/``Hardware``), else the
    architecture: a latency figure means little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
