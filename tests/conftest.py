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
