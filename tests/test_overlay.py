"""Explanation rendering: heat lands on the right anatomy, the overlay stays within contract.

The geometry tests check the CAM -> display mapping against positions worked out by hand
and, independently, against ``map_to_input`` (the forward mapping preprocessing already
uses); the privacy tests check that a withheld image cannot leak through the overlay and
that the PNG carries no metadata chunks. Timing is measured in bench/overlay.py, not here.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.overlay import (
    HEAT_FLOOR,
    NOTICE,
    _caption_lines,
    _clean_cam,
    _layout,
    _on_image,
    _work_shape,
    cam_to_display,
    encode_jpeg,
    encode_png,
    peak_regions,
    render_overlay,
)
from edge.preprocess import (
    Geometry,
    PreprocessConfig,
    RawImage,
    display_work,
    map_to_input,
    preprocess_to_uint8,
)

PROBS = {"normal": 0.08, "osteopenia": 0.21, "osteoporosis": 0.71}

# Source 1000x800, worked at half size (500x400), body crop rows 50..450, cols 100..300
# (400x200 work px), letterboxed into a 64 px input: 64x32 content, 16 px padding each side.
HAND_GEOM = Geometry(
    source_shape=(1000, 800),
    work_scale=0.5,
    crop=(50, 450, 100, 300),
    scale=64 / 400,
    pad=(0, 16),
    size=64,
)


def _hot(r: int, c: int, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    cam = np.zeros(shape, np.float32)
    cam[r, c] = 1.0
    return cam


def _argmax(a: np.ndarray) -> tuple[int, int]:
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    return int(r), int(c)


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


# --------------------------------------------------------------------------- geometry


def test_a_hot_cell_lands_where_it_belongs_in_a_letterboxed_cropped_downscaled_image() -> None:
    # Cell (2, 3) of 8x8 over 64 px: centre (20, 28) in the input; content box starts at
    # column 16, 0.16 input px per work px -> work (50 + 20/0.16, 100 + 12/0.16) = (175, 175).
    heat = cam_to_display(_hot(2, 3), HAND_GEOM, (500, 400))
    assert heat.shape == (500, 400) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    r, c = _argmax(heat)
    assert abs(r - 174.5) <= 1 and abs(c - 174.5) <= 1  # pixel centre r + 0.5 ~ 175
    # Nothing outside the body crop.
    assert not heat[:50].any() and not heat[450:].any()
    assert not heat[:, :100].any() and not heat[:, 300:].any()


def test_a_display_larger_than_the_working_image_is_scaled_to() -> None:
    heat = cam_to_display(_hot(2, 3), HAND_GEOM, (1000, 800))
    r, c = _argmax(heat)
    assert abs(r - 349.5) <= 1 and abs(c - 349.5) <= 1


def test_heat_in_the_letterbox_padding_is_not_shown_as_heat_on_the_image() -> None:
    # Column 0 covers input columns 0..8, padding (content starts at 16, 1.5 cells from its
    # centre); only a faint interpolation tail may reach the image, below the threshold.
    col = 0
    heat = cam_to_display(_hot(4, col), HAND_GEOM, (500, 400))
    assert heat.max() < 0.5 * HEAT_FLOOR
    assert peak_regions(_hot(4, col), HAND_GEOM) == []
    # With a weaker on-image cell beside it, that cell is shown, relative to the padding.
    cam = _hot(4, col)
    cam[4, 4] = 0.5
    heat = cam_to_display(cam, HAND_GEOM, (500, 400))
    assert heat.max() == pytest.approx(0.5, abs=0.02)
    assert [p["weight"] for p in peak_regions(cam, HAND_GEOM)] == [1.0]


def test_peak_coordinates_are_normalised_to_the_source_image() -> None:
    (peak,) = peak_regions(_hot(2, 3), HAND_GEOM)
    assert peak == {"x": pytest.approx(175 / 400), "y": pytest.approx(175 / 500), "weight": 1.0}


def _synthetic_radiograph() -> np.ndarray:
    """A 900x1200 uint16 image with the body off-centre, so the crop is not trivial."""
    rng = np.random.default_rng(3)
    img = np.full((900, 1200), 300.0, np.float32)
    img[150:800, 500:1100] = 1800.0  # soft tissue
    img[250:750, 700:800] = 3200.0  # bone
    img += rng.normal(0.0, 30.0, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def test_geometry_from_preprocessing_maps_a_source_blob_back_onto_itself() -> None:
    cfg = PreprocessConfig(size=128, work_side=400)
    raw = RawImage(pixels=_synthetic_radiograph())
    display, work_scale = display_work(raw, cfg)
    _, geom = preprocess_to_uint8(raw, cfg)
    assert geom.crop != (0, display.shape[0], 0, display.shape[1])  # really cropped
    assert geom.pad != (0, 0)  # really letterboxed
    blob_rc = (420, 760)  # source pixels
    marker = np.zeros(geom.source_shape, np.float32)
    cv2.circle(marker, (blob_rc[1], blob_rc[0]), 40, 1.0, -1)
    # The forward path (preprocessing's own mapping), then pooled to a 16x16 "feature" grid.
    cam = cv2.resize(map_to_input(marker, geom), (16, 16), interpolation=cv2.INTER_AREA)

    heat = cam_to_display(cam, geom, display.shape)
    cell_work = (geom.size / 16) / geom.scale  # one feature cell in work pixels
    r, c = _argmax(heat)
    assert abs(r - blob_rc[0] * work_scale) <= cell_work
    assert abs(c - blob_rc[1] * work_scale) <= cell_work

    peak = peak_regions(cam, geom, k=1)[0]
    assert peak["weight"] == 1.0
    assert abs(peak["y"] - blob_rc[0] / 900) <= cell_work / display.shape[0]
    assert abs(peak["x"] - blob_rc[1] / 1200) <= cell_work / display.shape[1]


@pytest.mark.parametrize(
    "cam",
    [
        np.zeros((8, 8), np.float32),
        np.full((8, 8), 0.7, np.float32),  # flat: no localisation
        np.full((8, 8), -2.0, np.float32),  # only evidence against the class
        np.full((8, 8), np.nan, np.float32),
    ],
    ids=["zero", "flat", "negative", "nan"],
)
def test_a_cam_without_localisation_gives_a_zero_map_and_no_peaks(cam: np.ndarray) -> None:
    heat = cam_to_display(cam, HAND_GEOM, (500, 400))
    assert heat.shape == (500, 400) and not heat.any() and np.isfinite(heat).all()
    assert peak_regions(cam, HAND_GEOM) == []


@st.composite
def _geometries(draw: st.DrawFn) -> Geometry:
    """Geometries built the way preprocess_to_uint8 builds them."""
    h, w = draw(st.integers(20, 3000)), draw(st.integers(20, 3000))
    work_scale = min(1.0, draw(st.integers(64, 768)) / max(h, w))
    wh, ww = max(round(h * work_scale), 1), max(round(w * work_scale), 1)
    r0 = draw(st.integers(0, wh - 1))
    r1 = draw(st.integers(r0 + 1, wh))
    c0 = draw(st.integers(0, ww - 1))
    c1 = draw(st.integers(c0 + 1, ww))
    size = draw(st.sampled_from([32, 64, 320]))
    s = size / max(r1 - r0, c1 - c0)
    nh, nw = max(round((r1 - r0) * s), 1), max(round((c1 - c0) * s), 1)
    pad = ((size - nh) // 2, (size - nw) // 2)
    return Geometry((h, w), work_scale, (r0, r1, c0, c1), s, pad, size)


@settings(max_examples=60, deadline=None)
@given(
    _geometries(),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**32 - 1),
)
def test_any_geometry_gives_a_finite_map_and_peaks_inside_the_image(
    geom: Geometry, fh: int, fw: int, seed: int
) -> None:
    cam = np.random.default_rng(seed).normal(0.0, 1.0, (fh, fw)).astype(np.float32)
    h, w = geom.source_shape
    shape = (max(round(h * geom.work_scale), 1), max(round(w * geom.work_scale), 1))
    heat = cam_to_display(cam, geom, shape)
    assert heat.shape == shape and np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
    r0, r1, c0, c1 = geom.crop
    outside = heat.copy()
    outside[r0:r1, c0:c1] = 0.0
    assert not outside.any()
    peaks = peak_regions(cam, geom, k=3)
    assert len(peaks) <= 3
    weights = [p["weight"] for p in peaks]
    assert weights == sorted(weights, reverse=True)
    if peaks:
        assert weights[0] == 1.0
    for p in peaks:
        assert 0.0 <= p["x"] <= 1.0 and 0.0 <= p["y"] <= 1.0 and 0.0 < p["weight"] <= 1.0


def _reference_peaks(cam_hw: np.ndarray, geom: Geometry, k: int = 3) -> list[dict]:
    """peak_regions written plainly with whole-array masks (its first version)."""
    cam = _clean_cam(cam_hw)
    if cam is None or k <= 0:
        return []
    cam = np.where(_on_image(cam.shape, geom), np.maximum(cam, 0.0), np.float32(0.0))
    is_max = (cam >= cv2.dilate(cam, np.ones((3, 3), np.uint8))) & (cam > 0)
    rows, cols = np.nonzero(is_max)
    if rows.size == 0:
        return []
    order = np.argsort(-cam[rows, cols], kind="stable")
    top = float(cam[rows[order[0]], cols[order[0]]])
    fh, fw = cam.shape
    s = geom.size
    ir0, ir1, ic0, ic1 = geom.input_box()
    wh, ww = _work_shape(geom)
    r0, r1, c0, c1 = geom.crop

    def sub(line: np.ndarray, i: int) -> float:
        if i in (0, line.size - 1):
            return 0.0
        a, m, b = float(line[i - 1]), float(line[i]), float(line[i + 1])
        curv = a - 2.0 * m + b
        return 0.0 if curv >= 0.0 else float(np.clip(0.5 * (a - b) / curv, -0.5, 0.5))

    kept: list[tuple[int, int]] = []
    out = []
    for i in order:
        r, c = int(rows[i]), int(cols[i])
        if any(np.hypot(r - kr, c - kc) < 2.0 for kr, kc in kept):
            continue
        kept.append((r, c))
        y_in = (r + 0.5 + sub(cam[:, c], r)) * s / fh
        x_in = (c + 0.5 + sub(cam[r, :], c)) * s / fw
        y = (r0 + (y_in - ir0) * (r1 - r0) / max(ir1 - ir0, 1)) / wh
        x = (c0 + (x_in - ic0) * (c1 - c0) / max(ic1 - ic0, 1)) / ww
        out.append(
            {
                "x": round(min(max(x, 0.0), 1.0), 4),
                "y": round(min(max(y, 0.0), 1.0), 4),
                "weight": round(float(cam[r, c]) / top, 4),
            }
        )
        if len(out) == k:
            break
    return out


@given(
    _geometries(),
    st.integers(1, 24),
    st.integers(1, 24),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 3, 8]),
    st.integers(0, 5),
)
def test_peaks_equal_the_plain_whole_array_version(
    geom: Geometry, fh: int, fw: int, seed: int, levels: int, k: int
) -> None:
    # Quantised values make plateaus and ties; a few non-finite cells are cleaned alike.
    rng = np.random.default_rng(seed)
    cam = rng.normal(0.0, 1.0, (fh, fw)).astype(np.float32)
    if levels:
        cam = np.round(cam * levels) / levels
    if seed % 5 == 0:
        cam.flat[rng.integers(0, cam.size, 2)] = [np.nan, np.inf]
    assert peak_regions(cam, geom, k=k) == _reference_peaks(cam, geom, k=k)


def test_peaks_are_ordered_distinct_and_limited_to_k() -> None:
    geom = Geometry((100, 100), 1.0, (0, 100, 0, 100), 0.8, (0, 0), 80)  # no letterbox
    cam = np.zeros((10, 10), np.float32)
    cam[1, 1] = cam[1, 2] = 1.0  # a plateau: one region, not two
    cam[2, 2] = 0.9  # a shoulder of the same region
    cam[7, 7] = 0.6
    cam[1, 7] = 0.3
    peaks = peak_regions(cam, geom, k=5)
    assert [p["weight"] for p in peaks] == [1.0, 0.6, 0.3]
    assert peaks[0]["y"] == pytest.approx(0.15, abs=0.01)
    assert 0.15 <= peaks[0]["x"] <= 0.25
    assert (peaks[1]["x"], peaks[1]["y"]) == (pytest.approx(0.75), pytest.approx(0.75))
    assert (peaks[2]["x"], peaks[2]["y"]) == (pytest.approx(0.75), pytest.approx(0.15))
    assert len(peak_regions(cam, geom, k=2)) == 2
    assert peak_regions(cam, geom, k=0) == []
    assert set(peaks[0]) == {"x", "y", "weight"}


def test_a_peak_between_cells_is_located_between_them() -> None:
    geom = Geometry((100, 100), 1.0, (0, 100, 0, 100), 0.8, (0, 0), 80)
    cam = np.zeros((10, 10), np.float32)
    cam[5, 4], cam[5, 5], cam[5, 6] = 0.5, 1.0, 0.9  # true peak right of cell 5's centre
    (peak, *_) = peak_regions(cam, geom)
    assert 0.55 < peak["x"] < 0.6


# --------------------------------------------------------------------------- rendering


def _stripes(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (127 + 120 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.uint8)


def _blob_heat(h: int, w: int) -> np.ndarray:
    """A smooth blob of heat, made small and resized (a big-sigma blur is slow)."""
    sh, sw = max(h // 8, 4), max(w // 8, 4)
    small: np.ndarray = np.zeros((sh, sw), np.float32)
    cv2.circle(small, (sw // 3, sh // 2), max(min(sh, sw) // 4, 1), 1.0, -1)
    small = cv2.GaussianBlur(small, (0, 0), max(min(sh, sw) / 10, 0.5))
    heat: np.ndarray = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return heat / heat.max()


def _decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, "not a decodable image"
    return img


def _render(img: np.ndarray, heat: np.ndarray, **kw: object) -> np.ndarray:
    return render_overlay(img, heat, label="osteoporosis", probs=PROBS, tscore=-2.74, **kw)  # type: ignore[arg-type]


def _amber(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(int) for i in range(3))
    return (b < 80) & (g > 150) & (r > 200) & (r - b > 150)


@pytest.mark.parametrize(
    "shape", [(768, 576), (625, 768), (1000, 100), (80, 1200), (40, 40), (2000, 2000)]
)
@pytest.mark.parametrize("include_image", [True, False])
def test_the_overlay_always_carries_captions_and_the_whole_notice(
    shape: tuple[int, int], include_image: bool
) -> None:
    img, heat = _stripes(*shape), _blob_heat(*shape)
    out = _render(img, heat, include_image=include_image)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert max(out.shape[:2]) <= 768
    lines = _caption_lines("osteoporosis", PROBS, -2.74, include_image)
    lay = _layout(shape, lines, 768)
    band = out[lay.band_top :]
    assert band.shape[0] >= len(lines) * 15  # room for every line
    assert (band.max(axis=2) > 200).mean() > 0.02  # white caption text is there
    ys, xs = np.nonzero(_amber(band))
    # The notice is drawn in the last line, inside the canvas, and is not squeezed.
    assert ys.size > 300
    assert ys.min() > band.shape[0] - lay.line_height - lay.margin - 4
    assert xs.min() > 0 and xs.max() < out.shape[1] - 1
    assert xs.max() - xs.min() >= cv2.getTextSize(NOTICE, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0]


def test_a_small_max_side_keeps_the_notice_readable() -> None:
    out = _render(_stripes(600, 400), _blob_heat(600, 400), max_side=320)
    assert max(out.shape[:2]) <= 320
    assert _amber(out).sum() > 200


def test_captions_are_ascii_and_formatted() -> None:
    lines = _caption_lines("ostéoporose—x", {"osteoporosis": 0.7, "normal": 0.1}, -2.74, False)
    assert lines[0] == "Predicted: ost?oporose?x"
    assert lines[1] == "normal 0.10  osteoporosis 0.70"  # canonical class order
    assert lines[2] == "T-score estimate -2.7"
    assert lines[-1] == NOTICE and "withheld" in lines[-2]
    assert _caption_lines("x", PROBS, float("nan"), True)[2] == "T-score estimate n/a"
    assert _caption_lines("x", PROBS, -0.04, True)[2] == "T-score estimate 0.0"
    assert all(ch.isascii() for line in lines for ch in line)


def _panel_correlation(out: np.ndarray, img: np.ndarray, include_image: bool) -> float:
    """Correlation of the overlay's image panel with the radiograph resized to it."""
    shape = (img.shape[0], img.shape[1])
    lay = _layout(shape, _caption_lines("osteoporosis", PROBS, -2.74, include_image), 768)
    x, y, w, h = lay.panel
    panel = cv2.cvtColor(out[y : y + h, x : x + w], cv2.COLOR_BGR2GRAY).astype(np.float64)
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
    return float(np.corrcoef(panel.ravel(), small.ravel())[0, 1])


