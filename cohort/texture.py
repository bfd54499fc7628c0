"""Trabecular and cortical textures (docs/cohort.md §1.4, §3.3).

``fbm`` is fractional-Brownian-motion-like noise built from octaves of upsampled white noise
whose amplitudes scale as (octave size)^H: the expected squared difference grows with distance
as distance^(2H), so a lower Hurst exponent H gives a rougher texture [S19, S20]. Octave
synthesis costs a few resizes instead of a full-frame FFT, which keeps a 1-megapixel hand under
the render budget.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

F32 = np.float32


def fbm(
    shape: tuple[int, int],
    hurst: float,
    rng: np.random.Generator,
    finest_px: float = 1.5,
    octaves: int = 6,
) -> NDArray:
    """Zero-mean, unit-SD fBm-like field of ``shape``; finest octave has cells of ``finest_px``."""
    rows, cols = shape
    out = np.zeros(shape, dtype=F32)
    cell = finest_px
    for _ in range(octaves):
        h = max(int(np.ceil(rows / cell)) + 2, 2)
        w = max(int(np.ceil(cols / cell)) + 2, 2)
        small = rng.standard_normal((h, w)).astype(F32)
        big = cv2.resize(small, (int(w * cell), int(h * cell)), interpolation=cv2.INTER_CUBIC)
        out += (cell**hurst) * big[:rows, :cols]
        cell *= 2.0
    out -= out.mean()
    sd = float(out.std())
    return out / sd if sd > 0 else out


def trabecular_texture(
    shape: tuple[int, int],
    hurst: float,
    rng: np.random.Generator,
    pitch_mm: float,
    contrast: float = 0.8,
) -> NDArray:
    """Mean-1, non-negative multiplier of trabecular bone density.

    The finest octave is about 0.3 mm (trabecular spacing scale) whatever the pixel pitch.
    """
    finest = max(0.3 / pitch_mm, 1.0)
    n = fbm(shape, hurst, rng, finest_px=finest)
    t = np.exp(contrast * n)
    return (t / t.mean()).astype(F32)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, cell_px: float) -> NDArray:
    """A smooth random field in [0, 1] with features about ``cell_px`` wide."""
    rows, cols = shape
    h = max(int(np.ceil(rows / cell_px)) + 2, 2)
    w = max(int(np.ceil(cols / cell_px)) + 2, 2)
    small = rng.random((h, w)).astype(F32)
    big = cv2.resize(small, (int(w * cell_px), int(h * cell_px)), interpolation=cv2.INTER_LINEAR)
    return big[:rows, :cols]


def profile(n: int, hurst: float, rng: np.random.Generator) -> NDArray:
    """A 1-D fBm-like profile of ``n`` samples, zero mean, unit SD (endosteal roughness)."""
    out = np.zeros(n, dtype=float)
    step = 1
    while step < n:
        coarse = rng.standard_normal(n // step + 2)
        out += (step**hurst) * np.interp(np.arange(n) / step, np.arange(coarse.size), coarse)
        step *= 2
    out -= out.mean()
    sd = out.std()
    return out / sd if sd > 0 else out


def line_texture(
    x: NDArray,
    y: NDArray,
    centre: tuple[float, float],
    spacing_mm: float,
    rng: np.random.Generator,
    jitter: float = 0.6,
) -> NDArray:
    """Concentric arc 'streamlines' about ``centre``: values in [0, 1], high on a trabecula.

    A trabecular group runs along streamlines; with a far centre the arcs are nearly straight.
    Phase jitter along the arc breaks them into rods, as on a radiograph.
    """
    r = np.hypot(x - centre[0], y - centre[1])
    phase = rng.uniform(0, 2 * np.pi)
    theta = np.arctan2(y - centre[1], x - centre[0])
    wobble = jitter * np.sin(theta * rng.uniform(20, 40) + rng.uniform(0, 2 * np.pi))
    lines = 0.5 + 0.5 * np.cos(2 * np.pi * r / spacing_mm + phase + wobble)
    return (lines**3).astype(F32)
