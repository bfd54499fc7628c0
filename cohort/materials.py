"""Mass attenuation coefficients and the polyenergetic spectrum (docs/cohort.md §3.3, steps 2-3).

The mu/rho values are approximate NIST XCOM / Hubbell-Seltzer figures (total attenuation with
coherent scattering, cm2/g) [S45], read at 15-100 keV and interpolated log-log; docs/cohort.md marks
them "[E, verify against NIST]". They set contrast between materials, which is what the
simulator needs; they are not a dosimetry reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

_ENERGIES_KEV = np.array([15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0])

# mu/rho in cm2/g at _ENERGIES_KEV.
_MU_RHO = {
    # ICRU-44 cortical bone (rho 1.92): H 3.4, C 15.5, N 4.2, O 43.5, P 10.3, Ca 22.5 wt %.
    "bone": (9.032, 4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855),
    "soft": (1.673, 0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1697),
    "adipose": (1.100, 0.5881, 0.3079, 0.2386, 0.2101, 0.1949, 0.1769, 0.1649),
    "aluminium": (7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704),
    "iron": (57.08, 25.68, 8.176, 3.629, 1.958, 1.205, 0.5952, 0.3717),
    # Lead has its K edge at 88 keV; the table stops short of it except at 100 keV.
    "lead": (111.6, 86.36, 30.32, 14.36, 8.041, 5.021, 2.419, 5.549),
}

DENSITY = {
    "bone": 1.92,  # cortical bone, ICRU-44
    "soft": 1.06,
    "adipose": 0.95,
    "marrow": 0.98,  # yellow/red marrow mixture of older adults: half soft tissue, half adipose
    "aluminium": 2.70,
    "iron": 7.87,
    "lead": 11.35,
}

# Materials that a scene can hold path lengths for, in the order of the path-length stack.
MATERIALS = ("bone", "marrow", "soft", "adipose", "iron", "lead")


def mu_rho(material: str, energy_kev: NDArray) -> NDArray:
    """mu/rho (cm2/g) at the given energies, log-log interpolated."""
    if material == "marrow":
        return 0.5 * (mu_rho("soft", energy_kev) + mu_rho("adipose", energy_kev))
    table = np.log(np.asarray(_MU_RHO[material]))
    e = np.log(np.asarray(energy_kev, dtype=float))
    return np.exp(np.interp(e, np.log(_ENERGIES_KEV), table))


def linear_mu(material: str, energy_kev: NDArray) -> NDArray:
    """Linear attenuation coefficient mu (1/cm)."""
    return mu_rho(material, energy_kev) * DENSITY[material]


@dataclass(frozen=True)
class Spectrum:
    """A few energy bins with detector-weighted fractions that sum to 1."""

    energies_kev: NDArray
    weights: NDArray

    def mu(self, material: str) -> NDArray:
        return linear_mu(material, self.energies_kev)


def spectrum(kvp: float, filtration_mm_al: float = 3.0, bins: int = 4) -> Spectrum:
    """Kramers spectrum filtered by aluminium, weighted for an energy-integrating detector.

    Bins are placed at fixed fractions of the kVp so every tube voltage gets ``bins`` bins with
    non-negligible weight (docs/cohort.md: 3-5 bins).
    """
    fractions = np.linspace(0.36, 0.80, bins)
    e = kvp * fractions
    kramers = (kvp - e) / e
    filtered = kramers * np.exp(-linear_mu("aluminium", e) * filtration_mm_al / 10.0)
    detector = filtered * e  # energy-integrating: signal proportional to photon energy
    return Spectrum(energies_kev=e, weights=detector / detector.sum())
