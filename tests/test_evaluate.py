"""Parts of osteofy evaluate that need no PyTorch (the shipped packages at most)."""

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


def test_an_image_only_baseline_reads_the_images_at_its_own_input_size(tmp_path) -> None:
    # A model at 256 px evaluated beside a 320 px baseline: the baseline is not fed 256 px images.
    from dataclasses import replace
    from pathlib import Path

    from cohort.generate import SimulateOptions, simulate
    from edge.package import load_package
    from model.data import load_folder
    from model.evaluate import image_only_scores, run_package
    from osteofy.errors import UsageError

    models = Path(__file__).resolve().parent.parent / "models"
    opts = SimulateOptions(max_side=512, workers=1, counterfactual=False, compression="none")
    simulate(tmp_path, "hand", 4, 9, options=opts, progress=False)
    base = load_package(models / "hand-image-only-v1")
    hand = load_package(models / "hand-v1")
    small = replace(hand, preprocess=replace(hand.preprocess, size=256))
    ds = load_folder(tmp_path, small.preprocess, site="hand", progress=False)
    assert ds.images.shape[1:] == (256, 256)
    got = image_only_scores(base, small, ds, tmp_path)
    own = load_folder(tmp_path, base.preprocess, site="hand", progress=False)
    np.testing.assert_allclose(got, run_package(base, own).probs[:, 2], rtol=1e-6)
    with pytest.raises(UsageError, match="not a hip model"):
        image_only_scores(base, load_package(models / "hip-v2"), ds, tmp_path)
