"""Inference backends: one small interface, a registry, and lazy imports.

A backend turns a preprocessed ``image`` [N,1,S,S] and ``clinical`` [N,F] into the five named
outputs of DESIGN.md ("ONNX outputs"). Each backend lives in its own module and imports its
heavy library only when constructed, so choosing ONNX Runtime never imports TensorRT and the
other way round (STYLE.md, habit 2).
"""

from __future__ import annotations

import importlib
from typing import Protocol

from numpy.typing import NDArray

OUTPUTS = ("probs", "tscore", "cam", "clinical_attr", "ood")
INPUTS = ("image", "clinical")

# name -> "module:Class"; modules are imported only when that backend is chosen.
REGISTRY = {
    "onnxruntime": "edge.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "edge.backends.tensorrt:TensorRTBackend",
}


class Backend(Protocol):
    """What the runtime needs from an inference engine."""

    name: str
    precision: str  # "fp32" | "int8" | "fp16": what actually runs

    def run(self, image: NDArray, clinical: NDArray) -> dict[str, NDArray]:
        """The outputs of one forward pass, by name (``OUTPUTS``).

        Raises ``Unavailable`` when the engine itself fails (a CUDA error, say), so that the
        caller can fall back visibly; ``ValueError`` for malformed inputs.
        """
        ...

    def close(self) -> None:
        """Release what the backend holds (sessions, GPU memory); safe to call twice."""
        ...


def backend_class(name: str) -> type:
    """The backend class registered under ``name`` (imports its module, not its library)."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (one of {', '.join(REGISTRY)})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
