"""Inputs a hand/hip model must flag as out of distribution, made here (nothing downloaded).

- ``chest``: a crude synthetic PA chest radiograph (lungs, ribs, spine, heart) — another body part;
- ``blank``: an almost uniform plate (no anatomy; faint noise so preprocessing accepts it);
- ``inverted``: a real cohort image with its grey levels inverted (a wrong photometric tag);
- ``noise``: random pixels.
Each goes through THE preprocessing function, like any file on the device.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from edge.preprocess import RawImage


def synthetic_chest(rng: np.random.Generator, size: int = 1400) -> NDArray:
    img: NDArray = np.full((size, size), 0.55, np.float32)
    c = size // 2
    for sx in (-1, 1):  # lungs: dark
        cv2.ellipse(
            img, (c + sx * size // 5, int(size * 0.45)), (size // 7, size // 4), 0, 0, 360, 0.2, -1
        )
    cv2.rectangle(img, (c - size // 28, 0), (c + size // 28, size), 0.85, -1)  # spine
    cv2.ellipse(
        img, (c + size // 20, int(size * 0.6)), (size // 8, size // 7), 0, 0, 360, 0.75, -1
    )  # heart
    for k in range(10):  # ribs: bright arcs
        y = int(size * (0.2 + 0.06 * k))
        for sx in (-1, 1):
            cv2.ellipse(
                img,
                (c, y),
                (size // 3, size // 10),
                0,
                90 - sx * 80,
                90 - sx * 5,
                0.8,
                max(size // 120, 2),
            )
    img = cv2.GaussianBlur(img, (0, 0), size / 300)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 4095).astype(np.uint16)


def probes(example: RawImage, rng: np.random.Generator) -> dict[str, RawImage]:
    px = example.pixels.astype(np.int64)
    top = int(px.max())
    inverted = RawImage(
        pixels=(top - px).astype(np.uint16),
        photometric=example.photometric,
        slope=example.slope,
        intercept=example.intercept,
        window=None,
    )
    blank = (2000 + rng.normal(0, 3, (1200, 1000))).astype(np.uint16)
    noise = rng.integers(0, 4096, (1200, 1000)).astype(np.uint16)
    return {
        "chest": RawImage(pixels=synthetic_chest(rng)),
        "blank": RawImage(pixels=blank),
        "inverted": inverted,
        "noise": RawImage(pixels=noise),
    }
