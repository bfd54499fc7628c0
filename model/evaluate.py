"""``osteofy evaluate``: a model package on a labelled folder, with baselines in the same run.

Runs the *shipped* ONNX graph through ONNX Runtime (what a device runs) and decides each answer
with the device's own rule (``edge.answer``), then reports with 95 % bootstrap intervals: AUROC
osteoporosis-vs-rest and low-BMD-vs-normal, accuracy, sensitivity and specificity at the
referral point, calibration with its noise floor (``model.calibration``), T-score MAE, and the
answers that contradict themselves. Baselines on the same images: the OST rule, the
clinical-only logistic model stored in the card, an image-only model package (when given), and
— on a virtual cohort — the oracle ceiling from the latent variables. Explanation quality
(``model.explain_eval``) uses the cohort's masks and counterfactual maps.

``facts`` chooses what the model is told: ``all`` the manifest's facts, ``header`` only what a
DICOM header usually carries (age, sex, weight), ``none`` nothing. Figures computed on the
virtual cohort are synthetic: they check the software, they are not a clinical accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cohort.stats import auroc
from edge.answer import AnswerRule, contradictions
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.clinical import HEADER_FACTS, all_missing, clinical_vector, only_facts
from edge.package import ModelPackage, load_package
from edge.preprocess import normalise, preprocess_to_uint8
from model.calibration import calibration_report, ece_top_label, reliability
from model.data import Dataset, load_folder, read_raw
from model.report import write_report

N_BOOT = 1000
FACTS = ("all", "header", "none")

__all__ = ["evaluate", "record_in_card", "run_package", "write_report"]


@dataclass(frozen=True)
class Predictions:
    probs: NDArray
    tscore: NDArray
    ood: NDArray


def clinical_inputs(pkg: ModelPackage, ds: Dataset, facts: str = "all") -> NDArray:
    """The ``clinical`` input of every row, with only the facts ``facts`` allows."""
    if facts not in FACTS:
        raise ValueError(f"facts must be one of {FACTS}")
    clinical = np.stack([clinical_vector(f, pkg.clinical) for f in ds.facts])
    if facts == "none" or not pkg.card.get("clinical_inputs", True):
        return all_missing(clinical)
    if facts == "header":
        return only_facts(clinical, pkg.clinical, HEADER_FACTS)
    return clinical


def run_package(
    pkg: ModelPackage, ds: Dataset, precision: str = "fp32", batch: int = 32, facts: str = "all"
) -> Predictions:
    backend = OnnxRuntimeBackend(pkg.model_file(precision))
    clinical = clinical_inputs(pkg, ds, facts)
    probs, tscore, ood = [], [], []
    for a in range(0, len(ds), batch):
        out = backend.run(
            normalise(ds.images[a : a + batch], pkg.preprocess), clinical[a : a + batch]
        )
        probs.append(out["probs"])
        tscore.append(out["tscore"][:, 0])
        ood.append(out["ood"][:, 0])
    return Predictions(np.concatenate(probs), np.concatenate(tscore), np.concatenate(ood))


def image_only_scores(
    base: ModelPackage,
    pkg: ModelPackage,
    ds: Dataset,
    data: Path,
    progress: bool = False,
) -> NDArray:
    """P(osteoporosis) of an image-only baseline ``base`` on the images ``pkg`` was run on (``ds``).

    The baseline sees the images through its own preprocessing (input size, version): when it
    differs from ``pkg``'s, the folder is read again with the baseline's.
    """
    from osteofy.errors import UsageError

    site = pkg.card["sites"][0]
    if site not in base.card.get("sites", []):
        raise UsageError(f"image-only baseline {base.name} is not a {site} model")
    if base.preprocess != pkg.preprocess:
        own = load_folder(data, base.preprocess, site=site, progress=progress)
        if not np.array_equal(own.labels, ds.labels):
            raise UsageError(f"image-only baseline {base.name}: {data} read differently twice")
        ds = own
    return run_package(base, ds, "fp32").probs[:, 2]


def ece(probs: NDArray, labels: NDArray, bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence (Guo et al. 2017)."""
    return ece_top_label(probs, labels, bins)


def _metric_fns(rule: AnswerRule) -> dict:
    def sens(p: NDArray, t: NDArray, y: NDArray) -> float:
        pos = y == 2
        return float(rule.refer(p[pos]).mean()) if pos.any() else math.nan

    def spec(p: NDArray, t: NDArray, y: NDArray) -> float:
        neg = y != 2
        return float((~rule.refer(p[neg])).mean()) if neg.any() else math.nan

    return {
        "auroc_osteoporosis": lambda p, t, y: auroc(p[:, 2], y == 2),
        "auroc_low_bmd": lambda p, t, y: auroc(p[:, 1] + p[:, 2], y >= 1),
        "accuracy": lambda p, t, y: float((rule.classes(p, t) == y).mean()),
        "sensitivity_at_referral": sens,
        "specificity_at_referral": spec,
        "ece": lambda p, t, y: ece(p, y),
    }


