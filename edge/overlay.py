"""Explanation rendering: Grad-CAM heat map -> display map, overlay image, PNG, peak regions.

The model returns ``cam`` at feature resolution over the letterboxed square input; everything
here maps it back through the preprocessing ``Geometry`` so that heat lands on the anatomy
that caused it, never on the letterbox padding. Pure OpenCV + numpy: this runs on the device.

Why the choices below (figures from ``bench/overlay.py`` and docs/PROBES.md (f)):

* The overlay is rendered at ``max_side`` (768 px), not at source resolution: rendering and
  PNG-encoding a full 3000 px radiograph costs several times more and never fits the 200 KB
  MQTT budget anyway.
* Radiograph detector noise makes lossless PNG of a 768 px overlay 300-600 KB. ``encode_png``
  therefore tries a fast lossless encode first (level 1, Up filter: fastest and smallest of
  the fast settings measured), then 6-bit colour (discards mostly noise, invisible), then
  mild downscaling, and 5-bit colour only after that (it shows contour bands in smooth
  soft tissue). Sizes are predicted from a sample of rows so one full encode usually does.
* PNG chunks other than IHDR/IDAT/IEND are dropped, so no text or other metadata can ever
  carry anything about the patient.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from edge.answer import tscore_text
from edge.preprocess import Geometry

F32 = np.float32
CLASS_ORDER = ("normal", "osteopenia", "osteoporosis")
NOTICE = "Screening aid - confirm with DXA"
WITHHELD = "Image withheld (burned-in annotation)"
HEAT_FLOOR = 0.2  # heat below this fraction of the maximum is drawn transparent
ALPHA_WITH_IMAGE = 0.5  # the bone must stay visible under the strongest heat
ALPHA_WITHOUT_IMAGE = 0.9
NEUTRAL = 96  # grey of the panel when the radiograph may not leave the device
BAND_BGR = (32, 32, 32)
TEXT_BGR = (255, 255, 255)
NOTICE_BGR = (0, 215, 255)  # amber: the notice must stand out
OUTLINE_BGR = (160, 160, 160)
FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_SIDE = 256  # smallest overlay that still carries a readable notice
PNG_KEEP = (b"IHDR", b"IDAT", b"IEND")


# --------------------------------------------------------------------------- geometry


def _work_shape(geom: Geometry) -> tuple[int, int]:
    """Shape of the working image that ``display_work`` produced for this geometry."""
    h, w = geom.source_shape
    if geom.work_scale >= 1.0:
        return h, w
    return max(int(round(h * geom.work_scale)), 1), max(int(round(w * geom.work_scale)), 1)


def _clean_cam(cam_hw: NDArray) -> NDArray | None:
    """Finite float32 CAM, or None when it carries no localisation (all <= 0, or flat).

    The input is not modified. Non-finite cells (which a sound model never returns) become
    0; the check costs two reductions, the cleaning only happens when it is needed.
    """
    cam = np.asarray(cam_hw, dtype=F32)
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"expected one 2-D class CAM, got shape {cam.shape}")
    hi, lo = float(cam.max()), float(cam.min())  # NaN propagates, inf shows
    if not (math.isfinite(hi) and math.isfinite(lo)):
        cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
        hi, lo = float(cam.max()), float(cam.min())
    if hi <= 0.0 or hi - lo <= 1e-6 * max(abs(hi), abs(lo)):
        return None
    return cam


def _on_image(shape: tuple[int, int], geom: Geometry) -> NDArray:
    """Feature cells whose centre lies on the image, not on the letterbox padding."""
    fh, fw = shape
    s = geom.size
    ir0, ir1, ic0, ic1 = geom.input_box()
    cy = (np.arange(fh) + 0.5) * s / fh
    cx = (np.arange(fw) + 0.5) * s / fw
    mask = ((cy >= ir0) & (cy < ir1))[:, None] & ((cx >= ic0) & (cx < ic1))[None, :]
    if not mask.any():  # content box smaller than a cell: every cell counts
        mask[:] = True
    return mask


def _cubic(x: NDArray, a: float = -0.5) -> NDArray:
    """Keys cubic convolution kernel (Catmull-Rom for a = -0.5)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _axis_weights(
    display: tuple[int, int],
    ratio: float,
    crop: tuple[int, int],
    box: tuple[int, int],
    n_feat: int,
    size: int,
) -> NDArray:
    """Bicubic weights [display pixels, feature cells] along one axis.

    Display pixel centre d + 0.5 -> work (d + 0.5) / ratio -> input coordinate through the
    crop -> letterbox box mapping -> feature index (cell centres at 0, 1, ...). Beyond the
    first and last cell centre the edge value is held. Cubic rather than linear because a
    coarse CAM (10 x 10 cells) upsampled linearly shows diamond-shaped artefacts; the
    small negative lobes of the cubic are removed by the ReLU that follows.
    """
    work = (np.arange(display[0], display[1], dtype=np.float64) + 0.5) / ratio
    inp = box[0] + (work - crop[0]) * (box[1] - box[0]) / (crop[1] - crop[0])
    pos = np.clip(inp * n_feat / size - 0.5, 0.0, n_feat - 1.0)
    base = np.floor(pos).astype(np.intp)
    taps = np.arange(-1, 3)[:, None]  # [4, 1]: the four taps of every display pixel
    idx = np.clip(base + taps, 0, n_feat - 1)  # clipped taps at the edges share a cell
    flat = (np.arange(pos.size) * n_feat + idx).ravel()
    weights = _cubic(pos - (base + taps)).ravel()
    m = np.bincount(flat, weights=weights, minlength=pos.size * n_feat)  # sums shared cells
    return m.reshape(pos.size, n_feat).astype(F32)


