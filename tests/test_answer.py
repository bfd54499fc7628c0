"""One answer from the outputs, by the card's rule (``edge.answer``), and its contradictions."""

from __future__ import annotations

import numpy as np
import pytest

from edge.answer import AnswerRule, band_safe_round, contradictions, tscore_text, who_band
from osteofy.errors import Unavailable

ORDINAL = {
    "answer": {"class_rule": "who_band_of_tscore", "cuts": [-1.0, -2.5]},
    "referral": {"threshold": 0.2, "floor": 0.1},
}


def test_who_bands_at_their_edges() -> None:
    assert who_band(np.array([-2.5, -2.49, -1.0, -1.01, 0.3])).tolist() == [2, 1, 0, 1, 0]


def test_ordinal_rule_takes_the_band_of_the_tscore_not_the_largest_probability() -> None:
    rule = AnswerRule.from_card(ORDINAL)
    probs = np.array([[0.09, 0.45, 0.46]])  # just above -2.5: osteoporosis is the largest band
    assert rule.classes(probs, np.array([-2.45])).tolist() == [1]
    assert rule.refer(probs).tolist() == [True]
    found = contradictions(rule, probs, np.array([-2.45]))
    assert found == dict.fromkeys(found, 0)


@pytest.mark.parametrize(
    ("referral", "match"),
    [
        ({"threshold": 0.6, "floor": 0.1}, "outside"),
        ({"threshold": 0.05, "floor": 0.1}, "outside"),
        ({"floor": 0.1}, "no referral threshold"),
    ],
)
def test_an_ordinal_card_whose_threshold_could_contradict_is_refused(
    referral: dict, match: str
) -> None:
    with pytest.raises(Unavailable, match=match):
        AnswerRule.from_card({**ORDINAL, "referral": referral})


def test_unknown_rules_and_cut_points_are_refused() -> None:
    with pytest.raises(Unavailable, match="not known"):
        AnswerRule.from_card({"answer": {"class_rule": "vote"}, "referral": {"threshold": 0.3}})
    bad = {**ORDINAL, "answer": {"class_rule": "who_band_of_tscore", "cuts": [-1.0, -2.0]}}
    with pytest.raises(Unavailable, match="cut points"):
        AnswerRule.from_card(bad)


def test_the_earlier_argmax_rule_and_the_contradictions_it_allows_are_counted() -> None:
    rule = AnswerRule.from_card({"referral": {"threshold": 0.3}})
    probs = np.array(
        [
            [0.2, 0.6, 0.2],  # osteopenia beside T -2.6: class vs T-score
            [0.1, 0.1, 0.8],  # osteoporosis, referred: fine
            [0.6, 0.05, 0.35],  # normal, but referred
        ]
    )
    found = contradictions(rule, probs, np.array([-2.6, -3.0, -0.5]))
    assert found["class_vs_tscore"] == 1
    assert found["normal_referred"] == 1
    assert found["osteoporosis_not_referred"] == 0


def test_quantization_agreement_is_measured_on_the_answer_the_screen_shows() -> None:
    """Two outputs with the same T-score band but a different largest probability agree."""
    from quantize.fidelity import Outputs, compare

    cam = np.ones((2, 3, 4, 4), dtype=np.float32)
    ood = np.zeros(2, dtype=np.float32)
    labels = np.array([1, 2])
    p_ref = np.array([[0.09, 0.45, 0.46], [0.0, 0.2, 0.8]])
    p_q = np.array([[0.09, 0.47, 0.44], [0.0, 0.2, 0.8]])
    ref = Outputs(p_ref, np.array([-2.45, -3.0]), cam, ood)
    q = Outputs(p_q, np.array([-2.40, -3.1]), cam, ood)
    by_band = compare(ref, q, labels, np.array([-2.4, -3.0]), 1.0, AnswerRule.from_card(ORDINAL))
    assert by_band["class_rule"] == "who_band_of_tscore"
    assert by_band["top1_agreement"] == 1.0 and by_band["referral_agreement"] == 1.0
    by_argmax = compare(ref, q, labels, np.array([-2.4, -3.0]), 1.0)
    assert by_argmax["top1_agreement"] == 0.5


@pytest.mark.parametrize(
    ("t", "stored", "shown"),
    [
        (-2.496, -2.49, "\u22122.49"),  # osteopenia: one decimal (-2.5) would read osteoporosis
        (-2.46, -2.46, "\u22122.46"),
        (-2.54, -2.54, "\u22122.5"),  # osteoporosis: -2.5 is inside its band
        (-1.004, -1.01, "\u22121.01"),  # osteopenia: -1.0 would read normal
        (-0.96, -0.96, "\u22121.0"),  # normal: -1.0 is still normal
        (0.31, 0.31, "0.3"),
    ],
)
def test_a_shown_tscore_never_reads_as_another_band(t: float, stored: float, shown: str) -> None:
    assert band_safe_round(t) == stored and tscore_text(t) == shown
    assert who_band(band_safe_round(t)) == who_band(t)
    assert who_band(float(tscore_text(t).replace("\u2212", "-"))) == who_band(t)
