"""Cohort presets: the numbers of docs/cohort.md §3.1 that differ between target populations.

``brief_cohort`` is the calibrated model of docs/cohort.md §3.1 verbatim. ``nhanes_2017`` keeps the
same structural equation (age, BMI, height and risk-factor effects) and re-solves the two sex
intercepts so that osteoporosis prevalence matches NHANES 2017-18 for adults aged 50 and over
(women 19.6 %, men 4.4 %, NCHS Data Brief 405 [S28]); its age, sex and BMI distributions are
design estimates for the US population aged 50+ [E]. The intercepts were solved by Monte-Carlo
(N = 400 000); ``tests/test_sampler.py`` checks they still hold.
"""

from __future__ import annotations

from dataclasses import dataclass

# NHANES III non-Hispanic white women aged 20-29, femoral neck (docs/cohort.md §2, [S24, S25]).
FN_REFERENCE_MEAN = 0.858  # g/cm2
FN_REFERENCE_SD = 0.120  # g/cm2


@dataclass(frozen=True)
class CohortPreset:
    """Parameters of the patient sampler (docs/cohort.md §3.1)."""

    name: str
    p_male: float
    age_mean: float
    age_sd: float
    age_min: float
    age_max: float
    bmi_mean: float
    bmi_sd: float
    intercept_female: float
    intercept_male: float
    # Target class shares (osteoporosis, osteopenia, normal) checked by §3.11, in percent.
    target_shares: tuple[float, float, float]
    # Cohort mean and SD of T (Monte-Carlo, N = 400 000), used by the site model §3.2 so that one
    # patient's site status never depends on who else is in the batch.
    t_mean: float
    t_sd: float
    height_mean_male: float = 1.72
    height_sd_male: float = 0.07
    height_mean_female: float = 1.59
    height_sd_female: float = 0.065
    bmi_min: float = 15.0
    bmi_max: float = 50.0
    residual_sd: float = 1.05
    # Risk-factor prevalences [E], anchored on S30c.
    p_smoking_male: float = 0.20
    p_smoking_female: float = 0.12
    p_glucocorticoids: float = 0.03
    p_rheumatoid_arthritis: float = 0.02
    p_alcohol_male: float = 0.06
    p_alcohol_female: float = 0.02
    p_secondary: float = 0.08
    p_parental_hip_fracture: float = 0.12
    menopause_age_mean: float = 50.0
    menopause_age_sd: float = 3.5


BRIEF_COHORT = CohortPreset(
    name="brief_cohort",
    p_male=0.52,
    age_mean=65.0,
    age_sd=8.3,
    age_min=50.0,
    age_max=95.0,
    bmi_mean=26.7,
    bmi_sd=4.1,
    intercept_female=-2.05,
    intercept_male=-1.05,
    target_shares=(27.0, 42.0, 31.0),
    t_mean=-1.70,
    t_sd=1.315,
)

NHANES_2017 = CohortPreset(
    name="nhanes_2017",
    p_male=0.46,
    age_mean=64.0,
    age_sd=9.5,
    age_min=50.0,
    age_max=95.0,
    bmi_mean=29.6,
    bmi_sd=6.2,
    intercept_female=-1.468,
    intercept_male=-0.345,
    # NHANES reports osteoporosis 12.6 % and low bone mass 43.1 % at FN *or* lumbar spine; with
    # femoral-neck T alone this model gives about 12.8 / 34.6 / 52.6 %. Only the osteoporosis
    # share is a calibration target for this preset.
    target_shares=(12.6, 34.6, 52.8),
    t_mean=-0.91,
    t_sd=1.38,
)

PRESETS: dict[str, CohortPreset] = {p.name: p for p in (BRIEF_COHORT, NHANES_2017)}


def get_preset(name: str) -> CohortPreset:
    """Return a preset by name; a typo is a usage error, not a silent default."""
    try:
        return PRESETS[name]
    except KeyError:
        from osteofy.errors import UsageError

        raise UsageError(
            f"unknown cohort preset {name!r} (choose from {', '.join(PRESETS)})"
        ) from None
