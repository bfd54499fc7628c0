"""Rendering: determinism, ground truth and that bone status is what changes the bone."""

from __future__ import annotations

import numpy as np
import pytest

from cohort.plan import plan_cohort
from cohort.render import render_case
from cohort.sites import CaseInputs

SITES = ["hand", "hip"]


def _at_t(plan, i: int, t: float) -> CaseInputs:  # type: ignore[no-untyped-def]
    one_p = {k: v[i : i + 1] for k, v in plan.patients.items()}
    one_v = {k: v[i : i + 1] for k, v in plan.variation.items()}
    bm = plan.site.biomarkers(np.array([t]), one_v, one_p)
    base = plan.case(i)
    return CaseInputs(
        base.patient, base.variation, {k: v[0].item() for k, v in bm.items()}, base.nuisance
    )


@pytest.mark.parametrize("site", SITES)
def test_same_seed_gives_identical_pixels_and_masks(site: str) -> None:
    plan = plan_cohort(site, 2, seed=5)
    a = render_case(plan.site, plan.case(1), plan.render_seed(1), max_side=320)
    b = render_case(plan.site, plan.case(1), plan.render_seed(1), max_side=320)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.masks.keys() == b.masks.keys()
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


@pytest.mark.parametrize("site", SITES)
def test_other_seed_gives_other_patients_and_pixels(site: str) -> None:
    a = plan_cohort(site, 3, seed=1)
    b = plan_cohort(site, 3, seed=2)
    assert not np.allclose(a.patients["tscore"], b.patients["tscore"])
    ra = render_case(a.site, a.case(0), a.render_seed(0), max_side=256)
    rb = render_case(b.site, b.case(0), b.render_seed(0), max_side=256)
    assert ra.pixels.shape != rb.pixels.shape or not np.array_equal(ra.pixels, rb.pixels)


@pytest.mark.parametrize("site", SITES)
def test_stored_values_respect_bits_stored_and_required_masks_exist(site: str) -> None:
    plan = plan_cohort(site, 4, seed=8)
    for i in range(4):
        r = render_case(plan.site, plan.case(i), plan.render_seed(i), max_side=256)
        bits = int(plan.nuisance["bits_stored"][i])
        assert r.pixels.dtype == np.uint16
        assert int(r.pixels.max()) <= (1 << bits) - 1
        for name in ("body", "bone", "signal"):
            assert r.masks[name].shape == r.pixels.shape
            assert r.masks[name].any(), name
        assert bool(plan.nuisance["marker"][i]) == ("marker" in r.masks)


@pytest.mark.parametrize("site", SITES)
def test_counterfactual_map_lives_in_the_signal_structures(site: str) -> None:
    plan = plan_cohort(site, 1, seed=3)
    cf, cf_t = plan.counterfactual(0)
    r = render_case(
        plan.site,
        plan.case(0),
        plan.render_seed(0),
        max_side=384,
        counterfactual=cf,
        counterfactual_t=cf_t,
    )
    assert r.counterfactual is not None
    a = r.counterfactual.astype(np.float64)
    signal = r.masks["signal"]
    inside = a[signal].sum() / a.sum()
    assert a.sum() > 0
    # Low-pass filtering spills a little outside; most of the map is on the bone.
    assert inside > 0.8, inside
    assert abs(abs(cf_t - float(plan.t_site[0])) - 1.5) < 1e-9


def test_hand_cortex_thins_with_bone_loss_same_patient() -> None:
    """Same patient, anatomy and nuisance: lower t -> less projected bone in the MC ROI."""
    plan = plan_cohort("hand", 1, seed=21)
    from cohort.geometry import Scene
    from cohort.render import placement_for

    totals = []
    for t in (0.0, -1.5, -3.0):
        case = _at_t(plan, 0, t)
        scene = Scene(placement_for(case.nuisance, 384))
        plan.site.build(scene, case, np.random.default_rng(0))
        roi = scene.masks["mc_cortex_roi"] | scene.masks["mc_medullary"]
        totals.append(float(scene.paths["bone"][roi].sum()))
    assert totals[0] > totals[1] > totals[2]
