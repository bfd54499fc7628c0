"""The shared image-formation chain (docs/cohort.md §3.3, steps 2-8).

path lengths -> polyenergetic primary -> heel effect -> scatter -> (grid lines) -> quantum noise
-> detector blur (MTF) -> electronic noise and defects -> log -> vendor look -> stored values.

Two simplifications, both stated here so nobody mistakes them for physics:
- The image is formed directly on the detector grid at its pixel pitch (no finer render that is
  then resampled); the MTF blur is applied in detector pixels.
- Quantum noise is Gaussian with the Poisson variance (counts + sqrt(counts) * z). Signal in the
  anatomy is at least ~200 photons per pixel, where the two are indistinguishable, and it is
  ~8x faster than numpy's Poisson sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from cohort.materials import spectrum

F32 = np.float32


@dataclass(frozen=True)
class Exposure:
    """The nuisance values the chain needs (a subset of ``cohort.nuisance`` columns)."""

    pitch_mm: float
    kvp: float
    photons_per_pixel: float
    spr: float
    scatter_sigma_mm: float
    heel_gain: float
    heel_axis: int
    heel_sign: int
    grid_artefact: bool
    grid_lines_per_cm: float
    electronic_noise_adu: float
    mtf_sigma_px: float
    mtf_tail: float
    dead_pixel_fraction: float
    dead_line: bool

    @classmethod
    def from_row(cls, row: dict) -> Exposure:
        names = cls.__dataclass_fields__
        return cls(**{k: row[k] for k in names})


def primary(paths: dict[str, NDArray], kvp: float) -> NDArray:
    """Polyenergetic Beer-Lambert transmission I_p / I_0 (docs/cohort.md §3.3, step 3)."""
    spec = spectrum(kvp)
    shape = next(iter(paths.values())).shape
    out = np.zeros(shape, dtype=F32)
    line = np.empty(shape, dtype=F32)
    for i, w in enumerate(spec.weights):
        line.fill(0.0)
        for material, length in paths.items():
            line += F32(spec.mu(material)[i]) * length
        np.negative(line, out=line)
        np.exp(line, out=line)
        out += F32(w) * line
    return out


def blur_large(img: NDArray, sigma_px: float) -> NDArray:
    """Gaussian blur with a wide kernel, computed on a downsampled copy (scatter, latitude)."""
    factor = max(int(sigma_px // 4), 1)
    if factor == 1:
        return cv2.GaussianBlur(img, (0, 0), sigma_px)
    rows, cols = img.shape
    small = cv2.resize(
        img, (max(cols // factor, 1), max(rows // factor, 1)), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / factor)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)


def heel_ramp(shape: tuple[int, int], exp: Exposure) -> NDArray:
    rows, cols = shape
    n = rows if exp.heel_axis == 0 else cols
    ramp = np.linspace(-1.0, 1.0, n, dtype=F32) * F32(exp.heel_gain * exp.heel_sign) + F32(1.0)
    return ramp[:, None] if exp.heel_axis == 0 else ramp[None, :]


def expected_signal(
    paths: dict[str, NDArray], exp: Exposure, spr_scale: float, anatomy: NDArray | None = None
) -> NDArray:
    """Noise-free detected fluence (primary + scatter, with heel), relative to the open field.

    Scatter comes from the patient, not from the open field beside it: the primary is capped at
    three times the anatomy's median before the broad scatter kernel is applied, so a strip of
    open air does not fog the anatomy next to it.
    """
    ip = primary(paths, exp.kvp)
    source = ip
    if anatomy is not None and anatomy.any():
        cap = 3.0 * float(np.median(ip[::4, ::4][anatomy[::4, ::4]]))
        source = np.minimum(ip, F32(cap))
    scatter = blur_large(source, exp.scatter_sigma_mm / exp.pitch_mm)
    signal = ip + F32(exp.spr * spr_scale) * scatter
    signal *= heel_ramp(signal.shape, exp)
    return signal


def detect(
    signal: NDArray,
    anatomy: NDArray,
    exp: Exposure,
    rng: np.random.Generator,
    exact_poisson: bool = False,
) -> NDArray:
    """Quantum noise, grid lines, MTF, electronic noise and defects (steps 6-7): counts, float32.

    ``anatomy`` marks the pixels whose median gets ``photons_per_pixel`` photons.
    ``exact_poisson`` samples numpy's Poisson instead of the Gaussian approximation (the
    benchmark's baseline).
    """
    rows, cols = signal.shape
    if exp.grid_artefact:
        # A stationary grid sampled at the pixel pitch: the aliasing comes for free.
        x = np.arange(cols, dtype=F32) * F32(exp.pitch_mm / 10.0)
        lines = 1.0 - 0.03 * (0.5 + 0.5 * np.cos(2 * np.pi * exp.grid_lines_per_cm * x))
        signal = signal * lines[None, :].astype(F32)
    ref = float(np.median(signal[::4, ::4][anatomy[::4, ::4]])) if anatomy.any() else 1.0
    counts = signal * F32(exp.photons_per_pixel / max(ref, 1e-6))
    if exact_poisson:
        counts = rng.poisson(np.maximum(counts, 0.0)).astype(F32)
    else:
        noise = rng.standard_normal((rows, cols), dtype=F32)
        counts += np.sqrt(np.maximum(counts, 0.0)) * noise
    blurred: NDArray = cv2.GaussianBlur(counts, (0, 0), exp.mtf_sigma_px)
    if exp.mtf_tail > 0:
        tail = cv2.GaussianBlur(counts, (0, 0), 4.0 * exp.mtf_sigma_px)
        blurred = (1.0 - exp.mtf_tail) * blurred + exp.mtf_tail * tail
    blurred += F32(exp.electronic_noise_adu) * rng.standard_normal((rows, cols), dtype=F32)
    n_dead = int(exp.dead_pixel_fraction * rows * cols)
    if n_dead:
        blurred.flat[rng.integers(0, rows * cols, n_dead)] = 0.0
    if exp.dead_line:
        blurred[:, int(rng.integers(0, cols))] = 0.0
    return np.maximum(blurred, 1.0)


def log_image(counts: NDArray, open_field: float) -> NDArray:
    """p = -ln(I / I_0): attenuation, high where there is bone (step 8)."""
    return -np.log(counts / F32(open_field))


@dataclass(frozen=True)
class Look:
    """Vendor-like presentation processing (docs/cohort.md §3.3 step 8, §3.8)."""

    musm_gain: float
    latitude: float
    gamma: float
    bits_stored: int
    pitch_mm: float

    @classmethod
    def from_row(cls, row: dict) -> Look:
        return cls(
            musm_gain=row["musm_gain"],
            latitude=row["latitude"],
            gamma=row["gamma"],
            bits_stored=int(row["bits_stored"]),
            pitch_mm=row["pitch_mm"],
        )


def present(
    p: NDArray, anatomy: NDArray, look: Look, tone_range: tuple[float, float] | None = None
) -> tuple[NDArray, tuple[float, float]]:
    """Multi-scale unsharp masking, latitude reduction, tone curve, quantisation (MONOCHROME2).

    Returns uint16 stored values in [0, 2^bits - 1] (bone is bright) and the tone range used.
    The range comes from the anatomy's percentiles, as a console's exposure recognition does;
    ``tone_range`` fixes it instead (to compare the same patient at several bone statuses).
    """
    px = look.pitch_mm
    fine = cv2.GaussianBlur(p, (0, 0), 1.0 / px)
    coarse = blur_large(p, 5.0 / px)
    out: NDArray = p + F32(look.musm_gain) * ((p - fine) * F32(0.6) + (fine - coarse) * F32(0.4))
    if look.latitude > 0:
        broad = blur_large(p, 25.0 / px)
        out -= F32(look.latitude) * (broad - F32(np.median(broad[::8, ::8])))
    if tone_range is None:
        sample = out[::4, ::4][anatomy[::4, ::4]] if anatomy.any() else out[::4, ::4].ravel()
        lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.8]))
    else:
        lo, hi = tone_range
    # Open field (below the anatomy's range) and dense metal saturate at the ends of the curve.
    v = np.clip((out - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    v = np.power(v * F32(0.92) + F32(0.04), F32(look.gamma))
    top = (1 << look.bits_stored) - 1
    return np.round(v * top).astype(np.uint16), (lo, hi)
