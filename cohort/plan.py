"""A cohort plan: every per-case value of a virtual cohort, drawn before any pixel is rendered.

Patients, site T-scores, anatomical variation, biomarkers and nuisance are sampled vectorised
from independent streams of one seed. The plan is all the acceptance checks need (docs/cohort.md
§3.11), so a 20 000-patient check takes a second, and rendering can be spread over processes
without changing a single value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohort.latent import site_tscore
from cohort.nuisance import apply_shift, row, sample_nuisance
from cohort.presets import CohortPreset, get_preset
from cohort.render import COUNTERFACTUAL_DELTA
from cohort.sampler import Table, sample_patients
from cohort.sites import CaseInputs, Site, get_site

_SITE_CODES = {"hand": 1, "hip": 2, "dental": 3, "knee": 4}


@dataclass(frozen=True)
class CohortPlan:
    site: Site
    preset: CohortPreset
    seed: int
    patients: Table
    t_site: np.ndarray
    variation: Table
    biomarkers: Table
    nuisance: Table

    @property
    def n(self) -> int:
        return int(self.t_site.shape[0])

    def case(self, i: int) -> CaseInputs:
        return CaseInputs(
            patient=row(self.patients, i),
            variation=row(self.variation, i),
            biomarkers=row(self.biomarkers, i),
            nuisance=row(self.nuisance, i),
        )

    def counterfactual(self, i: int) -> tuple[CaseInputs, float]:
        """The same case at t_s +/- 1.5 (towards the cohort mean, so it stays in range)."""
        t = float(self.t_site[i])
        t_cf = t + COUNTERFACTUAL_DELTA if t < self.preset.t_mean else t - COUNTERFACTUAL_DELTA
        one = {k: v[i : i + 1] for k, v in self.patients.items()}
        var = {k: v[i : i + 1] for k, v in self.variation.items()}
        bm = self.site.biomarkers(np.array([t_cf]), var, one)
        case = self.case(i)
        return CaseInputs(case.patient, case.variation, row(bm, 0), case.nuisance), t_cf

    def render_seed(self, i: int) -> list[int]:
        return [self.seed, _SITE_CODES.get(self.site.name, 0), i]


def plan_cohort(
    site_name: str, n: int, seed: int, preset_name: str = "brief_cohort", shift: str | None = None
) -> CohortPlan:
    site = get_site(site_name)
    preset = get_preset(preset_name)
    streams = np.random.SeedSequence([seed, _SITE_CODES.get(site_name, 0)]).spawn(5)
    rng_pat, rng_site, rng_var, rng_nz, rng_shift = (np.random.default_rng(s) for s in streams)
    patients = sample_patients(n, rng_pat, preset)
    t_site = site_tscore(patients["tscore"], site.name, rng_site, preset)
    variation = site.sample_variation(patients, rng_var)
    biomarkers = site.biomarkers(t_site, variation, patients)
    nuisance = sample_nuisance(n, rng_nz, site.acquisition)
    if shift is not None:
        nuisance = apply_shift(nuisance, shift, rng_shift, site.acquisition)
    return CohortPlan(site, preset, seed, patients, t_site, variation, biomarkers, nuisance)
