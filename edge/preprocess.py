"""THE preprocessing function: radiograph -> model input, used identically everywhere.

Training, calibration, evaluation, quantization and the device all call ``preprocess``; its
version string is written into the model card, and a device refuses a card whose version it
does not implement. No PyTorch here.

Steps (order matters and is part of the version):
1. modality LUT (RescaleSlope/Intercept);
2. downsample to a working resolution (INTER_AREA) — the model needs a few hundred pixels, and
   every later step is cheaper on the small image;
3. VOI: the file's VOI LUT Sequence, else its first WindowCenter/Width, else a robust
   percentile window over the body (files without windowing exist [COHORT S50]);
4. MONOCHROME1 inversion, so bone is bright for every file;
5. body-region crop (largest bright components; markers and text outside the body are cut);
6. letterbox to the card's square input size;
7. CLAHE on the 8-bit square;
8. normalisation (x/255 - mean) / std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from osteofy.errors import InputRejected

PREPROCESS_VERSION = "osteofy-pre-1"
F32 = np.float32


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters recorded in the model card (``card["preprocessing"]``)."""

    size: int = 320
    work_side: int = 768  # working resolution after step 2 (long side, pixels)
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    crop_margin: float = 0.03
    mean: float = 0.45
    std: float = 0.25
    version: str = PREPROCESS_VERSION

    def to_card(self) -> dict:
        return asdict(self)

    @classmethod
    def from_card(cls, card: dict) -> PreprocessConfig:
        version = card.get("version")
        if version != PREPROCESS_VERSION:
            raise InputRejected(
                f"model card wants preprocessing {version!r}; this software implements "
                f"{PREPROCESS_VERSION!r}"
            )
        return cls(**card)


@dataclass(frozen=True)
class RawImage:
    """What preprocessing needs from a radiograph, independent of the file format."""

    pixels: NDArray  # 2-D stored values
    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0
    window: tuple[float, float] | None = None  # (center, width) after the modality LUT
    voi_lut: tuple[int, NDArray] | None = None  # (first mapped value, LUT data)
    voi_lut_bits: int = 16


@dataclass(frozen=True)
class Geometry:
    """How the model input maps back onto the source image (for heat-map overlays)."""

    source_shape: tuple[int, int]
    work_scale: float  # work pixels per source pixel
    crop: tuple[int, int, int, int]  # r0, r1, c0, c1 in work pixels
    scale: float  # input pixels per work pixel
    pad: tuple[int, int]  # top, left padding in input pixels
    size: int

    def input_box(self) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1) of the image content inside the square input."""
        h = int(round((self.crop[1] - self.crop[0]) * self.scale))
        w = int(round((self.crop[3] - self.crop[2]) * self.scale))
        return self.pad[0], self.pad[0] + h, self.pad[1], self.pad[1] + w


def raw_from_dataset(ds, pixels: NDArray | None = None) -> RawImage:
    """Read the pixel-relevant attributes of a pydicom Dataset.

    The pixels are decoded here (``ds.pixel_array``) unless the caller has read them already.
    """
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputRejected(f"photometric interpretation {photometric} is not a grey radiograph")
    if pixels is None:
        pixels = ds.pixel_array
    if pixels.ndim != 2:
        raise InputRejected(f"expected one 2-D frame, got pixel data of shape {pixels.shape}")
    window = None
    voi = None
    bits = 16
    seq = getattr(ds, "VOILUTSequence", None)
    if seq:
        item = seq[0]
        desc = [int(x) for x in item.LUTDescriptor]
        if len(desc) != 3:
            raise InputRejected("VOI LUT Descriptor must have 3 values")
        bits = desc[2]
        raw_data = item.LUTData
        if isinstance(raw_data, bytes | bytearray):  # OW: little-endian words (PS3.5 8.2)
            dtype = "<u2" if bits > 8 or len(raw_data) == 2 * (desc[0] or 65536) else "u1"
            data = np.frombuffer(raw_data, dtype=dtype).astype(F32)
        else:
            data = np.asarray(raw_data, dtype=F32).ravel()
        if data.size == 0:
            raise InputRejected("VOI LUT Sequence has no LUT data")
        voi = (desc[1], data)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        wc, ww = ds.WindowCenter, ds.WindowWidth
        wc = float(wc[0]) if hasattr(wc, "__len__") and not isinstance(wc, str) else float(wc)
        ww = float(ww[0]) if hasattr(ww, "__len__") and not isinstance(ww, str) else float(ww)
        if ww > 0:
            window = (wc, ww)
    return RawImage(
        pixels=pixels,
        photometric=photometric,
        slope=float(getattr(ds, "RescaleSlope", 1.0) or 1.0),
        intercept=float(getattr(ds, "RescaleIntercept", 0.0) or 0.0),
        window=window,
        voi_lut=voi,
        voi_lut_bits=bits,
    )


def raw_from_array(pixels: NDArray) -> RawImage:
    """A PNG or array input: MONOCHROME2, no windowing (the robust fallback applies)."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    if pixels.ndim != 2:
        raise InputRejected(f"expected a grey image, got shape {pixels.shape}")
    return RawImage(pixels=pixels)