def bootstrap(fn, n: int, rng: np.random.Generator, *arrays) -> tuple[float, list[float]]:
    """Point value and 95 % percentile interval over ``N_BOOT`` resamples (paired).

    A metric undefined on this set (an AUROC with one class only) is NaN, reported as null.
    """
    try:
        value = fn(*arrays)
    except ValueError:
        return math.nan, [math.nan, math.nan]
    samples = []
    for _ in range(N_BOOT):
        idx = rng.integers(0, n, n)
        try:
            samples.append(fn(*(a[idx] for a in arrays)))
        except ValueError:  # a resample with one class only
            continue
    if not samples or np.all(np.isnan(samples)):
        return float(value), [math.nan, math.nan]
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(value), [float(lo), float(hi)]


def _scored(value_ci: tuple[float, list[float]]) -> dict:
    value, ci = value_ci
    if not math.isfinite(value):
        return {"value": None, "ci95": None, "note": "undefined on this set (one class only)"}
    return {
        "value": round(value, 4),
        "ci95": [round(x, 4) for x in ci] if all(math.isfinite(x) for x in ci) else None,
    }


def clinical_only_scores(pkg: ModelPackage, ds: Dataset, facts: str = "all") -> NDArray | None:
    """P(osteoporosis) of the clinical-only logistic baseline stored in the card."""
    base = pkg.card.get("baselines", {}).get("clinical_only")
    if not base:
        return None
    x = clinical_inputs(pkg, ds, facts) if pkg.card.get("clinical_inputs", True) else None
    if x is None:
        x = np.stack([clinical_vector(f, pkg.clinical) for f in ds.facts])
    w = np.asarray(base["weights"])
    return 1.0 / (1.0 + np.exp(-(base["bias"] + x @ w)))


def evaluate(
    model_dir: Path,
    data: Path,
    precision: str = "fp32",
    image_only: Path | None = None,
    explain_n: int = 200,
    seed: int = 0,
    progress: bool = True,
    facts: str = "all",
) -> dict:
    pkg = load_package(model_dir)
    rule = AnswerRule.from_card(pkg.card)
    site = pkg.card["sites"][0]
    ds = load_folder(data, pkg.preprocess, site=site, progress=progress)
    pred = run_package(pkg, ds, precision, facts=facts)
    y = ds.labels
    rng = np.random.default_rng(seed)
    metrics = {
        name: _scored(bootstrap(fn, len(ds), rng, pred.probs, pred.tscore, y))
        for name, fn in _metric_fns(rule).items()
    }
    known = ~np.isnan(ds.tscore)
    if known.any():
        metrics["tscore_mae"] = _scored(
            bootstrap(
                lambda a, b: float(np.abs(a - b).mean()),
                int(known.sum()),
                rng,
                pred.tscore[known],
                ds.tscore[known],
            )
        )
    fused = pred.probs[:, 2]
    pos = y == 2
    baselines: dict = {}
    diffs: dict = {}

    def compare(name: str, score: NDArray) -> None:
        baselines[name] = {
            "auroc_osteoporosis": _scored(
                bootstrap(lambda s, t: auroc(s, t), len(ds), rng, score, pos)
            )
        }
        diffs[f"fused_minus_{name}"] = _scored(
            bootstrap(lambda a, b, t: auroc(a, t) - auroc(b, t), len(ds), rng, fused, score, pos)
        )

    ost = _ost(ds)
    if ost is not None:
        compare("ost_rule", -ost)
    clin = clinical_only_scores(pkg, ds, facts)
    if clin is not None:
        compare("clinical_only", clin)
    img_score = None
    if image_only is not None:
        img_score = image_only_scores(load_package(image_only), pkg, ds, data, progress)
        compare("image_only", img_score)
    oracle = _oracle(ds, site)
    if oracle:
        baselines["oracle"] = oracle
    ood_thr = float(pkg.card["ood"]["threshold"])
    report = {
        "model": pkg.name,
        "precision": precision,
        "facts": facts,
        "data": str(data),
        "n": len(ds),
        "synthetic_data": (data / "cohort.json").is_file(),
        "class_counts": {c: int((y == k).sum()) for k, c in enumerate(pkg.classes)},
        "answer_rule": pkg.card.get("answer", {}).get("class_rule", "argmax"),
        "referral_threshold": rule.threshold,
        "metrics": metrics,
        "calibration": calibration_report(pred.probs, y, np.random.default_rng(seed + 1)),
        "reliability_osteoporosis": reliability(fused, pos.astype(float)),
        "contradictions": contradictions(rule, pred.probs, pred.tscore),
        "class_is_not_most_probable": int(
            (rule.classes(pred.probs, pred.tscore) != pred.probs.argmax(1)).sum()
        ),
        "baselines": baselines,
        "differences": diffs,
        "ood": {
            "threshold": ood_thr,
            "share_below": round(float((pred.ood < ood_thr).mean()), 4),
            "probes": ood_probe_scores(pkg, ds, precision),
        },
    }
    if explain_n > 0 and any((data / r.get("masks_file", "")).is_file() for r in ds.rows[:1]):
        from model.explain_eval import explanation_quality

        report["explanations"] = explanation_quality(
            pkg, ds, clinical_inputs(pkg, ds, facts), precision, explain_n, seed
        )
    scores = {"fused": fused}
    if ost is not None:
        scores["OST rule"] = -ost
    if clin is not None:
        scores["clinical only"] = clin
    if img_score is not None:
        scores["image only"] = img_score
    report["_plots"] = {
        "labels": y,
        "probs": pred.probs,
        "classes": rule.classes(pred.probs, pred.tscore),
        "scores": scores,
    }
    return report


