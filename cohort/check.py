"""Acceptance checks of a virtual cohort (docs/cohort.md §3.11) and its oracle ceiling.

The oracle is the Bayes-optimal posterior P(T <= -2.5 | what a model could know), computed from
the generator's own latent equations on a grid of T values:
- clinical: the §3.1 structural equation (age, sex, BMI, height, risk factors) plus the
  prior-fracture likelihood, which also depends on T;
- image: the site status t_s, i.e. a perfect reading of the radiograph's bone signal (§3.2);
- fused: both.
No model trained on this cohort can beat these AUROCs in expectation; they are the ceiling.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cohort.latent import SITE_RHO
from cohort.presets import CohortPreset, get_preset
from cohort.sampler import RISK_FACTORS, Table, deterministic_t, prior_fracture_logit
from cohort.stats import auroc, holdout_logistic_auroc, pearson

MIN_N_FOR_SHARES = 2000
MIN_N_FOR_MEANS = 200
MIN_N_FOR_AUROC = 500  # below this, AUROC and correlation checks are reported, not judged
# Nuisance columns that are patient-dependent by construction (none today) are excluded from the
# shortcut test; so are patient characteristics (age, sex, weight, size), which are legitimate
# clinical inputs, not shortcuts.
_SHORTCUT_EXCLUDE: frozenset[str] = frozenset({"photons_per_pixel"})  # = nominal x dose_scale


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    low: float | None
    high: float | None
    note: str = ""
    assessed: bool = True

    @property
    def ok(self) -> bool:
        if not self.assessed:
            return True
        lo_ok = self.low is None or self.value >= self.low
        hi_ok = self.high is None or self.value <= self.high
        return lo_ok and hi_ok

    def line(self) -> str:
        rng = (
            f"[{'' if self.low is None else f'{self.low:g}'}, "
            f"{'' if self.high is None else f'{self.high:g}'}]"
        )
        status = "PASS" if self.assessed and self.ok else ("n/a " if not self.assessed else "FAIL")
        return f"{status}  {self.name:<46} {self.value:8.3f}  {rng:<16} {self.note}"


@dataclass(frozen=True)
class Report:
    site: str
    n: int
    checks: list[Check]
    oracle: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [
            f"virtual cohort check: site={self.site} n={self.n} (synthetic data; not clinical)",
            "",
            *[c.line() for c in self.checks],
            "",
            "oracle AUROC, osteoporosis vs rest (the ceiling any model can reach on this cohort):",
        ]
        lines += [f"  {k:<10} {v:.3f}" for k, v in self.oracle.items()]
        lines.append("")
        lines.append("all checks passed" if self.ok else "SOME CHECKS FAILED")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "site": self.site,
            "n": self.n,
            "ok": self.ok,
            "checks": [
                {
                    "name": c.name,
                    "value": c.value,
                    "low": c.low,
                    "high": c.high,
                    "assessed": c.assessed,
                    "ok": c.ok,
                    "note": c.note,
                }
                for c in self.checks
            ],
            "oracle_auroc": self.oracle,
        }


def oracle_posteriors(
    patients: Table, t_site: NDArray, site: str, preset: CohortPreset, chunk: int = 20000
) -> dict[str, NDArray]:
    """P(T <= -2.5 | clinical), P(T <= -2.5 | t_s), P(T <= -2.5 | clinical, t_s)."""
    grid = np.linspace(-9.0, 5.0, 561)
    low = grid <= -2.5
    rho = SITE_RHO[site]
    mu, sd = preset.t_mean, preset.t_sd
    img_sd = np.sqrt(1.0 - rho**2) * sd
    prior_mean = deterministic_t(patients, preset)
    out: dict[str, list[NDArray]] = {"clinical": [], "image": [], "fused": []}
    n = prior_mean.shape[0]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        g = grid[None, :]
        lp = -0.5 * ((g - prior_mean[a:b, None]) / preset.residual_sd) ** 2
        logit = prior_fracture_logit(g, patients["age_years"][a:b, None])
        fx = patients["prior_fracture"][a:b, None]
        lp = lp + np.where(fx == 1, -np.logaddexp(0, -logit), -np.logaddexp(0, logit))
        li = -0.5 * ((t_site[a:b, None] - (mu + rho * (g - mu))) / img_sd) ** 2
        # Image-only: the population prior of T (Gaussian with the cohort's mean and SD).
        lpop = -0.5 * ((g - mu) / sd) ** 2
        for key, logp in (("clinical", lp), ("image", lpop + li), ("fused", lp + li)):
            w = np.exp(logp - logp.max(axis=1, keepdims=True))
            out[key].append((w * low).sum(axis=1) / w.sum(axis=1))
    return {k: np.concatenate(v) for k, v in out.items()}


def _clinical_matrix(p: Table) -> NDArray:
    cols = [p["age_years"], p["sex_male"], p["bmi"], p["height_m"], p["weight_kg"]]
    cols += [p[k] for k in RISK_FACTORS]
    return np.column_stack(cols).astype(float)


def _nuisance_matrix(nz: Table) -> tuple[NDArray, list[str]]:
    cols, names = [], []
    for k, v in nz.items():
        if k in _SHORTCUT_EXCLUDE:
            continue
        arr = np.asarray(v)
        if arr.dtype == object or arr.dtype.kind in "US":
            for level in sorted(set(arr.tolist()))[1:]:
                cols.append((arr == level).astype(float))
                names.append(f"{k}={level}")
        else:
            cols.append(arr.astype(float))
            names.append(k)
    return np.column_stack(cols), names


def _safe(fn, *args) -> float:
    """An AUROC or correlation, or NaN where the sample cannot give one (one class only)."""
    try:
        return float(fn(*args))
    except (ValueError, np.linalg.LinAlgError):
        return float("nan")


def evaluate(
    site: str,
    patients: Table,
    t_site: NDArray,
    biomarkers: Table,
    nuisance: Table,
    preset: CohortPreset,
    seed: int = 0,
) -> Report:
    """All §3.11 checks that can be computed from the cohort's tables."""
    rng = np.random.default_rng(seed)
    t = patients["tscore"]
    n = t.shape[0]
    y = patients["class_index"] == 2
    big = n >= MIN_N_FOR_SHARES
    checks: list[Check] = []
    for k, (name, target) in enumerate(
        zip(("osteoporosis", "osteopenia", "normal"), preset.target_shares, strict=True)
    ):
        share = 100.0 * float(np.mean(patients["class_index"] == 2 - k))
        checks.append(
            Check(
                f"class share {name} (%)",
                share,
                target - 2,
                target + 2,
                f"target {target:g}",
                assessed=big,
            )
        )
    for name, col, mean, sd in (
        ("mean age (years)", "age_years", preset.age_mean, preset.age_sd),
        ("mean BMI (kg/m2)", "bmi", preset.bmi_mean, preset.bmi_sd),
    ):
        v = float(np.mean(patients[col]))
        checks.append(
            Check(
                name,
                v,
                mean - 0.5 * sd,
                mean + 0.5 * sd,
                "target +/- 0.5 SD",
                assessed=n >= MIN_N_FOR_MEANS,
            )
        )
    male = float(np.mean(patients["sex_male"]))
    checks.append(
        Check(
            "male share",
            male,
            preset.p_male - 0.05,
            preset.p_male + 0.05,
            assessed=n >= MIN_N_FOR_MEANS,
        )
    )
    stat = n >= MIN_N_FOR_AUROC and bool(y.any()) and not bool(y.all())
    checks.append(
        Check(
            "OST rule AUROC",
            _safe(auroc, -patients["ost"], y),
            0.70,
            0.82,
            "published 0.70-0.82 [S31-S35]",
            assessed=stat,
        )
    )
    clin = _safe(holdout_logistic_auroc, _clinical_matrix(patients), y, rng)
    checks.append(
        Check(
            "clinical logistic AUROC (held-out half)", clin, 0.75, 0.85, "about 0.80", assessed=stat
        )
    )
    if site == "hand" and "mci" in biomarkers:
        checks.append(
            Check(
                "hand MCI vs T (Pearson r)",
                _safe(pearson, biomarkers["mci"], t),
                0.45,
                0.65,
                "r 0.5-0.6 [S1, S5]",
                assessed=stat,
            )
        )
    if site == "hip" and "singh_grade" in biomarkers:
        checks.append(
            Check(
                "Singh grade vs T (Pearson r)",
                _safe(pearson, biomarkers["singh_grade"], t),
                0.25,
                0.55,
                "r 0.3-0.5 [S10, S11]",
                assessed=stat,
            )
        )
    if "hurst" in biomarkers:
        checks.append(
            Check(
                "Hurst H lower in osteoporosis (AUROC)",
                _safe(auroc, -biomarkers["hurst"], y),
                0.62,
                0.80,
                "about 0.7 [S20]",
                assessed=stat,
            )
        )
    oracle: dict[str, float] = {}
    if y.any() and not y.all():
        post = oracle_posteriors(patients, t_site, site, preset)
        oracle = {k: auroc(v, y) for k, v in post.items()}
        gain = oracle["fused"] - max(oracle["clinical"], oracle["image"])
        checks.append(
            Check(
                "oracle fused - max(single modality) AUROC",
                gain,
                0.0,
                None,
                "fusion must help",
                assessed=stat,
            )
        )
    x, _ = _nuisance_matrix(nuisance)
    shortcut = _safe(holdout_logistic_auroc, x, y, rng)
    checks.append(
        Check(
            "shortcut: nuisance/header-only AUROC",
            shortcut,
            None,
            0.55,
            "no label leak",
            assessed=n >= 1000,
        )
    )
    return Report(site, n, checks, oracle)


