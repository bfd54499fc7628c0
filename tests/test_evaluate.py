"""Measures of osteofy evaluate that need no trained model (and no PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluate import cam_shares


def test_cam_shares_are_relative_to_the_image_content_like_the_area_share() -> None:
    size = 40
    content = np.zeros((size, size), dtype=bool)
    content[10:30, :] = True  # a letterboxed image: rows 0-9 and 30-39 are padding
    signal = np.zeros_like(content)
    signal[10:20, :] = True  # half the content
    nuisance = np.zeros_like(content)
    nuisance[25:30, :5] = True
    area_share = signal.sum() / content.sum()
    # A uniform map, padding included, is no better than chance: exactly the area share.
    uniform = np.ones((size, size))
    assert cam_shares(uniform, content, signal, nuisance) == pytest.approx(
        (area_share, nuisance.sum() / content.sum())
    )
    # Heat on the signal only scores 1; heat on the padding only is no evidence at all.
    assert cam_shares(signal.astype(float), content, signal, nuisance) == (1.0, 0.0)
    padding_only = (~content).astype(float)
    assert cam_shares(padding_only, content, signal, nuisance) is None
