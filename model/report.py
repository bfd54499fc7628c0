"""An evaluation report on disk: ``metrics.json``, ``report.md`` and the plots."""

from __future__ import annotations

import json
from pathlib import Path


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


def _explanations(e: dict) -> list[str]:
    lines = [
        "",
        f"Explanations on {e['n']} images, as the device draws and publishes them; the signal "
        f"mask covers {e['signal_area_share']} of the image content on average "
        f"(measurement region: {', '.join(e.get('measurement_region', [])) or 'none'}).",
        "",
        "| Grad-CAM of | energy in signal | ratio to area | pointing game | peak in region | "
        "peaks off body | empty maps | Spearman vs counterfactual | deletion pass rate | "
        "on markers/text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for which in ("predicted_class", "osteoporosis_class"):
        m = e[which]
        lines.append(
            f"| {which.replace('_', ' ')} | {m['cam_energy_in_signal']} | "
            f"{m.get('energy_to_area_ratio')} | {m.get('pointing_game')} | "
            f"{m.get('peak_in_measurement_region')} | {m.get('peaks_off_body')} | "
            f"{m.get('empty_maps')} | {m['cam_vs_counterfactual_spearman']} | "
            f"{m.get('deletion_pass_rate')} | {m['cam_energy_on_markers_text']} |"
        )
    return lines


def markdown(r: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in r["class_counts"].items())
    lines = [
        f"# Evaluation of {r['model']} ({r['precision']}, facts: {r.get('facts', 'all')})",
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
        f"Class rule: {r.get('answer_rule', 'argmax')}; referral: P(osteoporosis) >= "
        f"{r['referral_threshold']:.3f}.",
    ]
    if "calibration" in r:
        c = r["calibration"]
        lines += [
            "",
            f"| calibration (n = {c['n']}) | value | 95th percentile of a calibrated model |",
            "|---|---|---|",
            f"| ECE, top label | {c['ece_top_label']} | {c['ece_top_label_p95']} |",
            f"| ECE, P(osteoporosis) | {c['ece_osteoporosis']} | {c['ece_osteoporosis_p95']} |",
            f"| calibration slope / intercept, P(osteoporosis) | {c['slope_osteoporosis']} / "
            f"{c['intercept_osteoporosis']} | 1 / 0 |",
            f"| mean predicted minus observed | {c['mean_predicted_minus_observed']} | 0 |",
        ]
    if "contradictions" in r:
        kinds = ", ".join(f"{k} {v}" for k, v in r["contradictions"].items())
        lines += ["", f"Answers that contradict themselves: {kinds}."]
    lines += ["", "| baseline (same images) | AUROC osteoporosis vs rest |", "|---|---|"]
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
        lines += _explanations(r["explanations"])
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
            plots.get("classes", plots["probs"].argmax(1)),
            ["normal", "osteopenia", "osteoporosis"],
        ),
    ]
