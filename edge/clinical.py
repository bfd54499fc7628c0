"""Clinical facts -> the model's ``clinical`` input vector, the same on the device and in training.

Every fact may be unknown: a real clinic often does not know the risk factors, and sometimes not
weight or height. An unknown value is passed as 0 with its missing flag set to 1, never guessed.
BMI is derived from weight and height when not given; ``bmi_below_27`` is a derived hinge,
min(BMI - 27.3, 0), because BMI's effect on bone density is steeper below 27.3 [COHORT S29d].

The vector is [value_1 .. value_K, missing_1 .. missing_K] in the card's order, continuous values
standardised with the training set's mean and SD (stored in the card).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from osteofy.errors import InputRejected

# (name, kind, plausible range) — kind "continuous" is standardised, "binary" is 0/1.
FEATURES: tuple[tuple[str, str, tuple[float, float]], ...] = (
    ("age_years", "continuous", (18.0, 110.0)),
    ("sex_male", "binary", (0.0, 1.0)),
    ("weight_kg", "continuous", (25.0, 250.0)),
    ("height_m", "continuous", (1.2, 2.2)),
    ("bmi", "continuous", (12.0, 70.0)),
    ("bmi_below_27", "continuous", (-20.0, 0.0)),
    ("prior_fracture", "binary", (0.0, 1.0)),
    ("parental_hip_fracture", "binary", (0.0, 1.0)),
    ("smoking", "binary", (0.0, 1.0)),
    ("glucocorticoids", "binary", (0.0, 1.0)),
    ("rheumatoid_arthritis", "binary", (0.0, 1.0)),
    ("alcohol", "binary", (0.0, 1.0)),
    ("secondary_osteoporosis", "binary", (0.0, 1.0)),
)
FEATURE_NAMES = tuple(f[0] for f in FEATURES)
RISK_FACTORS = tuple(n for n, kind, _ in FEATURES if kind == "binary" and n != "sex_male")
ANTHROPOMETRY = ("weight_kg", "height_m", "bmi", "bmi_below_27")
# The facts a person can be asked for (the derived ones are computed).
INPUT_FACTS = tuple(n for n in FEATURE_NAMES if n not in ("bmi_below_27",))
# What most clinics send in a DICOM header (Patient's Age, Sex, Weight; Patient's Size is often
# empty): the fact set the model must also be calibrated for.
HEADER_FACTS = ("age_years", "sex_male", "weight_kg")


@dataclass(frozen=True)
class ClinicalSpec:
    """Feature order and normalisation, as written in the model card."""

    names: tuple[str, ...]
    mean: tuple[float, ...]
    sd: tuple[float, ...]

    @property
    def width(self) -> int:
        return 2 * len(self.names)

    def input_names(self) -> list[str]:
        return [*self.names, *(f"{n}_missing" for n in self.names)]

    def to_card(self) -> dict:
        return {
            "features": [
                {"name": n, "kind": _KIND[n], "mean": m, "sd": s}
                for n, m, s in zip(self.names, self.mean, self.sd, strict=True)
            ],
            "layout": "values then missing flags, in this order",
            "input_names": self.input_names(),
        }

    @classmethod
    def from_card(cls, card: dict) -> ClinicalSpec:
        feats = card["features"]
        return cls(
            names=tuple(f["name"] for f in feats),
            mean=tuple(float(f["mean"]) for f in feats),
            sd=tuple(float(f["sd"]) for f in feats),
        )


_KIND = {n: k for n, k, _ in FEATURES}
_RANGE = {n: r for n, _, r in FEATURES}


def _number(facts: Mapping, name: str) -> float | None:
    v = facts.get(name)
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, str) and name == "sex_male":
        s = v.strip().upper()
        if s in ("M", "MALE"):
            return 1.0
        if s in ("F", "FEMALE"):
            return 0.0
        if s in ("O", "OTHER", "U", "UNKNOWN"):
            return None
        raise InputRejected(f"clinical fact sex: {v!r} is not M or F")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise InputRejected(f"clinical fact {name}: {v!r} is not a number") from None
    if math.isnan(x):
        return None
    lo, hi = _RANGE.get(name, (-math.inf, math.inf))
    if not lo <= x <= hi:
        raise InputRejected(f"clinical fact {name}: {x:g} is outside the plausible {lo:g}-{hi:g}")
    return x


def complete_facts(facts: Mapping) -> dict[str, float | None]:
    """Parse and validate the facts, deriving BMI and the BMI hinge where possible."""
    out: dict[str, float | None] = {n: _number(facts, n) for n in INPUT_FACTS}
    if "sex" in facts and out["sex_male"] is None:
        out["sex_male"] = _number({"sex_male": facts["sex"]}, "sex_male")
    w, h = out["weight_kg"], out["height_m"]
    if out["bmi"] is None and w is not None and h is not None:
        out["bmi"] = w / (h * h)
    bmi = out["bmi"]
    out["bmi_below_27"] = None if bmi is None else min(bmi - 27.3, 0.0)
    return out


def clinical_vector(facts: Mapping, spec: ClinicalSpec) -> NDArray:
    """One patient's facts -> float32 [2K] (values, then missing flags)."""
    done = complete_facts(facts)
    k = len(spec.names)
    vec = np.zeros(2 * k, dtype=np.float32)
    for i, name in enumerate(spec.names):
        x = done.get(name)
        if x is None:
            vec[k + i] = 1.0
        else:
            vec[i] = (x - spec.mean[i]) / spec.sd[i]
    return vec


def fit_spec(rows: list[Mapping], names: tuple[str, ...] = FEATURE_NAMES) -> ClinicalSpec:
    """Mean and SD of each continuous feature over the known values of a training set."""
    means, sds = [], []
    parsed = [complete_facts(r) for r in rows]
    for name in names:
        if _KIND[name] == "binary":
            means.append(0.0)
            sds.append(1.0)
            continue
        vals = np.array([p[name] for p in parsed if p.get(name) is not None], dtype=float)
        means.append(float(vals.mean()) if vals.size else 0.0)
        sd = float(vals.std()) if vals.size > 1 else 1.0
        sds.append(sd if sd > 1e-6 else 1.0)
    return ClinicalSpec(names=names, mean=tuple(means), sd=tuple(sds))


def only_facts(clinical: NDArray, spec: ClinicalSpec, keep: tuple[str, ...]) -> NDArray:
    """The same vectors with every fact outside ``keep`` made unknown (value 0, flag 1)."""
    k = len(spec.names)
    out = clinical.copy()
    for i, name in enumerate(spec.names):
        base = "bmi" if name == "bmi_below_27" else name
        if base not in keep:
            out[..., i] = 0.0
            out[..., k + i] = 1.0
    return out


def all_missing(clinical: NDArray) -> NDArray:
    """Every fact unknown (values 0, flags 1): the clinical input of an image-only model."""
    k = clinical.shape[1] // 2
    out = np.zeros_like(clinical)
    out[:, k:] = 1.0
    return out
