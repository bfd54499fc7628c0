"""Site-specific latent bone status t_s (docs/cohort.md §3.2).

t_s = mu_T + rho_s (T - mu_T) + sqrt(1 - rho_s^2) sigma_T eps_s. The image of a site carries a
noisy copy of T whose noise is independent of the clinical residual: that is what lets a fused
model beat both single modalities.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.presets import CohortPreset

# rho_s [E], anchored on published correlations (docs/cohort.md §3.2 table).
SITE_RHO = {"hip": 0.80, "hand": 0.60, "dental": 0.55, "knee": 0.55}


def site_tscore(
    tscore: NDArray, site: str, rng: np.random.Generator, preset: CohortPreset
) -> NDArray:
    rho = SITE_RHO[site]
    eps = rng.standard_normal(np.shape(tscore))
    mu, sd = preset.t_mean, preset.t_sd
    return mu + rho * (np.asarray(tscore) - mu) + np.sqrt(1.0 - rho**2) * sd * eps