def test_a_withheld_image_does_not_appear_in_the_overlay() -> None:
    shape = (600, 500)
    img, heat = _stripes(*shape), _blob_heat(*shape)
    other = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    withheld = _render(img, heat, include_image=False)
    # The output depends on the radiograph only through its shape...
    assert np.array_equal(withheld, _render(other, heat, include_image=False))
    # ... so the radiograph's pattern is not in it, while the normal overlay shows it.
    assert abs(_panel_correlation(withheld, img, False)) < 0.05
    assert _panel_correlation(_render(img, heat), img, True) > 0.8


def test_non_finite_and_negative_heat_is_drawn_as_no_heat() -> None:
    heat = np.ones((200, 200), np.float32)
    heat[:50] = np.nan
    heat[50:100] = -1.0
    heat[100:150] = np.inf  # saturates to the top of the scale
    img = np.full((200, 200), 120, np.uint8)
    out = _render(img, heat)
    lay = _layout((200, 200), _caption_lines("osteoporosis", PROBS, -2.74, True), 768)
    x, y, w, h = lay.panel
    panel = out[y : y + h, x : x + w].astype(int)
    grey = (panel.max(axis=2) - panel.min(axis=2)) <= 1
    assert grey[: h // 4 - 4].all() and grey[h // 4 + 4 : h // 2 - 4].all()
    assert not grey[h // 2 + 4 :].any()
    assert _amber(out).sum() > 200


def test_bad_arguments_are_refused_with_a_reason() -> None:
    img = _stripes(100, 100)
    with pytest.raises(ValueError, match="does not match"):
        _render(img, np.zeros((50, 50), np.float32))
    with pytest.raises(ValueError, match="8-bit grey"):
        _render(img.astype(np.uint16), np.zeros((100, 100), np.float32))
    with pytest.raises(ValueError, match="max_side"):
        _render(img, np.zeros((100, 100), np.float32), max_side=100)
    with pytest.raises(ValueError, match="2-D"):
        cam_to_display(np.zeros((1, 3, 8, 8), np.float32), HAND_GEOM, (500, 400))
    with pytest.raises(ValueError, match="8-bit"):
        encode_png(np.zeros((10, 10, 3), np.float32))


def test_a_bgr_display_and_an_overlong_label_still_fit() -> None:
    img = cv2.cvtColor(_stripes(300, 200), cv2.COLOR_GRAY2BGR)
    out = render_overlay(
        img, _blob_heat(300, 200), label="W" * 200, probs=PROBS, tscore=-1.0, max_side=400
    )
    assert max(out.shape[:2]) <= 400 and _amber(out).sum() > 100


# --------------------------------------------------------------------------- encoding


def test_a_noisy_2000px_radiograph_overlay_fits_the_mqtt_budget_and_decodes() -> None:
    rng = np.random.default_rng(7)
    px = rng.integers(0, 4096, (2000, 2000), dtype=np.uint16)  # incompressible noise
    cfg = PreprocessConfig()
    raw = RawImage(pixels=px)
    display, _ = display_work(raw, cfg)
    _, geom = preprocess_to_uint8(raw, cfg)
    cam = rng.normal(0.0, 1.0, (10, 10)).astype(np.float32)
    out = _render(display, cam_to_display(cam, geom, display.shape))
    data = encode_png(out)
    assert len(data) <= 200_000
    back = _decode(data)
    assert back.ndim == 3 and back.shape[2] == 3
    assert max(back.shape[:2]) >= 200  # downscaled, but still an image to look at


def test_the_png_carries_no_metadata_chunks() -> None:
    out = _render(_stripes(500, 400), _blob_heat(500, 400))
    for data in (encode_png(out), encode_png(out, max_bytes=60_000)):
        kinds = _png_chunks(data)
        assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
        assert set(kinds) <= {b"IHDR", b"IDAT", b"IEND"}
        assert not {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"tIME"} & set(kinds)


def test_an_overlay_that_fits_is_encoded_losslessly() -> None:
    out = _render(_stripes(300, 300), _blob_heat(300, 300))
    data = encode_png(out, max_bytes=10_000_000)
    assert np.array_equal(_decode(data), out)


def test_a_tight_budget_shrinks_the_image_and_an_impossible_one_is_refused() -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    data = encode_png(noisy, max_bytes=50_000)
    assert len(data) <= 50_000
    back = _decode(data)
    assert back.shape[0] < 600
    with pytest.raises(ValueError, match="cannot encode"):
        encode_png(noisy, max_bytes=500)


def test_jpeg_for_the_local_screen_decodes() -> None:
    out = _render(_stripes(300, 300), _blob_heat(300, 300))
    back = _decode(encode_jpeg(out))
    assert back.shape == out.shape


@pytest.mark.parametrize("include_image", [True, False])
def test_the_table_blend_is_within_one_grey_level_of_the_float_blend(include_image: bool) -> None:
    from edge.overlay import ALPHA_WITH_IMAGE, ALPHA_WITHOUT_IMAGE, NEUTRAL, _blend

    rng = np.random.default_rng(0)
    display = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    heat = rng.random((300, 200)).astype(np.float32)
    h8 = cv2.convertScaleAbs(heat, alpha=255.0)
    if include_image:
        base = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
        alpha_max = ALPHA_WITH_IMAGE
    else:
        base = np.full((300, 200, 3), NEUTRAL, np.uint8)
        alpha_max = ALPHA_WITHOUT_IMAGE
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    lut = np.clip((levels - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0) * np.float32(alpha_max)
    alpha = lut.astype(np.float32)[h8]
    colour = cv2.applyColorMap(h8, cv2.COLORMAP_JET)
    expected = cv2.blendLinear(colour, base, alpha, 1.0 - alpha).astype(int)
    got = _blend(display, heat, (200, 300), include_image).astype(int)
    assert np.abs(got - expected).max() <= 1