def cam_to_display(cam_hw: NDArray, geom: Geometry, display_shape: tuple[int, ...]) -> NDArray:
    """One class CAM [h, w] -> float32 heat in [0, 1] at the display image's resolution.

    Conceptually: upsample the CAM to the S x S input, cut out the letterbox content box
    (heat in the padding belongs to no anatomy), resize it into the crop region of the
    working image, zero elsewhere; then ReLU (only evidence *for* the class) and division
    by the max (or by a stronger cell in the padding, so that its tail stays faint). The
    three resamplings are composed into one bicubic map per axis, applied as two small
    matrix products: exact to a fraction of a pixel (no rounding through the S x S grid)
    and about a millisecond at 768 px. ``display_shape`` is normally the working image's
    shape; another shape is scaled to. A flat, all-negative, non-finite or all-zero CAM
    gives an all-zero map.
    """
    dh, dw = int(display_shape[0]), int(display_shape[1])
    out = np.zeros((dh, dw), dtype=F32)
    cam = _clean_cam(cam_hw)
    if cam is None:
        return out
    fh, fw = cam.shape
    s = geom.size
    ir0, ir1, ic0, ic1 = geom.input_box()
    wh, ww = _work_shape(geom)
    ry, rx = dh / wh, dw / ww
    r0, r1, c0, c1 = geom.crop
    dr0, dr1 = min(int(round(r0 * ry)), dh), min(int(round(r1 * ry)), dh)
    dc0, dc1 = min(int(round(c0 * rx)), dw), min(int(round(c1 * rx)), dw)
    if dr1 <= dr0 or dc1 <= dc0 or ir1 <= ir0 or ic1 <= ic0:
        return out
    my = _axis_weights((dr0, dr1), ry, (r0, r1), (ir0, ir1), fh, s)
    mx = _axis_weights((dc0, dc1), rx, (c0, c1), (ic0, ic1), fw, s)
    # cv2.gemm, not numpy's @: OpenBLAS wakes a helper thread even for these tiny products and
    # leaves it spinning, taking a core from the encoders (measured: render 37 -> 23 ms).
    none = np.empty((0, 0), F32)  # no third matrix (beta = 0)
    tmp = cv2.gemm(my.astype(F32), cam.astype(F32), 1.0, none, 0.0)
    out[dr0:dr1, dc0:dc1] = cv2.gemm(tmp, mx.astype(F32), 1.0, none, 0.0, flags=cv2.GEMM_2_T)
    np.maximum(out, 0.0, out=out)
    # Normalise by the map's max, unless a padding cell is stronger: then the faint tail
    # that interpolation carries onto the image edge must stay faint, not become "high".
    off_image = cam[~_on_image((fh, fw), geom)]
    top = max(float(out.max()), float(off_image.max()) if off_image.size else 0.0)
    if top <= 0.0:
        return np.zeros_like(out)
    out *= F32(1.0 / top)
    return out


