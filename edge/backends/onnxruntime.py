"""ONNX Runtime backend (CPU): the default everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge.backends import OUTPUTS
from osteofy.errors import Unavailable

BATCH_DIM = "N"  # the export's name for the batch dimension (model/export.py)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        threads: int | None = None,
        precision: str = "fp32",
        batch: int | None = None,
    ) -> None:
        """``batch`` fixes the graph's batch dimension ``N`` (DESIGN.md, "ONNX inputs").

        The device screens one study at a time (``batch=1``): with ``N`` known, ONNX
        Runtime folds the shape arithmetic of the in-graph Grad-CAM at load time instead of
        running it as a dozen tiny kernels on every study (156 -> 145 kernels per run; the
        outputs are identical). Evaluation and quantization run batches and leave it free.
        """
        import onnxruntime as ort

        self.threads, self.batch = threads, batch
        self.precision = precision
        self.model_path = Path(model_path)
        self.session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(threads, batch),
            providers=["CPUExecutionProvider"],
        )

    def run(self, image: NDArray, clinical: NDArray) -> dict[str, NDArray]:
        if self.session is None:
            raise Unavailable(f"ONNX Runtime session of {self.model_path.name} is closed")
        out = self.session.run(
            list(OUTPUTS),
            {
                "image": np.ascontiguousarray(image, dtype=np.float32),
                "clinical": np.ascontiguousarray(clinical, dtype=np.float32),
            },
        )
        return dict(zip(OUTPUTS, out, strict=True))

    def close(self) -> None:
        """ONNX Runtime frees a session when it is dropped; nothing else is held."""
        self.session = None


def session_options(threads: int | None = None, batch: int | None = None) -> Any:
    """The device's ONNX Runtime session options (also used by ``osteofy bench``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads that spin after a run take the CPU from decoding and rendering, which share
    # the device's few cores with inference (measured under load: 17.5 -> 14.9 ms).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if batch is not None:
        opts.add_free_dimension_override_by_name(BATCH_DIM, int(batch))
    return opts
