"""Calibration and held-out inputs, made by THE preprocessing function.

Calibration must see exactly what the device will feed the model, so the images go through
``edge.preprocess`` (via ``model.data.load_folder``, which caches the 8-bit squares) and the
clinical vectors through ``edge.clinical``. Calibration images are never the held-out images
the fidelity gates are measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationDataReader

from edge.clinical import all_missing, clinical_vector
from edge.package import ModelPackage
from edge.preprocess import normalise
from model.data import load_folder
from osteofy.errors import UsageError

MIN_CALIBRATION = 500


@dataclass(frozen=True)
class Inputs:
    """Model inputs for a set of images, with labels when the folder has them."""

    image: NDArray  # float32 [N,1,S,S]
    clinical: NDArray  # float32 [N,F]
    labels: NDArray  # int64 [N]
    tscore: NDArray  # float32 [N], NaN where unknown
    folder: Path

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def take(self, idx: NDArray) -> Inputs:
        return Inputs(
            self.image[idx], self.clinical[idx], self.labels[idx], self.tscore[idx], self.folder
        )


def load_inputs(pkg: ModelPackage, folder: Path, progress: bool = True) -> Inputs:
    ds = load_folder(folder, pkg.preprocess, site=pkg.card["sites"][0], progress=progress)
    clinical = np.stack([clinical_vector(f, pkg.clinical) for f in ds.facts]).astype(np.float32)
    if not pkg.card.get("clinical_inputs", True):
        clinical = all_missing(clinical)
    return Inputs(normalise(ds.images, pkg.preprocess), clinical, ds.labels, ds.tscore, folder)


def split_calibration(
    calib: Inputs, heldout: Inputs | None, min_calibration: int = MIN_CALIBRATION, seed: int = 0
) -> tuple[Inputs, Inputs]:
    """(calibration, held-out). Without a held-out folder, a third of ``calib`` is held out."""
    if heldout is None:
        idx = np.random.default_rng(seed).permutation(len(calib))
        n_hold = len(calib) // 3
        heldout, calib = calib.take(idx[:n_hold]), calib.take(idx[n_hold:])
    if len(calib) - len(calib) % 16 < min_calibration:  # calibration runs in batches of 16
        raise UsageError(
            f"quantize: {len(calib)} calibration images; at least {min_calibration} are needed "
            "(give a larger --calib folder, or a separate --heldout folder)"
        )
    return calib, heldout


class Reader(CalibrationDataReader):
    """Feeds ONNX Runtime's calibrator in batches; ``set_range`` lets it stream in strides."""

    def __init__(self, inputs: Inputs, batch: int = 16) -> None:
        self.inputs = inputs
        self.batch = batch
        self.set_range(0, len(inputs))

    def set_range(self, start_index: int, end_index: int) -> None:
        self._starts = iter(range(start_index, min(end_index, len(self.inputs)), self.batch))
        self._end = min(end_index, len(self.inputs))

    def get_next(self) -> dict[str, NDArray] | None:
        a = next(self._starts, None)
        if a is None:
            return None
        b = min(a + self.batch, self._end)
        return {"image": self.inputs.image[a:b], "clinical": self.inputs.clinical[a:b]}

    def __len__(self) -> int:
        return len(self.inputs)
