"""The patient sampler and site model against docs/cohort.md §3.1/§3.11 (synthetic cohort)."""

from __future__ import annotations

import numpy as np
import pytest

from cohort.check import check_plan
from cohort.presets import NHANES_2017, get_preset
from cohort.sampler import sample_patients
from osteofy.errors import UsageError


@pytest.mark.parametrize("site", ["hand", "hip"])
def test_sampler_acceptance_checks_hold_at_20000(site: str) -> None:
    report = check_plan(site, 20000, seed=1)
    failed = [c.line() for c in report.checks if not c.ok]
    assert not failed, "\n".join(failed)
    names = {c.name for c in report.checks}
    assert "shortcut: nuisance/header-only AUROC" in names
    assert report.oracle["fused"] > report.oracle["image"]
    assert report.oracle["fused"] > report.oracle["clinical"]


def test_brief_cohort_class_shares_within_two_points() -> None:
    p = sample_patients(20000, np.random.default_rng(3), get_preset("brief_cohort"))
    shares = [100 * np.mean(p["class_index"] == k) for k in (2, 1, 0)]
    for share, target in zip(shares, (27, 42, 31), strict=True):
        assert abs(share - target) <= 2.0


def test_nhanes_preset_matches_sex_specific_osteoporosis_prevalence() -> None:
    p = sample_patients(100000, np.random.default_rng(4), NHANES_2017)
    male = p["sex_male"] == 1
    assert abs(100 * np.mean(p["tscore"][~male] <= -2.5) - 19.6) < 1.0
    assert abs(100 * np.mean(p["tscore"][male] <= -2.5) - 4.4) < 0.7


def test_preset_t_moments_match_the_constants_used_by_the_site_model() -> None:
    for name in ("brief_cohort", "nhanes_2017"):
        preset = get_preset(name)
        t = sample_patients(100000, np.random.default_rng(5), preset)["tscore"]
        assert abs(t.mean() - preset.t_mean) < 0.03
        assert abs(t.std() - preset.t_sd) < 0.03


def test_same_seed_same_patients_other_seed_other_patients() -> None:
    preset = get_preset("brief_cohort")
    a = sample_patients(50, np.random.default_rng(9), preset)
    b = sample_patients(50, np.random.default_rng(9), preset)
    c = sample_patients(50, np.random.default_rng(10), preset)
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert not np.allclose(a["tscore"], c["tscore"])


def test_unknown_preset_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown cohort preset"):
        get_preset("nhanes")


def test_men_have_no_menopause_and_women_do() -> None:
    p = sample_patients(200, np.random.default_rng(1), get_preset("brief_cohort"))
    male = p["sex_male"] == 1
    assert np.isnan(p["years_since_menopause"][male]).all()
    assert (p["years_since_menopause"][~male] >= 0).all()


def test_shifted_acquisitions_differ_but_patients_do_not() -> None:
    from cohort.plan import plan_cohort

    base = plan_cohort("hand", 500, 3)
    shifted = plan_cohort("hand", 500, 3, shift="detector_dose_position")
    assert np.array_equal(base.patients["tscore"], shifted.patients["tscore"])
    assert set(shifted.nuisance["detector"]) == {"CR"}
    assert shifted.nuisance["dose_scale"].max() <= 0.6
    assert np.abs(shifted.nuisance["rotation_deg"]).max() > 10.0


def test_unknown_shift_is_a_usage_error() -> None:
    from cohort.plan import plan_cohort

    with pytest.raises(UsageError, match="unknown shift"):
        plan_cohort("hand", 5, 1, shift="everything")