def _on_image_span(n_cells: int, size: int, lo: int, hi: int) -> tuple[int, int]:
    """First and one-past-last feature cell whose centre lies in input pixels [lo, hi).

    Cells on the image form one run; each bound is found from the inverse mapping and then
    settled with the same float test as :func:`_on_image`, so the two always agree.
    """

    def centre(i: int) -> float:
        return (i + 0.5) * size / n_cells

    def first_at_or_above(x: float) -> int:
        i = min(max(math.ceil(x * n_cells / size - 0.5), 0), n_cells)
        while i > 0 and centre(i - 1) >= x:
            i -= 1
        while i < n_cells and centre(i) < x:
            i += 1
        return i

    a, b = first_at_or_above(lo), first_at_or_above(hi)
    return (a, b) if a < b else (0, 0)


_NEIGHBOURS = np.ones((3, 3), np.uint8)


def peak_regions(
    cam_hw: NDArray, geom: Geometry, k: int = 3, min_distance: float = 2.0
) -> list[dict[str, float]]:
    """The k strongest local maxima of a class CAM, for the published explanation.

    Coordinates are normalised to the source image (0..1, x right, y down) so that no pixel
    size or image dimension leaks into the message; ``weight`` is the heat relative to the
    strongest peak (top = 1.0). Peaks closer than ``min_distance`` feature cells to a
    stronger one are suppressed (plateaus and shoulders are one region, not several). Only
    cells whose centre lies on the image (not the letterbox padding) count. Sub-cell
    position comes from a parabola through the neighbours.

    This runs on every study between inference and the result, so it is written with few
    array operations (the CAM is about 20 x 20 cells; what costs is the number of calls).
    """
    cam = _clean_cam(cam_hw)
    if cam is None or k <= 0:
        return []
    fh, fw = cam.shape
    s = geom.size
    ir0, ir1, ic0, ic1 = geom.input_box()
    ra, rb = _on_image_span(fh, s, ir0, ir1)
    ca, cb = _on_image_span(fw, s, ic0, ic1)
    if ra == rb or ca == cb:  # content box smaller than a cell: every cell counts
        ra, rb, ca, cb = 0, fh, 0, fw
    on = np.zeros_like(cam)  # off-image cells are 0: an edge peak is still a peak
    np.maximum(cam[ra:rb, ca:cb], F32(0.0), out=on[ra:rb, ca:cb])
    is_max = (on >= cv2.dilate(on, _NEIGHBOURS)) & (on > 0)
    flat = np.flatnonzero(is_max)
    if flat.size == 0:
        return []
    heat = on.ravel()[flat]
    order = np.argsort(-heat, kind="stable")
    top = float(heat[order[0]])
    wh, ww = _work_shape(geom)
    r0, r1, c0, c1 = geom.crop
    box_h, box_w = max(ir1 - ir0, 1), max(ic1 - ic0, 1)
    kept: list[tuple[int, int]] = []
    peaks: list[dict[str, float]] = []
    for i in order.tolist():
        r, c = divmod(int(flat[i]), fw)
        if any(math.hypot(r - kr, c - kc) < min_distance for kr, kc in kept):
            continue
        kept.append((r, c))
        y_in = (r + 0.5 + _subcell(on[:, c], r)) * s / fh
        x_in = (c + 0.5 + _subcell(on[r, :], c)) * s / fw
        y_work = r0 + (y_in - ir0) * (r1 - r0) / box_h
        x_work = c0 + (x_in - ic0) * (c1 - c0) / box_w
        peaks.append(
            {
                "x": round(min(max(x_work / ww, 0.0), 1.0), 4),
                "y": round(min(max(y_work / wh, 0.0), 1.0), 4),
                "weight": round(float(heat[i]) / top, 4),
            }
        )
        if len(peaks) == k:
            break
    return peaks