def ood_probe_scores(pkg: ModelPackage, ds: Dataset, precision: str) -> dict[str, float]:
    """OOD scores of a chest image, a blank plate, an inverted image and noise."""
    from model.ood_probes import probes

    backend = OnnxRuntimeBackend(pkg.model_file(precision))
    example = read_raw(ds.folder / ds.rows[0]["file"])
    clin = clinical_vector(ds.facts[0], pkg.clinical)[None]
    out: dict[str, float] = {}
    for name, raw in probes(example, np.random.default_rng(0)).items():
        square, _ = preprocess_to_uint8(raw, pkg.preprocess)
        res = backend.run(normalise(square, pkg.preprocess)[None], clin)
        out[name] = round(float(res["ood"][0, 0]), 3)
    return out


def _ost(ds: Dataset) -> NDArray | None:
    try:
        w = np.array([float(r["weight_kg"]) for r in ds.rows])
        a = np.array([float(r["age_years"]) for r in ds.rows])
    except (KeyError, ValueError):
        return None
    return 0.2 * (w - a)


def _oracle(ds: Dataset, site: str) -> dict:
    """Oracle AUROCs from the latent variables, when the folder is a virtual cohort."""
    rows = ds.rows
    y = ds.labels == 2
    if "t_site" not in rows[0] or y.all() or not y.any():
        return {}
    from cohort.check import oracle_posteriors
    from cohort.presets import get_preset
    from cohort.sampler import RISK_FACTORS

    info = (
        json.loads((ds.folder / "cohort.json").read_text())
        if (ds.folder / "cohort.json").is_file()
        else {}
    )
    preset = get_preset(info.get("preset", "brief_cohort"))
    p = {
        k: np.array([float(r[k]) for r in rows])
        for k in ("age_years", "bmi", "height_m", *RISK_FACTORS)
    }
    p["sex_male"] = np.array([r["sex"] == "M" for r in rows], dtype=float)
    t_site = np.array([float(r["t_site"]) for r in rows])
    post = oracle_posteriors(p, t_site, site, preset)
    return {k: round(auroc(v, y), 4) for k, v in post.items()}


def cam_shares(
    cam: NDArray, content: NDArray, signal: NDArray, nuisance: NDArray
) -> tuple[float, float] | None:
    """Shares of a non-negative heat map's energy in the signal and nuisance masks.

    Both are shares of the energy on the image *content* (the letterbox padding is not part of
    the radiograph and the overlay does not show it), the same reference as the masks' area
    share, so a uniform map scores exactly its area share. None for a map with no energy there.
    """
    total = float(cam[content].sum())
    if total <= 0:
        return None
    return float(cam[signal & content].sum()) / total, float(cam[nuisance & content].sum()) / total


def record_in_card(model_dir: Path, report: dict, name: str) -> None:
    """Store a report's headline figures in the package's card under ``evaluation[name]``."""
    from model.export import write_json_atomic

    card_path = Path(model_dir) / "card.json"
    card = json.loads(card_path.read_text())
    card.setdefault("evaluation", {})[name] = {
        "data": report["data"],
        "n": report["n"],
        "facts": report.get("facts", "all"),
        "synthetic_data": report["synthetic_data"],
        "precision": report["precision"],
        "metrics": report["metrics"],
        "calibration": report.get("calibration"),
        "contradictions": report.get("contradictions"),
        "baselines": report["baselines"],
        "differences": report["differences"],
        "ood_share_below_threshold": report["ood"]["share_below"],
        "ood_probes": report["ood"].get("probes"),
        "explanations": report.get("explanations"),
    }
    write_json_atomic(card_path, card)
