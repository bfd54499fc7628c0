from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.stats import auroc, fit_logistic, predict_logistic, standardise


def _auroc_bruteforce(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = score[y], score[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auroc_matches_pairwise_definition_with_ties(pairs: list[tuple[int, bool]]) -> None:
    score = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs])
    if y.all() or not y.any():
        return
    assert abs(auroc(score, y) - _auroc_bruteforce(score, y)) < 1e-12


def test_logistic_recovers_a_known_separating_direction() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 3))
    p = 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 2])))
    y = rng.random(4000) < p
    z, _, _ = standardise(x)
    w = fit_logistic(z, y)
    assert w[1] > 1.5 and w[3] < -0.7 and abs(w[2]) < 0.2
    assert auroc(predict_logistic(w, z), y) > 0.8