def _subcell(line: NDArray, i: int) -> float:
    """Offset in (-0.5, 0.5) of a peak's vertex from a parabola through its two neighbours."""
    if i == 0 or i == line.size - 1:
        return 0.0
    left, mid, right = float(line[i - 1]), float(line[i]), float(line[i + 1])
    curv = left - 2.0 * mid + right
    if curv >= 0.0:
        return 0.0
    return min(max(0.5 * (left - right) / curv, -0.5), 0.5)


@dataclass(frozen=True)
class _Layout:
    """Where each part of the overlay goes (pixels of the output canvas)."""

    height: int
    width: int
    panel: tuple[int, int, int, int]  # x, y, w, h of the (heat-mapped) radiograph
    bar: tuple[int, int, int, int]  # x, y, w, h of the colour bar
    band_top: int  # the caption band spans rows band_top..height
    font_scale: float
    thickness: int
    text_height: int  # glyph height above the baseline at font_scale
    line_height: int
    margin: int


def _ascii(text: str, limit: int = 48) -> str:
    """cv2.putText draws ASCII only; anything else is replaced, long text is cut."""
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _caption_lines(
    label: str, probs: Mapping[str, float], tscore: float, include_image: bool
) -> list[str]:
    """Caption text, ASCII only; the notice is always the last line."""
    names = [n for n in CLASS_ORDER if n in probs] + [n for n in probs if n not in CLASS_ORDER]
    parts = []
    for name in names:
        p = float(probs[name])
        value = f"{min(max(p, 0.0), 1.0):.2f}" if math.isfinite(p) else "n/a"
        parts.append(f"{_ascii(name, 16)} {value}")
    t = float(tscore)
    # The WHO band is kept: -2.46 (osteopenia) reads -2.46, never -2.5 (osteoporosis).
    t_text = tscore_text(t).replace("\u2212", "-") if math.isfinite(t) else "n/a"
    t_text = "0.0" if t_text == "-0.0" else t_text
    lines = [f"Predicted: {_ascii(label, 32)}", "  ".join(parts), f"T-score estimate {t_text}"]
    if not include_image:
        lines.append(WITHHELD)
    lines.append(NOTICE)
    return lines


