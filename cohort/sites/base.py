"""What every imaged site provides (docs/cohort.md §3.4-3.7).

A site is three pure steps, so the same patient can be re-drawn at another bone status
(the counterfactual of §3.10) and the biomarkers can be checked without rendering:

1. ``sample_variation``: anatomical variation independent of bone status (widths, lengths,
   per-biomarker noise), vectorised over patients;
2. ``biomarkers``: the BMD-carrying parameters, a deterministic function of the site T-score
   and that variation, vectorised;
3. ``build``: draw one case's anatomy into a ``Scene`` (path lengths and masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from cohort.geometry import Scene
from cohort.nuisance import AcquisitionSpec
from cohort.sampler import Table


@dataclass(frozen=True)
class CaseInputs:
    """One case's values, as plain scalars (rows of the cohort tables)."""

    patient: dict
    variation: dict
    biomarkers: dict
    nuisance: dict


class Site(Protocol):
    name: ClassVar[str]
    body_part: ClassVar[str]
    view_position: ClassVar[str]
    acquisition: ClassVar[AcquisitionSpec]
    # Columns of ``biomarkers`` reported in the manifest and checked against T.
    biomarker_columns: ClassVar[tuple[str, ...]]

    def sample_variation(self, patients: Table, rng: np.random.Generator) -> Table: ...

    def biomarkers(self, t_site: np.ndarray, variation: Table, patients: Table) -> Table: ...

    def build(self, scene: Scene, case: CaseInputs, rng: np.random.Generator) -> None:
        """Draw the anatomy. Must set masks 'body' (anatomy incl. soft tissue), 'bone' and
        'signal' (structures whose parameters depend on the site T-score), plus site ROIs."""
        ...

    def scatter_scale(self, case: CaseInputs) -> float:
        """Multiplier of the nuisance SPR from the patient's build (thicker -> more scatter)."""
        ...
