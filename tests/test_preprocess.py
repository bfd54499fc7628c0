"""THE preprocessing function: properties that training and the device both rely on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.preprocess import (
    PREPROCESS_VERSION,
    PreprocessConfig,
    RawImage,
    map_to_input,
    normalise,
    preprocess,
    preprocess_to_uint8,
)
from osteofy.errors import InputRejected

CFG = PreprocessConfig(size=64, work_side=128)


def _phantom(h: int = 200, w: int = 150, bits: int = 12) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((h, w), 200, np.float32)
    img[40:180, 30:120] = 1500  # body
    img[60:170, 60:80] = 3000  # bone
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, (1 << bits) - 1).astype(np.uint16)


@settings(max_examples=40, deadline=None)
@given(
    arrays(
        np.uint16,
        st.tuples(st.integers(8, 300), st.integers(8, 300)),
        elements=st.integers(0, 4095),
    ),
    st.sampled_from(["MONOCHROME1", "MONOCHROME2"]),
)
def test_any_image_gives_a_finite_square_input_or_a_clear_rejection(
    px: np.ndarray, pm: str
) -> None:
    try:
        x, geom = preprocess(RawImage(pixels=px, photometric=pm), CFG)
    except InputRejected as exc:
        assert "contrast" in str(exc)
        return
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    assert np.isfinite(x).all()
    r0, r1, c0, c1 = geom.input_box()
    assert 0 <= r0 < r1 <= 64 and 0 <= c0 < c1 <= 64


def test_monochrome1_is_inverted_so_bone_is_bright_either_way() -> None:
    px = _phantom()
    top = 4095
    a, _ = preprocess_to_uint8(RawImage(px, "MONOCHROME2", window=(1600, 3200)), CFG)
    b, _ = preprocess_to_uint8(
        RawImage((top - px).astype(np.uint16), "MONOCHROME1", window=(top - 1600, 3200)), CFG
    )
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0


def test_window_and_equivalent_voi_lut_agree() -> None:
    px = _phantom()
    c, w = 1600.0, 3200.0
    lut = np.clip((np.arange(4096) - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 65535
    a, _ = preprocess_to_uint8(RawImage(px, window=(c, w)), CFG)
    b, _ = preprocess_to_uint8(RawImage(px, voi_lut=(0, lut.astype(np.float32))), CFG)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_missing_window_falls_back_to_a_robust_window() -> None:
    sq, _ = preprocess_to_uint8(RawImage(_phantom()), CFG)
    assert sq.max() > 200 and sq.std() > 20


def test_body_crop_cuts_the_empty_plate_and_a_distant_marker() -> None:
    px = _phantom(400, 400)
    px[5:15, 380:395] = 4000  # a small bright marker far from the body
    _, geom = preprocess_to_uint8(RawImage(px, window=(2000, 4000)), PreprocessConfig(size=64))
    r0, r1, c0, c1 = geom.crop
    assert r0 > 20 and c1 < 380  # the marker is outside the crop


def test_flat_image_is_rejected_with_a_reason() -> None:
    with pytest.raises(InputRejected, match="no contrast"):
        preprocess(RawImage(np.full((50, 50), 7, np.uint16)), CFG)


def test_mask_maps_into_the_input_where_the_content_is() -> None:
    px = _phantom()
    _, geom = preprocess_to_uint8(RawImage(px, window=(1600, 3200)), CFG)
    mask = np.zeros(px.shape, bool)
    mask[60:170, 60:80] = True
    m = map_to_input(mask, geom, nearest=True)
    assert m.shape == (64, 64) and m.sum() > 0
    r0, r1, c0, c1 = geom.input_box()
    assert m[:r0].sum() == 0 and m[r1:].sum() == 0


def test_card_round_trip_and_version_check() -> None:
    card = CFG.to_card()
    assert PreprocessConfig.from_card(card) == CFG
    with pytest.raises(InputRejected, match="preprocessing"):
        PreprocessConfig.from_card({**card, "version": "osteofy-pre-0"})
    assert card["version"] == PREPROCESS_VERSION


def test_normalise_batches_and_single_images() -> None:
    one = normalise(np.zeros((64, 64), np.uint8), CFG)
    many = normalise(np.zeros((3, 64, 64), np.uint8), CFG)
    assert one.shape == (1, 64, 64) and many.shape == (3, 1, 64, 64)
