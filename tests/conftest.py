"""Shared fixtures. Every cohort used here is synthetic and small."""

from __future__ import annotations

import os

import cv2
import pytest

# Deterministic single-threaded OpenCV in tests (the machine has 2 cores; CI too).
cv2.setNumThreads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_hand_cohort(tmp_path_factory: pytest.TempPathFactory):
    """Six rendered hand radiographs at reduced size (max side 384 px), with masks."""
    from cohort.generate import SimulateOptions, simulate

    out = tmp_path_factory.mktemp("hand_cohort")
    simulate(out, "hand", 6, 11, options=SimulateOptions(max_side=384, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def device_scans(tmp_path_factory: pytest.TempPathFactory):
    """Three hand and two hip radiographs at the reference models' resolution (1024 px)."""
    from cohort.generate import SimulateOptions, simulate

    out = tmp_path_factory.mktemp("device_scans")
    opts = SimulateOptions(max_side=1024, workers=1, counterfactual=False, compression="none")
    simulate(out / "hand", "hand", 3, 21, options=opts, progress=False)
    simulate(out / "hip", "hip", 2, 22, options=opts, progress=False)
    return sorted((out / "hand").glob("*.dcm")) + sorted((out / "hip").glob("*.dcm"))


@pytest.fixture()
def device_config(tmp_path):
    """A configuration for a device whose data lives in ``tmp_path`` (reference models)."""
    from pathlib import Path

    from osteofy.config import Config

    models = Path(__file__).parent.parent / "models"
    return Config(data_dir=tmp_path / "var", models_dir=models, precision="fp32", mqtt={"url": ""})
