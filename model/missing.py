"""Missing-fact dropout: during training, facts are hidden the way clinics fail to know them.

A clinic often sends only what the DICOM header carries (age, sex, weight); sometimes it also
knows height or the FRAX risk factors, sometimes not even the weight. Training hides facts in
those patterns so that the model is right — and calibrated — with whatever a clinic knows, and
never needs a fact to be guessed (an unknown fact is 0 with its missing flag set).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from edge.clinical import ANTHROPOMETRY, HEADER_FACTS, RISK_FACTORS, ClinicalSpec, clinical_vector
from model.data import Dataset


class DropConfig(Protocol):
    p_header_only: float
    p_drop_risk_all: float
    p_drop_risk_each: float
    p_drop_anthro: float
    p_drop_age_sex: float


def clinical_matrix(ds: Dataset, spec: ClinicalSpec) -> np.ndarray:
    return np.stack([clinical_vector(f, spec) for f in ds.facts]).astype(np.float32)


def drop_mask(n: int, spec: ClinicalSpec, cfg: DropConfig, gen: torch.Generator) -> torch.Tensor:
    """[n, K] boolean: which facts to hide for this batch.

    A share ``p_header_only`` of the rows keeps only the header facts; the others lose facts
    in the groups a clinic asks together (all risk factors, the measurements) or one by one.
    """
    k = len(spec.names)
    idx = {name: i for i, name in enumerate(spec.names)}
    drop = torch.zeros(n, k, dtype=torch.bool)

    def rand(p: float, cols: int = 1) -> torch.Tensor:
        return torch.rand(n, cols, generator=gen) < p

    risk = [idx[r] for r in RISK_FACTORS if r in idx]
    anthro = [idx[a] for a in ANTHROPOMETRY if a in idx]
    drop[:, risk] = rand(cfg.p_drop_risk_all) | rand(cfg.p_drop_risk_each, len(risk))
    drop[:, anthro] = rand(cfg.p_drop_anthro)
    for name in ("age_years", "sex_male"):
        if name in idx:
            drop[:, [idx[name]]] = rand(cfg.p_drop_age_sex)
    header = rand(cfg.p_header_only)[:, 0]
    if header.any():
        keep = torch.tensor(
            [("bmi" if n == "bmi_below_27" else n) in HEADER_FACTS for n in spec.names]
        )
        drop[header] = ~keep
    return drop


def hide_facts(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    k = drop.shape[1]
    x = x.clone()
    values, flags = x[:, :k], x[:, k:]
    values[drop] = 0.0
    flags[drop] = 1.0
    return x
