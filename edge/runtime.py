"""The screening pipeline: one radiograph file -> an explained ``osteofy.result.v1``.

    ingest (validate, decode) -> preprocess -> backend (probs, tscore, cam, clinical_attr, ood)
    -> OOD gate -> explanation (heat map, peaks, clinical contributions) -> result

One :class:`Screener` per process holds the model packages (by site), the chosen backends and
the site secret; ``screen`` is called per file by ``osteofy screen`` and by ``edge serve``.
Rendering the overlay image is a separate, optional step (:meth:`Outcome.overlay`), so the
result is ready before any PNG is encoded.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edge.answer import AnswerRule, band_safe_round
from edge.audit import audit_event
from edge.clinical import all_missing, clinical_vector
from edge.ingest import Study, load_study
from edge.overlay import cam_to_display, peak_regions, render_overlay
from edge.package import ModelPackage, load_package, sha256_file
from edge.preprocess import Geometry, display_work, normalise, square_from_display
from edge.result import (
    AGE_CAP,
    CLASSES,
    Contribution,
    Explanation,
    ModelInfo,
    Peak,
    Prediction,
    Probs,
    Quality,
    Result,
    load_site_secret,
    pseudonym,
    utc_now,
)
from edge.select import Choice, choose, fall_back
from osteofy.config import Config
from osteofy.errors import InputRejected, Unavailable

log = logging.getLogger(__name__)

OOD_BORDERLINE = 0.8  # share of the OOD threshold above which a result is flagged


class OutOfDistribution(InputRejected):
    """The image does not look like the radiographs the model was trained on."""

    rule = "ood"


@dataclass
class Loaded:
    pkg: ModelPackage
    choice: Choice
    sha256: str
    rule: AnswerRule


@dataclass
class Outcome:
    """A screened study: the result and what is needed to draw its explanation."""

    result: Result
    study: Study = field(repr=False)
    display8: NDArray = field(repr=False)
    geometry: Geometry = field(repr=False)
    cam: NDArray = field(repr=False)  # [3, h, w]

    def heat(self, cls: str | None = None) -> NDArray:
        k = CLASSES.index(cls or self.result.prediction.class_)
        return cam_to_display(self.cam[k], self.geometry, self.display8.shape)

    def overlay(self, include_image: bool = True, cls: str | None = None) -> NDArray:
        """The explanation image (BGR); ``include_image=False`` draws the heat map alone."""
        p = self.result.prediction
        return render_overlay(
            self.display8,
            self.heat(cls),
            label=cls or p.class_,
            probs=p.probs.model_dump(),
            tscore=p.tscore,
            include_image=include_image,
        )

    @property
    def publishable_pixels(self) -> bool:
        """Radiograph pixels may leave the device only without burned-in annotation."""
        return self.study.header.burned_in_annotation == "NO"


def discover(models_dir: Path) -> dict[str, list[Path]]:
    """Package folders under ``models_dir`` by site (from each card; unreadable ones skipped)."""
    import json

    out: dict[str, list[Path]] = {}
    for card in sorted(Path(models_dir).glob("*/card.json")):
        try:
            sites = json.loads(card.read_text()).get("sites", [])
        except (OSError, ValueError):
            log.warning("%s: unreadable model card, skipped", card)
            continue
        for site in sites:
            out.setdefault(str(site), []).append(card.parent)
    return out


def _preferred(paths: list[Path]) -> list[Path]:
    """Fusion models (with clinical inputs) first, then the newest version first.

    Names compare by their numbers as numbers, so ``hip-v10`` is newer than ``hip-v2``; a site's
    configured ``site_models`` entry overrides this choice.
    """
    import json
    import re

    def version(p: Path) -> tuple:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))

    def image_only(p: Path) -> bool:
        return not json.loads((p / "card.json").read_text()).get("clinical_inputs", True)

    newest_first = sorted(paths, key=version, reverse=True)
    return sorted(newest_first, key=image_only)  # stable: keeps newest first within each kind


class Screener:
    """Models, backends and secret for one device; ``screen`` is safe to call repeatedly."""

    def __init__(
        self,
        cfg: Config,
        backend: str | None = None,
        precision: str | None = None,
        threads: int | None = None,
        create_secret: bool = True,
    ) -> None:
        self.cfg = cfg
        self._precision = precision or cfg.precision
        self._threads = threads
        self._record = create_secret
        self._swap = threading.Lock()
        self.models: dict[str, Loaded] = {}
        self.problems: dict[str, str] = {}
        found = discover(cfg.models_dir)
        if not found:
            raise Unavailable(f"no model packages in {cfg.models_dir}")
        for site, paths in found.items():
            wanted = cfg.site_models.get(site)
            candidates = [p for p in paths if p.name == wanted] if wanted else _preferred(paths)
            if not candidates:
                self.problems[site] = f"configured model {wanted!r} not found for site {site}"
                continue
            path = candidates[0]
            try:
                pkg = load_package(path)
                rule = AnswerRule.from_card(pkg.card)
                choice = choose(
                    pkg,
                    backend or cfg.backend,
                    precision or cfg.precision,
                    cfg.data_dir / "engines",
                    threads,
                    decisions=cfg.data_dir / "precision.json",
                    record=create_secret,  # a read-only check (doctor) writes nothing
                )
            except Unavailable as exc:
                self.problems[site] = str(exc)
                audit_event("site_unavailable", site=site)
                log.error("site %s cannot be screened: %s", site, exc)
                continue
            file = pkg.model_file(
                choice.backend.precision if choice.backend.precision != "fp16" else "fp32"
            )
            self.models[site] = Loaded(pkg, choice, sha256_file(file), rule)
            audit_event(
                "model_chosen",
                site=site,
                package=pkg.path.name,
                version=str(pkg.card.get("version", "")),
                backend=choice.backend.name,
                precision=choice.backend.precision,
                sha256=self.models[site].sha256,
            )
            log.info(
                "site %s: %s %s on %s/%s (%s)",
                site,
                pkg.name,
                pkg.card.get("version"),
                choice.backend.name,
                choice.backend.precision,
                choice.reason,
            )
        if not self.models:
            raise Unavailable(
                "no model package can run: "
                + "; ".join(f"{s}: {m}" for s, m in sorted(self.problems.items()))
            )
        secret_file = cfg.site_secret_file or cfg.data_dir / "site.secret"
        self.secret_file = Path(secret_file)
        if create_secret or self.secret_file.exists():
            self.secret = load_site_secret(self.secret_file)
        else:  # a read-only check (doctor): report it, do not make it
            self.secret = b""

    def _fall_back(self, site: str, failed: Loaded, error: Unavailable) -> Loaded:
        """ONNX Runtime for ``site`` after its TensorRT engine failed (``backend: auto``)."""
        with self._swap:
            current = self.models[site]
            if current is not failed:  # another thread has already swapped it
                return current
            choice = fall_back(
                failed.pkg,
                failed.choice,
                error,
                self._precision,
                self._threads,
                self.cfg.data_dir / "precision.json",
                self._record,
            )
            pkg = failed.pkg
            loaded = Loaded(
                pkg, choice, sha256_file(pkg.model_file(choice.backend.precision)), failed.rule
            )
            self.models[site] = loaded
            audit_event(
                "model_chosen",
                site=site,
                package=pkg.path.name,
                version=str(pkg.card.get("version", "")),
                backend=choice.backend.name,
                precision=choice.backend.precision,
                sha256=loaded.sha256,
            )
            return loaded

    def close(self) -> None:
        """Release every backend (GPU memory, sessions)."""
        for loaded in self.models.values():
            loaded.choice.backend.close()

    @property
    def sites(self) -> set[str]:
        return set(self.models)

    def screen(self, path: Path, clinical: Mapping[str, object] | None = None) -> Outcome:
        """Screen one file; InputRejected (with ``.rule`` when known) for anything refused."""
        if not self.secret:
            raise Unavailable(f"no site secret at {self.secret_file}")
        t0 = time.perf_counter()
        study = load_study(Path(path), self.cfg.ingest, self.sites, clinical)
        t1 = time.perf_counter()
        loaded = self.models[study.site]
        pkg = loaded.pkg
        display8, work_scale = display_work(study.raw, pkg.preprocess)
        square, geom = square_from_display(
            display8, work_scale, study.raw.pixels.shape, pkg.preprocess
        )
        image = normalise(square, pkg.preprocess)[None]
        vec = clinical_vector(study.facts, pkg.clinical)[None].astype(np.float32)
        if not pkg.card.get("clinical_inputs", True):
            vec = all_missing(vec)
        t2 = time.perf_counter()
        try:
            out = loaded.choice.backend.run(image, vec)
        except Unavailable as exc:
            if not loaded.choice.may_fall_back:
                raise
            loaded = self._fall_back(study.site, loaded, exc)
            out = loaded.choice.backend.run(image, vec)
        ood = float(out["ood"][0, 0])
        thr = float(pkg.card["ood"]["threshold"])
        if not np.isfinite(ood) or ood > thr:
            raise OutOfDistribution(
                f"the image does not look like a {study.site} radiograph the model knows "
                f"(out-of-distribution score {ood:.1f} > {thr:.1f}): unsupported body part "
                "or image type"
            )
        probs = out["probs"][0].astype(float)
        tscore = float(out["tscore"][0, 0])
        k = int(loaded.rule.classes(probs, np.array([tscore]))[0])
        t3 = time.perf_counter()  # inference: the forward pass, the OOD gate and the class
        cam = out["cam"][0]
        peaks = peak_regions(cam[k], geom, k=3)
        contributions = _contributions(out["clinical_attr"][0], pkg, study.facts)
        t4 = time.perf_counter()
        result = self._result(study, loaded, probs, tscore, k, ood, thr, peaks, contributions)
        timings = {
            "decode": t1 - t0,
            "preprocess": t2 - t1,
            "inference": t3 - t2,
            "explanation": t4 - t3,
        }
        result.timings_ms = {n: round(v * 1000.0, 2) for n, v in timings.items()}
        result.timings_ms["total"] = round((time.perf_counter() - t0) * 1000.0, 2)
        return Outcome(result, study, display8, geom, cam)

    def _result(
        self,
        study: Study,
        loaded: Loaded,
        probs: NDArray,
        tscore: float,
        k: int,
        ood: float,
        thr: float,
        peaks: list[dict[str, float]],
        contributions: list[tuple[str, bool, float]],
    ) -> Result:
        pkg, backend = loaded.pkg, loaded.choice.backend
        facts = study.facts
        derivable_bmi = facts.get("weight_kg") is not None and facts.get("height_m") is not None
        missing = [n for n, v in facts.items() if v is None and not (n == "bmi" and derivable_bmi)]
        flags: list = []
        if ood > OOD_BORDERLINE * thr:
            flags.append("ood_borderline")
        if probs[k] < self.cfg.low_confidence:
            flags.append("low_confidence")
        if missing and pkg.card.get("clinical_inputs", True):
            flags.append("missing_clinical_facts")
        age = facts.get("age_years")
        sex = facts.get("sex_male")
        return Result(
            result_id=str(uuid.uuid4()),
            device_id=self.cfg.device_id,
            site_id=self.cfg.site_id,
            created_at=utc_now(),
            patient_key=pseudonym(self.secret, study.header.patient_id),
            study_key=pseudonym(self.secret, study.header.study_uid),
            age_years=None if age is None else round(min(float(age), AGE_CAP), 1),
            sex=None if sex is None else ("M" if sex >= 0.5 else "F"),
            body_part=study.site,
            model=ModelInfo(
                name=pkg.name,
                version=str(pkg.card.get("version", "0")),
                sha256=loaded.sha256,
                backend=backend.name,
                precision=backend.precision,
            ),
            prediction=Prediction(
                class_=CLASSES[k],
                probs=Probs(**{c: round(float(p), 4) for c, p in zip(CLASSES, probs, strict=True)}),
                tscore=band_safe_round(tscore, 2),
                refer=bool(loaded.rule.refer(probs)[0]),
            ),
            explanation=Explanation(
                heatmap_class=CLASSES[k],
                peaks=[Peak(**{n: round(v, 3) for n, v in p.items()}) for p in peaks],
                clinical=[Contribution(factor=f, known=k, log_odds=v) for f, k, v in contributions],
            ),
            quality=Quality(
                ood_score=round(ood, 2),
                ood_threshold=round(thr, 2),
                flags=flags,
                missing_facts=missing,
            ),
            timings_ms={},
        )


def _contributions(
    attr: NDArray, pkg: ModelPackage, facts: Mapping[str, float | None]
) -> list[tuple[str, bool, float]]:
    """Per fact: its push on the log-odds of osteoporosis, value and missing flag together.

    ``clinical_attr`` [3, 2F] holds each input's additive contribution (values first, then
    missing flags, in the card's order). For an ordinal package its last row is the exact push
    on logit P(osteoporosis); for an earlier (softmax) package the difference between the
    osteoporosis and normal rows is the fact's effect on log P(osteoporosis)/P(normal). Returned as
    (factor, known, log-odds) tuples, strongest first; the result model is built from them
    with the rest of the result (as the peaks are).
    """
    if not pkg.card.get("clinical_inputs", True):
        return []
    names = list(pkg.clinical.names)
    f = len(names)
    # Ordinal packages: row 2 is each input's exact push on logit P(osteoporosis).
    ordinal = pkg.card.get("answer", {}).get("class_rule") == "who_band_of_tscore"
    diff = attr[2] if ordinal else attr[2] - attr[0]
    per_fact = (diff[:f] + diff[f : 2 * f]).tolist()
    bmi_derivable = facts.get("weight_kg") is not None and facts.get("height_m") is not None
    out = []
    for name, v in zip(names, per_fact, strict=True):
        base = name if name in facts else ("bmi" if name == "bmi_below_27" else name)
        known = facts.get(base) is not None or (name in ("bmi", "bmi_below_27") and bmi_derivable)
        out.append((name, known, round(v, 3)))
    out.sort(key=lambda c: -abs(c[2]))
    return out