def _to_work(raw: RawImage, work_side: int) -> tuple[NDArray, float]:
    px: NDArray = raw.pixels.astype(F32, copy=False)
    if raw.slope != 1.0 or raw.intercept != 0.0:
        px = px * F32(raw.slope) + F32(raw.intercept)
    h, w = px.shape
    scale = min(1.0, work_side / max(h, w))
    if scale < 1.0:
        px = cv2.resize(
            px,
            (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1)),
            interpolation=cv2.INTER_AREA,
        )
    return px, scale


def _voi(px: NDArray, raw: RawImage) -> NDArray:
    """Values in [0, 1] after the VOI transform (before any MONOCHROME1 inversion)."""
    if raw.voi_lut is not None:
        first, data = raw.voi_lut
        # Linear interpolation on the LUT's integer grid, written out: np.interp would
        # binary-search a 65536-entry table for every pixel (45 ms for a 768 px image).
        idx = np.clip(px - F32(first), 0, data.size - 1).astype(F32, copy=False)
        i0 = np.minimum(idx.astype(np.int32), data.size - 1)
        frac = idx - i0
        lut = data.astype(F32, copy=False)
        nxt = np.append(lut[1:], lut[-1])
        out = lut[i0] + (nxt[i0] - lut[i0]) * frac
        top = float(data.max()) if data.max() > 0 else 1.0
        return (out * F32(1.0 / top)).astype(F32, copy=False)
    if raw.window is not None:
        c, w = raw.window
        # DICOM PS3.3 C.11.2.1.2 linear window.
        return np.clip((px - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0).astype(F32)
    sample = px[:: max(px.shape[0] // 256, 1), :: max(px.shape[1] // 256, 1)]
    lo, hi = np.percentile(sample, [1.0, 99.5])
    if hi <= lo:
        raise InputRejected("image has no contrast (flat pixel values)")
    return np.clip((px - lo) / (hi - lo), 0.0, 1.0).astype(F32)


def body_crop(img8: NDArray, margin: float) -> tuple[int, int, int, int]:
    """Bounding box of the body: the large bright components of an Otsu threshold."""
    h, w = img8.shape
    blur = cv2.GaussianBlur(img8, (0, 0), 2.0)
    _, mask = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return 0, h, 0, w
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= 0.2 * areas.max()) + 1
    x0 = int(stats[keep, cv2.CC_STAT_LEFT].min())
    y0 = int(stats[keep, cv2.CC_STAT_TOP].min())
    x1 = int((stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max())
    y1 = int((stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max())
    if (x1 - x0) * (y1 - y0) < 0.05 * h * w:  # implausibly small body: keep the whole image
        return 0, h, 0, w
    my, mx = int(margin * h), int(margin * w)
    return max(y0 - my, 0), min(y1 + my, h), max(x0 - mx, 0), min(x1 + mx, w)


def display_work(raw: RawImage, cfg: PreprocessConfig) -> tuple[NDArray, float]:
    """Steps 1-4: an 8-bit working image with bone bright, and its scale to the source."""
    px, scale = _to_work(raw, cfg.work_side)
    v = _voi(px, raw)
    if raw.photometric == "MONOCHROME1":
        v = 1.0 - v
    return (v * 255.0 + 0.5).astype(np.uint8), scale


def preprocess_to_uint8(raw: RawImage, cfg: PreprocessConfig) -> tuple[NDArray, Geometry]:
    """Steps 1-7: the square 8-bit input image (cacheable) and its geometry."""
    img8, work_scale = display_work(raw, cfg)
    return square_from_display(img8, work_scale, raw.pixels.shape, cfg)


def square_from_display(
    img8: NDArray, work_scale: float, source_shape: tuple[int, ...], cfg: PreprocessConfig
) -> tuple[NDArray, Geometry]:
    """Steps 5-7 on the output of :func:`display_work` (the device keeps ``img8`` to draw on)."""
    r0, r1, c0, c1 = body_crop(img8, cfg.crop_margin)
    crop = img8[r0:r1, c0:c1]
    h, w = crop.shape
    s = cfg.size / max(h, w)
    nh, nw = max(int(round(h * s)), 1), max(int(round(w * s)), 1)
    small = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA)
    square: NDArray = np.zeros((cfg.size, cfg.size), dtype=np.uint8)
    top, left = (cfg.size - nh) // 2, (cfg.size - nw) // 2
    square[top : top + nh, left : left + nw] = small
    clahe = cv2.createCLAHE(clipLimit=cfg.clahe_clip, tileGridSize=(cfg.clahe_tiles,) * 2)
    square = clahe.apply(square)
    geom = Geometry(
        source_shape=(int(source_shape[0]), int(source_shape[1])),
        work_scale=work_scale,
        crop=(r0, r1, c0, c1),
        scale=s,
        pad=(top, left),
        size=cfg.size,
    )
    return square, geom


def normalise(square8: NDArray, cfg: PreprocessConfig) -> NDArray:
    """Step 8: uint8 [S,S] (or [N,S,S]) -> float32 [1,S,S] (or [N,1,S,S])."""
    x = (square8.astype(F32) / F32(255.0) - F32(cfg.mean)) / F32(cfg.std)
    return x[None] if x.ndim == 2 else x[:, None]


def preprocess(raw: RawImage, cfg: PreprocessConfig) -> tuple[NDArray, Geometry]:
    """Radiograph -> model input float32 [1, S, S] and its geometry."""
    square, geom = preprocess_to_uint8(raw, cfg)
    return normalise(square, cfg), geom


def map_to_input(arr: NDArray, geom: Geometry, nearest: bool = False) -> NDArray:
    """Carry a source-resolution map (a mask, a counterfactual) into model-input space [S, S]."""
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    a: NDArray = arr.astype(F32)
    h, w = geom.source_shape
    if geom.work_scale < 1.0:
        size = (max(int(round(w * geom.work_scale)), 1), max(int(round(h * geom.work_scale)), 1))
        a = cv2.resize(a, size, interpolation=interp)
    r0, r1, c0, c1 = geom.crop
    a = a[r0:r1, c0:c1]
    ir0, ir1, ic0, ic1 = geom.input_box()
    a = cv2.resize(a, (max(ic1 - ic0, 1), max(ir1 - ir0, 1)), interpolation=interp)
    out = np.zeros((geom.size, geom.size), dtype=F32)
    out[ir0:ir1, ic0:ic1] = a
    return out
