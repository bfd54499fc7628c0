"""``osteofy evaluate``: a model package on a labelled folder, with baselines in the same run.

Runs the *shipped* ONNX graph through ONNX Runtime (what a device runs), then reports with 95 %
bootstrap intervals: AUROC osteoporosis-vs-rest and low-BMD-vs-normal, accuracy, sensitivity and
specificity at the card's referral threshold, ECE, T-score MAE. Baselines on the same images:
the OST rule, the clinical-only logistic model stored in the card, an image-only model package
(when given), and — on a virtual cohort — the oracle ceiling from the latent variables.
Explanation quality uses the cohort's masks and counterfactual maps.

Figures computed on the virtual cohort are synthetic: they check the software, they are not a
clinical accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cohort.stats import auroc
from edge.backends.onnxruntime import OnnxRuntimeBackend
from edge.clinical import all_missing, clinical_vector
from edge.package import ModelPackage, load_package
from edge.preprocess import map_to_input, normalise, preprocess_to_uint8
from model.data import Dataset, load_folder, read_raw

N_BOOT = 1000


@dataclass(frozen=True)
class Predictions:
    probs: NDArray
    tscore: NDArray
    ood: NDArray


def run_package(
    pkg: ModelPackage, ds: Dataset, precision: str = "fp32", batch: int = 32
) -> Predictions:
    backend = OnnxRuntimeBackend(pkg.model_file(precision))
    clinical = np.stack([clinical_vector(f, pkg.clinical) for f in ds.facts])
    if not pkg.card.get("clinical_inputs", True):
        clinical = all_missing(clinical)
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
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def _metric_fns(threshold: float) -> dict:
    def sens(p: NDArray, y: NDArray, t: NDArray) -> float:
        pos = y == 2
        return float((p[pos, 2] >= threshold).mean()) if pos.any() else math.nan

    def spec(p: NDArray, y: NDArray, t: NDArray) -> float:
        neg = y != 2
        return float((p[neg, 2] < threshold).mean()) if neg.any() else math.nan

    return {
        "auroc_osteoporosis": lambda p, y, t: auroc(p[:, 2], y == 2),
        "auroc_low_bmd": lambda p, y, t: auroc(p[:, 1] + p[:, 2], y >= 1),
        "accuracy": lambda p, y, t: float((p.argmax(1) == y).mean()),
        "sensitivity_at_referral": sens,
        "specificity_at_referral": spec,
        "ece": lambda p, y, t: ece(p, y),
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


def clinical_only_scores(pkg: ModelPackage, ds: Dataset) -> NDArray | None:
    """P(osteoporosis) of the clinical-only logistic baseline stored in the card."""
    base = pkg.card.get("baselines", {}).get("clinical_only")
    if not base:
        return None
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
) -> dict:
    pkg = load_package(model_dir)
    site = pkg.card["sites"][0]
    ds = load_folder(data, pkg.preprocess, site=site, progress=progress)
    pred = run_package(pkg, ds, precision)
    y = ds.labels
    rng = np.random.default_rng(seed)
    thr = float(pkg.card["referral"]["threshold"])
    metrics = {
        name: _scored(bootstrap(fn, len(ds), rng, pred.probs, y, ds.tscore))
        for name, fn in _metric_fns(thr).items()
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
    clin = clinical_only_scores(pkg, ds)
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
        "data": str(data),
        "n": len(ds),
        "synthetic_data": (data / "cohort.json").is_file(),
        "class_counts": {c: int((y == k).sum()) for k, c in enumerate(pkg.classes)},
        "referral_threshold": thr,
        "metrics": metrics,
        "baselines": baselines,
        "differences": diffs,
        "ood": {
            "threshold": ood_thr,
            "share_below": round(float((pred.ood < ood_thr).mean()), 4),
            "probes": ood_probe_scores(pkg, ds, precision),
        },
    }
    if explain_n > 0 and any((data / r.get("masks_file", "")).is_file() for r in ds.rows[:1]):
        report["explanations"] = explanation_quality(pkg, ds, precision, explain_n)
    scores = {"fused": fused}
    if ost is not None:
        scores["OST rule"] = -ost
    if clin is not None:
        scores["clinical only"] = clin
    if img_score is not None:
        scores["image only"] = img_score
    report["_plots"] = {"labels": y, "probs": pred.probs, "scores": scores}
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


def explanation_quality(pkg: ModelPackage, ds: Dataset, precision: str, n: int) -> dict:
    """Grad-CAM energy in signal and nuisance masks, and agreement with the counterfactual map.

    Scored for two maps of each image: the predicted class's (what an overlay shows) and the
    osteoporosis class's (the evidence behind a referral).
    """
    import cv2

    from cohort.generate import load_masks

    backend = OnnxRuntimeBackend(pkg.model_file(precision))
    scores: dict[str, dict[str, list[float]]] = {
        m: {"in_signal": [], "on_markers_text": [], "counterfactual_spearman": []}
        for m in ("predicted_class", "osteoporosis_class")
    }
    area_signal: list[float] = []
    empty = {m: 0 for m in scores}
    for i in range(min(n, len(ds))):
        row = ds.rows[i]
        square, geom = preprocess_to_uint8(read_raw(ds.folder / row["file"]), pkg.preprocess)
        clin = clinical_vector(ds.facts[i], pkg.clinical)[None]
        if not pkg.card.get("clinical_inputs", True):
            clin = all_missing(clin)
        out = backend.run(normalise(square, pkg.preprocess)[None], clin)
        masks = load_masks(ds.folder / row["masks_file"])
        ir0, ir1, ic0, ic1 = geom.input_box()
        content = np.zeros((geom.size, geom.size), dtype=bool)
        content[ir0:ir1, ic0:ic1] = True
        signal = map_to_input(masks["signal"], geom, nearest=True) > 0.5
        area_signal.append(float(signal.sum()) / float(content.sum()))
        nuis = np.zeros_like(signal)
        for name in ("marker", "text"):
            if name in masks:
                nuis |= map_to_input(masks[name], geom, nearest=True) > 0.5
        cf = map_to_input(masks["counterfactual"], geom) if "counterfactual" in masks else None
        for which, k in (
            ("predicted_class", int(out["probs"][0].argmax())),
            ("osteoporosis_class", 2),
        ):
            cam = np.maximum(
                cv2.resize(
                    out["cam"][0, k], (geom.size, geom.size), interpolation=cv2.INTER_LINEAR
                ),
                0.0,
            )
            shares = cam_shares(cam, content, signal, nuis)
            if shares is None:  # no positive evidence on the radiograph: counted, not scored
                empty[which] += 1
                continue
            sc = scores[which]
            sc["in_signal"].append(shares[0])
            sc["on_markers_text"].append(shares[1])
            if cf is not None:
                ra = np.argsort(np.argsort(cam[content]))
                rb = np.argsort(np.argsort(cf[content]))
                sc["counterfactual_spearman"].append(float(np.corrcoef(ra, rb)[0, 1]))

    def mean(v: list[float]) -> float | None:
        return round(float(np.mean(v)), 4) if v else None

    result: dict = {"n": len(area_signal), "signal_area_share": mean(area_signal)}
    for which, sc in scores.items():
        result[which] = {
            "scored": len(sc["in_signal"]),
            "empty_maps": empty[which],
            "cam_energy_in_signal": mean(sc["in_signal"]),
            "cam_energy_on_markers_text": mean(sc["on_markers_text"]),
            "cam_vs_counterfactual_spearman": mean(sc["counterfactual_spearman"]),
        }
    return result


def write_report(report: dict, out: Path) -> list[Path]:
    """JSON + markdown (+ the PNG plots already in ``report['_plots']``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = report.pop("_plots", None)
    paths = [out / "metrics.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    if plots is not None:
        paths += _write_plots(out, plots)
    return paths


def _fmt(m: dict) -> str:
    if m["value"] is None:
        return "undefined (one class only)"
    if m["ci95"] is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} ({m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})"


def markdown(r: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in r["class_counts"].items())
    lines = [
        f"# Evaluation of {r['model']} ({r['precision']})",
        "",
        f"Data: `{r['data']}`, n = {r['n']} ({counts})."
        + (
            " **Synthetic virtual cohort: not a clinical accuracy.**" if r["synthetic_data"] else ""
        ),
        "",
        "| metric | value (95 % bootstrap CI) |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in r["metrics"].items()]
    lines += [
        "",
        f"Referral threshold P(osteoporosis) >= {r['referral_threshold']:.3f}.",
        "",
        "| baseline (same images) | AUROC osteoporosis vs rest |",
        "|---|---|",
    ]
    for k, v in r["baselines"].items():
        if k == "oracle":
            lines += [
                f"| oracle ceiling ({name}, latent variables) | {val:.3f} |"
                for name, val in v.items()
            ]
        else:
            lines.append(f"| {k} | {_fmt(v['auroc_osteoporosis'])} |")
    if r["differences"]:
        lines += ["", "| AUROC difference (paired bootstrap) | value (95 % CI) |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in r["differences"].items()]
    lines += [
        "",
        f"OOD: {100 * r['ood']['share_below']:.1f} % of these images score below the "
        f"card's threshold {r['ood']['threshold']:.2f}. Probes that must score above it: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["ood"].get("probes", {}).items())
        + ".",
    ]
    if "explanations" in r:
        e = r["explanations"]
        lines += [
            "",
            f"Explanations on {e['n']} images; signal masks cover "
            f"{e['signal_area_share']} of the image content on average.",
            "",
            "| Grad-CAM of | energy in signal | on markers/text | Spearman vs counterfactual |",
            "|---|---|---|---|",
        ]
        for which in ("predicted_class", "osteoporosis_class"):
            m = e[which]
            lines.append(
                f"| {which.replace('_', ' ')} | {m['cam_energy_in_signal']} | "
                f"{m['cam_energy_on_markers_text']} | "
                f"{m['cam_vs_counterfactual_spearman']} |"
            )
    return "\n".join(lines) + "\n"


def _write_plots(out: Path, plots: dict) -> list[Path]:
    from model.plots import plot_calibration, plot_confusion, plot_roc

    y = plots["labels"]
    curves = {name: (score, y == 2) for name, score in plots["scores"].items()}
    return [
        plot_roc(out / "roc.png", curves, "ROC, osteoporosis vs rest"),
        plot_calibration(
            out / "calibration.png",
            plots["probs"][:, 2],
            (y == 2).astype(float),
            "Calibration, P(osteoporosis)",
        ),
        plot_confusion(
            out / "confusion.png",
            y,
            plots["probs"].argmax(1),
            ["normal", "osteopenia", "osteoporosis"],
        ),
    ]


def record_in_card(model_dir: Path, report: dict, name: str) -> None:
    """Store a report's headline figures in the package's card under ``evaluation[name]``."""
    from model.export import write_json_atomic

    card_path = Path(model_dir) / "card.json"
    card = json.loads(card_path.read_text())
    card.setdefault("evaluation", {})[name] = {
        "data": report["data"],
        "n": report["n"],
        "synthetic_data": report["synthetic_data"],
        "precision": report["precision"],
        "metrics": report["metrics"],
        "baselines": report["baselines"],
        "differences": report["differences"],
        "ood_share_below_threshold": report["ood"]["share_below"],
        "ood_probes": report["ood"].get("probes"),
        "explanations": report.get("explanations"),
    }
    write_json_atomic(card_path, card)