def check_plan(site: str, n: int, seed: int, preset: str = "brief_cohort") -> Report:
    """Check the sampler and site model without rendering (fast; use N >= 10 000)."""
    from cohort.plan import plan_cohort

    plan = plan_cohort(site, n, seed, preset)
    return evaluate(
        site, plan.patients, plan.t_site, plan.biomarkers, plan.nuisance, plan.preset, seed
    )


def _column(rows: list[dict], key: str) -> NDArray:
    vals = [r[key] for r in rows]
    try:
        return np.asarray([np.nan if v == "" else float(v) for v in vals])
    except ValueError:
        return np.asarray(vals, dtype=object)


def check_directory(folder: Path) -> Report:
    """Check a rendered cohort from its ``manifest.csv`` (and that every file is there)."""

    from osteofy.errors import InputRejected

    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise InputRejected(f"{manifest}: no manifest.csv (not a simulated cohort folder)")
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputRejected(f"{manifest}: empty manifest")
    info_path = folder / "cohort.json"
    preset_name = (
        json.loads(info_path.read_text())["preset"] if info_path.is_file() else "brief_cohort"
    )
    preset = get_preset(preset_name)
    site = rows[0]["site"]
    keys = rows[0].keys()
    patients: Table = {
        k: _column(rows, k)
        for k in ("age_years", "bmi", "height_m", "weight_kg", "tscore", "ost", *RISK_FACTORS)
    }
    patients["sex_male"] = (np.asarray([r["sex"] for r in rows]) == "M").astype(float)
    t = patients["tscore"]
    patients["class_index"] = np.where(t <= -2.5, 2, np.where(t < -1.0, 1, 0))
    biomarkers = {k[3:]: _column(rows, k) for k in keys if k.startswith("bm_")}
    nuisance = {k[3:]: _column(rows, k) for k in keys if k.startswith("nz_")}
    report = evaluate(site, patients, _column(rows, "t_site"), biomarkers, nuisance, preset)
    missing = sum(
        1
        for r in rows
        if not (folder / r["file"]).is_file() or not (folder / r["masks_file"]).is_file()
    )
    report.checks.append(Check("files missing (dcm or masks)", float(missing), 0, 0))
    return report