def _layout(shape: tuple[int, int], lines: list[str], max_side: int) -> _Layout:
    """Fit panel, colour bar and caption band within max_side; fonts scale with max_side.

    The font never goes below a readable minimum: on a small canvas the image gives way,
    not the text. The canvas is widened (up to max_side) so that every fixed line fits.
    """
    h, w = shape
    fs = max(0.75 * max_side / 768.0, 0.45)
    thick = max(1, int(round(2.0 * fs)))
    (_, th), base = cv2.getTextSize("Ag", FONT, fs, thick)
    line_h = int(math.ceil((th + base) * 1.5))
    margin = max(int(round(0.6 * th)), 4)
    band_h = 2 * margin + len(lines) * line_h
    label_w = cv2.getTextSize("high", FONT, 0.8 * fs, thick)[0][0]
    col_w = max(int(round(1.2 * th)), label_w) + 2 * margin
    avail_w, avail_h = max_side - col_w, max_side - band_h
    label_h = th + base + margin
    min_panel_h = 2 * label_h + 3 * th  # room for the colour bar and its labels
    if avail_w < 16 or avail_h < min_panel_h:
        raise ValueError(f"max_side {max_side} leaves no room for the image")
    s = min(avail_w / w, avail_h / h)
    pw, ph = max(int(w * s), 1), max(int(h * s), 1)
    area_h = max(ph, min_panel_h)
    need = max(cv2.getTextSize(t, FONT, fs, thick)[0][0] for t in lines[1:]) + 2 * margin
    width = min(max(pw + col_w, need), max_side)
    x0 = (width - col_w - pw) // 2
    return _Layout(
        height=area_h + band_h,
        width=width,
        panel=(x0, (area_h - ph) // 2, pw, ph),
        bar=(width - col_w + margin, label_h, col_w - 2 * margin, area_h - 2 * label_h),
        band_top=area_h,
        font_scale=fs,
        thickness=thick,
        text_height=th,
        line_height=line_h,
        margin=margin,
    )


def _put_fitted(
    img: NDArray,
    text: str,
    org: tuple[int, int],
    max_w: int,
    lay: _Layout,
    color: tuple[int, int, int],
    bold: bool = False,
) -> None:
    """Draw text at org (baseline), shrunk if needed so it never runs off the canvas."""
    fs = lay.font_scale
    thick = lay.thickness + (1 if bold else 0)
    tw = cv2.getTextSize(text, FONT, fs, thick)[0][0]
    if tw > max_w:
        fs *= max_w / tw
    cv2.putText(img, text, org, FONT, fs, color, thick, cv2.LINE_AA)


def _blend_tables(alpha_max: float) -> tuple[NDArray, NDArray]:
    """Per heat level (0..255): the JET colour times alpha, and 1 - alpha, as 8-bit tables."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    alpha = np.clip((levels - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0) * alpha_max
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    tinted = np.round(jet.astype(np.float64) * alpha[:, None]).astype(np.uint8)
    keep = np.round((1.0 - alpha) * 255.0).astype(np.uint8)
    return tinted.reshape(256, 1, 3), keep.reshape(256, 1)


_TABLES = {True: _blend_tables(ALPHA_WITH_IMAGE), False: _blend_tables(ALPHA_WITHOUT_IMAGE)}


def _blend(display8: NDArray, heat: NDArray, size: tuple[int, int], include_image: bool) -> NDArray:
    """Heat as JET, alpha rising from 0 at HEAT_FLOOR, over the radiograph or neutral grey.

    The heat is quantised to 8 bits first: colour and alpha then come from two 256-entry
    tables (``_TABLES``) and the blend is base * (1 - alpha) + colour * alpha in 8-bit
    arithmetic (within one grey level of the float blend), about 1.5 ms at 768 px.
    """
    pw, ph = size
    shrink = pw < 0.5 * display8.shape[1]  # INTER_AREA only where aliasing would show
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    # Values <= 0 become 0 (TOZERO keeps only src > 0), +inf and > 1 become 1. threshold keeps
    # NaN as NaN, and NaN converted to 8 bits is undefined (seen: NaN rows drawn as heat in
    # some runs, not in others), so NaN is patched to 0 before the conversion.
    _, clean = cv2.threshold(heat.astype(F32, copy=False), 0.0, 0.0, cv2.THRESH_TOZERO)
    cv2.patchNaNs(clean, 0.0)  # in place, on threshold's own output
    _, clean = cv2.threshold(clean, 1.0, 1.0, cv2.THRESH_TRUNC)
    h8: NDArray = cv2.resize(cv2.convertScaleAbs(clean, alpha=255.0), size, interpolation=interp)
    tinted_lut, keep_lut = _TABLES[include_image]
    if include_image:
        base = cv2.resize(display8, size, interpolation=interp)
    else:
        base = np.full((ph, pw), NEUTRAL, np.uint8)
    kept = cv2.multiply(base, cv2.LUT(h8, keep_lut), scale=1.0 / 255.0)  # grey, 1 channel
    tinted = cv2.LUT(cv2.merge((h8, h8, h8)), tinted_lut)
    return cv2.add(cv2.merge((kept, kept, kept)), tinted)


def render_overlay(
    display8: NDArray,
    heat: NDArray,
    *,
    label: str,
    probs: Mapping[str, float],
    tscore: float,
    include_image: bool = True,
    max_side: int = 768,
) -> NDArray:
    """The explanation image (BGR uint8, long side <= max_side) for screen and dashboard.

    The radiograph with the heat map blended in where it is significant (>= HEAT_FLOOR), a
    vertical colour bar ("high" to "low"), and a caption band: predicted class, the three
    probabilities, the T-score estimate and, always, NOTICE. With ``include_image=False``
    (burned-in annotation: the pixels must not leave the device) the heat map is drawn on
    a neutral grey panel; the output then depends on ``display8`` only through its shape.
    """
    if display8.ndim == 3:
        display8 = cv2.cvtColor(display8, cv2.COLOR_BGR2GRAY)
    if display8.ndim != 2 or display8.dtype != np.uint8:
        raise ValueError(f"display image must be 8-bit grey, got {display8.dtype} {display8.shape}")
    if heat.shape != display8.shape:
        raise ValueError(f"heat map {heat.shape} does not match the image {display8.shape}")
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be at least {MIN_SIDE}, got {max_side}")
    lines = _caption_lines(label, probs, tscore, include_image)
    lay = _layout((display8.shape[0], display8.shape[1]), lines, max_side)
    canvas = np.empty((lay.height, lay.width, 3), np.uint8)
    # Filled with OpenCV: numpy broadcasting a 3-tuple over the pixels costs milliseconds.
    top = (NEUTRAL,) * 3 if not include_image else (0, 0, 0)
    if lay.band_top > 0:
        cv2.rectangle(canvas, (0, 0), (lay.width - 1, lay.band_top - 1), top, cv2.FILLED)
    cv2.rectangle(canvas, (0, lay.band_top), (lay.width - 1, lay.height - 1), BAND_BGR, cv2.FILLED)
    x0, y0, pw, ph = lay.panel
    canvas[y0 : y0 + ph, x0 : x0 + pw] = _blend(display8, heat, (pw, ph), include_image)
    if not include_image:  # show where the withheld image lies
        cv2.rectangle(canvas, (x0, y0), (x0 + pw - 1, y0 + ph - 1), OUTLINE_BGR, 1)

    bx, by, bw, bh = lay.bar
    ramp = np.linspace(255, 0, bh).astype(np.uint8)[:, None].repeat(bw, axis=1)
    canvas[by : by + bh, bx : bx + bw] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    small = 0.8 * lay.font_scale
    for text, y in (
        ("high", by - lay.margin // 2),
        ("low", by + bh + lay.margin // 2 + lay.text_height),
    ):
        tw = cv2.getTextSize(text, FONT, small, lay.thickness)[0][0]
        cv2.putText(
            canvas,
            text,
            (bx + (bw - tw) // 2, y),
            FONT,
            small,
            TEXT_BGR,
            lay.thickness,
            cv2.LINE_AA,
        )

    max_w = lay.width - 2 * lay.margin
    pad = (lay.line_height - lay.text_height) // 2
    for i, text in enumerate(lines):
        y = lay.band_top + lay.margin + i * lay.line_height + pad + lay.text_height
        notice = text == NOTICE
        colour = NOTICE_BGR if notice else TEXT_BGR
        _put_fitted(canvas, text, (lay.margin, y), max_w, lay, colour, bold=notice or i == 0)
    return canvas


# --------------------------------------------------------------------------- encoding


def _posterize(bgr: NDArray, shift: int) -> NDArray:
    """Round each channel to 8 - shift bits (a LUT: under a millisecond at 768 px)."""
    if shift == 0:
        return bgr
    lut = np.minimum(((np.arange(256) + (1 << (shift - 1))) >> shift) << shift, 255)
    return cv2.LUT(bgr, lut.astype(np.uint8))


def _strip_png(data: bytes) -> bytes:
    """Keep only IHDR/IDAT/IEND: no tEXt/iTXt/zTXt/eXIf or any other metadata can leave."""
    out = [data[:8]]
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if ctype in PNG_KEEP:
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def _png(bgr: NDArray, shift: int) -> bytes:
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    if shift:  # posterized rows have long runs: RLE is smaller and faster there
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buf = cv2.imencode(".png", _posterize(bgr, shift), params)
    if not ok:
        raise ValueError("PNG encoding failed")
    return _strip_png(buf.tobytes())


def _ladder(long_side: int) -> list[tuple[int, float]]:
    """(posterize shift, scale) from best to worst quality.

    6-bit colour costs nothing visible; 5-bit shows contour bands in smooth soft tissue,
    which are worse than a mild downscale, so 6-bit is kept down to 72 % before 5-bit.
    """
    steps = [(0, 1.0), (2, 1.0), (2, 0.85), (2, 0.72)]
    scale = 0.72
    while long_side * scale >= 64:
        steps.append((3, scale))
        scale *= 0.85
    return steps


def _row_sample(bgr: NDArray, strips: int = 8, rows: int = 16) -> NDArray | None:
    """Evenly spaced bands of rows: a cheap stand-in to predict the PNG size of the whole."""
    h = bgr.shape[0]
    if h < 4 * strips * rows:
        return None
    starts = np.linspace(0, h - rows, strips).astype(int)
    return np.concatenate([bgr[r : r + rows] for r in starts])


def encode_png(bgr: NDArray, max_bytes: int = 200_000) -> bytes:
    """PNG of an overlay within the MQTT byte budget (contract: overlay <= 200 KB).

    Steps from best to worst quality: lossless (fast level 1), 6-bit colour, 6-bit at 85 %
    and 72 % size, then 5-bit colour downscaled in 15 % steps. A full encode costs 10-20 ms
    at 768 px, so the size of each step is first predicted from 1/8 of the rows (a few ms)
    and steps that cannot fit are skipped; every result is still checked against the
    budget, and a miss corrects the later predictions. A noisy radiograph thus needs one
    full encode, not three. Raises ValueError when even a 64 px image does not fit (only
    for a budget far below any real overlay).
    """
    if bgr.dtype != np.uint8 or bgr.ndim not in (2, 3):
        raise ValueError(f"expected an 8-bit image, got {bgr.dtype} {bgr.shape}")
    h, w = bgr.shape[:2]
    steps = _ladder(max(h, w))
    sample = _row_sample(bgr)
    sample_bytes: dict[int, float] = {}
    correction = 1.0
    for n, (shift, scale) in enumerate(steps):
        predicted = 0.0
        if sample is not None:
            if shift not in sample_bytes:
                sample_bytes[shift] = len(_png(sample, shift)) * h / sample.shape[0]
            predicted = sample_bytes[shift] * scale * scale * correction
            if predicted > 0.95 * max_bytes and n < len(steps) - 1:
                continue
        img = bgr
        if scale != 1.0:
            size = (max(int(w * scale), 1), max(int(h * scale), 1))
            img = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        data = _png(img, shift)
        if len(data) <= max_bytes:
            return data
        if predicted > 0.0:
            correction *= len(data) / predicted
    raise ValueError(f"cannot encode the overlay within {max_bytes} bytes")


def encode_jpeg(bgr: NDArray, quality: int = 90) -> bytes:
    """JPEG for the local screen (about 1.5 ms at 768 px); never published, no metadata."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
