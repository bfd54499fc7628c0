"""One answer from the model's outputs: class, T-score estimate and referral, by the card's rule.

The same function decides on the device, in ``osteofy evaluate`` and in the quantization gates,
so what is measured is what is shown. Reference packages carry the ordinal rule
(``model.ordinal``): the class is the WHO band of the T-score estimate and referral is
P(osteoporosis) >= a threshold that lies above the floor a normal answer can reach and at or
below 0.5, so the three cannot disagree. Earlier packages (``softmax-v1``) take the most probable
class, with a T-score from a separate regression that may disagree with it (``contradictions``
counts such answers; ``osteofy evaluate`` reports them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from osteofy.errors import Unavailable

CLASSES = ("normal", "osteopenia", "osteoporosis")
WHO_CUTS = (-1.0, -2.5)


def who_band(tscore: float | NDArray) -> NDArray:
    """WHO class index of T-scores: 0 normal (T >= -1), 1 osteopenia, 2 osteoporosis (T <= -2.5)."""
    t = np.asarray(tscore, dtype=float)
    return np.where(t <= WHO_CUTS[1], 2, np.where(t < WHO_CUTS[0], 1, 0))


def band_safe_round(tscore: float, decimals: int = 2) -> float:
    """``tscore`` rounded without leaving its WHO band (so -2.496, osteopenia, is not -2.50).

    A shown T-score that reads as another band than the class beside it would be a
    contradiction made by rounding alone; the one step back inside the band is at most
    ``10**-decimals``.
    """
    t = float(tscore)
    r = round(t, decimals)
    if int(who_band(r)) == int(who_band(t)):
        return r
    step = 10.0**-decimals
    return round(r + step if r < t else r - step, decimals)


def tscore_text(tscore: float) -> str:
    """A T-score as a clinician reads it: one decimal, two where one would cross a WHO cut."""
    t = float(tscore)
    one = round(t, 1)
    shown = f"{one:.1f}" if int(who_band(one)) == int(who_band(t)) else f"{band_safe_round(t):.2f}"
    return shown.replace("-", "\u2212")


@dataclass(frozen=True)
class AnswerRule:
    ordinal: bool
    threshold: float

    @classmethod
    def from_card(cls, card: dict) -> AnswerRule:
        try:
            threshold = float(card["referral"]["threshold"])
        except (KeyError, TypeError, ValueError):
            raise Unavailable("model card has no referral threshold") from None
        rule = card.get("answer", {}).get("class_rule", "argmax")
        if rule == "who_band_of_tscore":
            cuts = tuple(float(c) for c in card["answer"].get("cuts", ()))
            floor = float(card["referral"].get("floor", 0.0))
            if cuts != WHO_CUTS:
                raise Unavailable(f"model card's WHO cut points {cuts} are not {WHO_CUTS}")
            if not floor < threshold <= 0.5:
                raise Unavailable(
                    f"model card's referral threshold {threshold:g} is outside ({floor:g}, 0.5]: "
                    "its answers could contradict themselves"
                )
            return cls(True, threshold)
        if rule != "argmax":
            raise Unavailable(f"model card's class rule {rule!r} is not known to this software")
        if not 0.0 < threshold < 1.0:
            raise Unavailable(f"model card's referral threshold {threshold:g} is not in (0, 1)")
        return cls(False, threshold)

    def classes(self, probs: NDArray, tscore: NDArray) -> NDArray:
        """Class indices for rows of probabilities [N, 3] and T-score estimates [N]."""
        if self.ordinal:
            return who_band(np.asarray(tscore, dtype=float).reshape(-1))
        return np.asarray(probs).reshape(-1, 3).argmax(1)

    def refer(self, probs: NDArray) -> NDArray:
        return np.asarray(probs).reshape(-1, 3)[:, 2] >= self.threshold


ARGMAX = AnswerRule(False, 0.5)  # the most probable class (what older comparisons assumed)


def contradictions(rule: AnswerRule, probs: NDArray, tscore: NDArray) -> dict[str, int]:
    """Counts of answers that disagree with themselves, by kind (0 everywhere for the ordinal rule).

    - ``class_vs_tscore``: the class is not the WHO band of the T-score estimate;
    - ``class_vs_probs``: the class is not the median band of its probabilities (P of a worse
      class >= 0.5, or P of a better class >= 0.5);
    - ``osteoporosis_not_referred`` and ``normal_referred``: referral against the class.
    """
    probs = np.asarray(probs, dtype=float).reshape(-1, 3)
    k = rule.classes(probs, tscore)
    refer = rule.refer(probs)
    worse = np.where(k == 0, probs[:, 1] + probs[:, 2], np.where(k == 1, probs[:, 2], 0.0))
    better = np.where(k == 2, probs[:, 0] + probs[:, 1], np.where(k == 1, probs[:, 0], 0.0))
    return {
        "class_vs_tscore": int((k != who_band(np.asarray(tscore).reshape(-1))).sum()),
        "class_vs_probs": int(((worse > 0.5) | (better > 0.5)).sum()),
        "osteoporosis_not_referred": int(((k == 2) & ~refer).sum()),
        "normal_referred": int(((k == 0) & refer).sum()),
    }
