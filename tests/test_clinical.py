"""Clinical facts -> model input: unknowns are flagged, never invented."""

from __future__ import annotations

import numpy as np
import pytest

from edge.clinical import FEATURE_NAMES, all_missing, clinical_vector, complete_facts, fit_spec
from osteofy.errors import InputRejected

SPEC = fit_spec(
    [
        {"age_years": 60, "weight_kg": 70, "height_m": 1.7, "sex": "F"},
        {"age_years": 70, "weight_kg": 80, "height_m": 1.6, "sex": "M"},
    ]
)
K = len(FEATURE_NAMES)


def test_unknown_facts_are_zero_with_flag_set() -> None:
    v = clinical_vector({}, SPEC)
    assert v.shape == (2 * K,)
    assert np.all(v[:K] == 0) and np.all(v[K:] == 1)


def test_bmi_is_derived_from_weight_and_height_only_when_both_known() -> None:
    assert complete_facts({"weight_kg": 81, "height_m": 1.8})["bmi"] == pytest.approx(25.0)
    assert complete_facts({"weight_kg": 81})["bmi"] is None
    assert complete_facts({"weight_kg": 81, "height_m": 1.8})["bmi_below_27"] == pytest.approx(-2.3)


def test_sex_parsing_and_empty_cells() -> None:
    assert complete_facts({"sex": "M"})["sex_male"] == 1.0
    assert complete_facts({"sex_male": "F"})["sex_male"] == 0.0
    assert complete_facts({"smoking": ""})["smoking"] is None


@pytest.mark.parametrize("facts", [{"age_years": 300}, {"weight_kg": "heavy"}, {"sex": "X"}])
def test_implausible_values_are_rejected_with_the_value(facts: dict) -> None:
    with pytest.raises(InputRejected, match="clinical fact"):
        clinical_vector(facts, SPEC)


def test_all_missing_is_the_image_only_input() -> None:
    x = np.random.default_rng(0).standard_normal((4, 2 * K)).astype(np.float32)
    m = all_missing(x)
    assert np.all(m[:, :K] == 0) and np.all(m[:, K:] == 1)


def test_card_round_trip() -> None:
    from edge.clinical import ClinicalSpec

    assert ClinicalSpec.from_card(SPEC.to_card()) == SPEC
    assert SPEC.to_card()["input_names"][K] == f"{FEATURE_NAMES[0]}_missing"
