"""Patient sampler: clinical variables and latent femoral-neck T-score (docs/cohort.md §3.1).

Vectorised over patients; a cohort is a ``Table`` (column name -> numpy array) so the same code
serves a 200 000-patient calibration run and a 10-image demo.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cohort.presets import FN_REFERENCE_MEAN, FN_REFERENCE_SD, CohortPreset

Table = dict[str, NDArray]

CLASS_NAMES = ("normal", "osteopenia", "osteoporosis")

# The FRAX-style risk factors of the cohort, as 0/1 columns, in the order the model card uses.
RISK_FACTORS = (
    "prior_fracture",
    "parental_hip_fracture",
    "smoking",
    "glucocorticoids",
    "rheumatoid_arthritis",
    "alcohol",
    "secondary_osteoporosis",
)

# Effects on T of each risk factor (docs/cohort.md §3.1) [E].
_RISK_EFFECTS = {
    "smoking": -0.15,
    "glucocorticoids": -0.35,
    "rheumatoid_arthritis": -0.25,
    "alcohol": -0.15,
    "secondary_osteoporosis": -0.20,
    "parental_hip_fracture": -0.10,
}


def who_class(tscore: NDArray) -> NDArray:
    """WHO class index: 0 normal (T >= -1), 1 osteopenia, 2 osteoporosis (T <= -2.5) [S26]."""
    t = np.asarray(tscore, dtype=float)
    return np.where(t <= -2.5, 2, np.where(t < -1.0, 1, 0)).astype(np.int8)


def bmi_effect(bmi: NDArray) -> NDArray:
    """Piecewise-linear BMI effect on T: 0.008 / 0.005 g/cm2 per unit below / above 27.3 [S29d]."""
    d = np.asarray(bmi, dtype=float) - 27.3
    return np.where(d < 0, 0.080 * d, 0.048 * d)


def deterministic_t(p: Table, preset: CohortPreset) -> NDArray:
    """The clinical part of T (everything but the N(0, residual_sd) term).

    Used by the sampler and by the oracle of ``cohort.check``, so both read the same equation.
    """
    male = p["sex_male"].astype(bool)
    mean_height = np.where(male, preset.height_mean_male, preset.height_mean_female)
    t = np.where(male, preset.intercept_male, preset.intercept_female)
    t = t - 0.065 * (p["age_years"] - 65.0)
    t = t + bmi_effect(p["bmi"])
    t = t + 2.0 * (p["height_m"] - mean_height)
    for name, effect in _RISK_EFFECTS.items():
        t = t + effect * p[name]
    return np.asarray(t, dtype=float)


def prior_fracture_logit(tscore: NDArray, age: NDArray) -> NDArray:
    """Logit of a prior fragility fracture given T and age (§3.1; about 16 % overall) [E]."""
    return -1.9 - 0.45 * (np.asarray(tscore) + 1.5) + 0.03 * (np.asarray(age) - 65.0)


def sample_patients(n: int, rng: np.random.Generator, preset: CohortPreset) -> Table:
    """Draw ``n`` virtual patients as docs/cohort.md §3.1 specifies."""
    if n < 0:
        raise ValueError("n must be >= 0")
    male = rng.random(n) < preset.p_male
    age = np.clip(rng.normal(preset.age_mean, preset.age_sd, n), preset.age_min, preset.age_max)
    bmi = np.clip(rng.normal(preset.bmi_mean, preset.bmi_sd, n), preset.bmi_min, preset.bmi_max)
    height = np.where(
        male,
        rng.normal(preset.height_mean_male, preset.height_sd_male, n),
        rng.normal(preset.height_mean_female, preset.height_sd_female, n),
    )
    weight = bmi * height**2

    def bern(p_male: float, p_female: float) -> NDArray:
        return (rng.random(n) < np.where(male, p_male, p_female)).astype(np.int8)

    table: Table = {
        "sex_male": male.astype(np.int8),
        "age_years": age,
        "bmi": bmi,
        "height_m": height,
        "weight_kg": weight,
        "smoking": bern(preset.p_smoking_male, preset.p_smoking_female),
        "glucocorticoids": bern(preset.p_glucocorticoids, preset.p_glucocorticoids),
        "rheumatoid_arthritis": bern(preset.p_rheumatoid_arthritis, preset.p_rheumatoid_arthritis),
        "alcohol": bern(preset.p_alcohol_male, preset.p_alcohol_female),
        "secondary_osteoporosis": bern(preset.p_secondary, preset.p_secondary),
        "parental_hip_fracture": bern(
            preset.p_parental_hip_fracture, preset.p_parental_hip_fracture
        ),
    }
    tscore = deterministic_t(table, preset) + rng.normal(0.0, preset.residual_sd, n)
    table["tscore"] = tscore
    table["bmd_fn"] = FN_REFERENCE_MEAN + FN_REFERENCE_SD * tscore
    p_fx = 1.0 / (1.0 + np.exp(-prior_fracture_logit(tscore, age)))
    table["prior_fracture"] = (rng.random(n) < p_fx).astype(np.int8)
    table["class_index"] = who_class(tscore)
    menopause = rng.normal(preset.menopause_age_mean, preset.menopause_age_sd, n)
    # Years since menopause for women; NaN for men (not applicable, not "unknown").
    table["years_since_menopause"] = np.where(male, np.nan, np.clip(age - menopause, 0.0, None))
    table["ost"] = 0.2 * (weight - age)
    return table
