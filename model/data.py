"""Training data: a folder of radiographs plus a CSV, preprocessed by THE preprocessing function.

The folder holds DICOM (``.dcm``) or PNG/JPEG files and one CSV (``manifest.csv`` as written by
``osteofy simulate``, or ``labels.csv`` for a user's own data; ``docs/training.md``). Required
columns: ``file`` and ``class`` (normal / osteopenia / osteoporosis) or ``tscore``. Clinical
columns are optional; an empty cell means "unknown" and is passed as missing.

Preprocessed inputs are cached under ``<folder>/.osteofy-cache/`` keyed by the preprocessing
configuration, so an epoch never decodes a DICOM twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from edge.clinical import INPUT_FACTS
from edge.preprocess import PreprocessConfig, RawImage, preprocess_to_uint8, raw_from_array
from osteofy.errors import InputRejected, UsageError
from osteofy.fsutil import atomic_write

CLASS_NAMES = ("normal", "osteopenia", "osteoporosis")
LABEL_FILES = ("manifest.csv", "labels.csv")
# The regions read for bone density on each site (virtual cohort mask names): the metacarpal
# shafts with their cortices on a hand (radiogrammetry); on a hip the femoral-neck box and the
# trochanteric region of a DXA hip scan.
MEASUREMENT_REGIONS = {
    "hip": ("fn_roi", "trochanter_roi"),
    "hand": ("mc_cortex_roi", "mc_medullary"),
}


@dataclass
class Dataset:
    folder: Path
    rows: list[dict]
    images: NDArray  # uint8 [N, S, S]
    labels: NDArray  # int64 [N], class index
    tscore: NDArray  # float32 [N], NaN where unknown
    facts: list[dict]
    signal: NDArray | None = None  # uint8 [N, S, S]: share of each input pixel on bone x 255
    focus: NDArray | None = None  # uint8 [N, S, S]: share in the measurement region x 255

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: NDArray) -> Dataset:
        return Dataset(
            self.folder,
            [self.rows[i] for i in idx],
            self.images[idx],
            self.labels[idx],
            self.tscore[idx],
            [self.facts[i] for i in idx],
            None if self.signal is None else self.signal[idx],
            None if self.focus is None else self.focus[idx],
        )

    def concat(self, other: Dataset) -> Dataset:
        """Two folders as one training set (for example a mixed-domain split)."""
        both = self.signal is not None and other.signal is not None
        both_focus = self.focus is not None and other.focus is not None
        return Dataset(
            self.folder,
            self.rows + other.rows,
            np.concatenate([self.images, other.images]),
            np.concatenate([self.labels, other.labels]),
            np.concatenate([self.tscore, other.tscore]),
            self.facts + other.facts,
            np.concatenate([self.signal, other.signal]) if both else None,
            np.concatenate([self.focus, other.focus]) if both_focus else None,
        )


def _label_file(folder: Path) -> Path:
    for name in LABEL_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UsageError(f"{folder}: no manifest.csv or labels.csv (see docs/training.md)")


def class_from_row(row: dict) -> tuple[int, float]:
    t = row.get("tscore", "")
    tscore = float(t) if t not in ("", None) else float("nan")
    c = (row.get("class") or "").strip().lower()
    if c:
        if c not in CLASS_NAMES:
            raise InputRejected(f"class {c!r} is not one of {', '.join(CLASS_NAMES)}")
        return CLASS_NAMES.index(c), tscore
    if np.isnan(tscore):
        raise InputRejected("row has neither class nor tscore")
    return (2 if tscore <= -2.5 else 1 if tscore < -1.0 else 0), tscore


def facts_from_row(row: dict) -> dict:
    """Clinical facts from a CSV row: empty cells are unknown."""
    out = {k: row.get(k, "") for k in INPUT_FACTS}
    if not out.get("sex_male") and row.get("sex"):
        out["sex_male"] = row["sex"]
    return out


def read_raw(path: Path) -> RawImage:
    """A DICOM file (by content, not extension) or a PNG/JPEG image."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from edge.preprocess import raw_from_dataset

    if not path.is_file():
        raise InputRejected(f"{path.name}: file not found")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise InputRejected(f"{path.name}: not a readable image")
        return raw_from_array(img)
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise InputRejected(f"{path.name}: not a DICOM file ({exc})") from None
    return raw_from_dataset(ds)


def _prep_one(args: tuple[str, PreprocessConfig]) -> NDArray:
    path, cfg = args
    square, _ = preprocess_to_uint8(read_raw(Path(path)), cfg)
    return square


def _signal_one(args: tuple[str, str, PreprocessConfig]) -> NDArray:
    """The cohort's signal mask carried into the model input (share of bone per pixel)."""
    from cohort.generate import load_masks
    from edge.preprocess import map_to_input

    path, masks_path, cfg = args
    _, geom = preprocess_to_uint8(read_raw(Path(path)), cfg)
    signal = load_masks(Path(masks_path))["signal"]
    return np.round(map_to_input(signal, geom) * 255.0).astype(np.uint8)


def _focus_one(args: tuple[str, str, PreprocessConfig, str]) -> NDArray:
    """The site's measurement region carried into the model input (share per pixel)."""
    from cohort.generate import load_masks
    from edge.preprocess import map_to_input

    path, masks_path, cfg, site = args
    _, geom = preprocess_to_uint8(read_raw(Path(path)), cfg)
    masks = load_masks(Path(masks_path))
    region = np.zeros_like(masks["signal"])
    for name in MEASUREMENT_REGIONS[site]:
        if name in masks:
            region |= masks[name]
    return np.round(map_to_input(region, geom) * 255.0).astype(np.uint8)


def _cache_path(folder: Path, cfg: PreprocessConfig, files: list[str]) -> Path:
    key = json.dumps({"cfg": cfg.to_card(), "files": files}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return folder / ".osteofy-cache" / f"{cfg.version}-{cfg.size}-{digest}.npy"


def load_folder(
    folder: Path,
    cfg: PreprocessConfig,
    site: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    masks: bool = False,
    focus: bool = False,
) -> Dataset:
    """``masks=True`` also reads each row's ``masks_file`` (a virtual cohort) for guidance;
    ``focus=True`` also its measurement region (needs ``site``)."""
    folder = Path(folder)
    with _label_file(folder).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if site is not None and rows and "site" in rows[0]:
        rows = [r for r in rows if r["site"] == site]
    if not rows:
        raise UsageError(f"{folder}: no rows" + (f" for site {site}" if site else ""))
    if "file" not in rows[0]:
        raise UsageError(f"{folder}: the CSV needs a 'file' column")
    labels, tscores = zip(*(class_from_row(r) for r in rows), strict=True)
    files = [r["file"] for r in rows]
    for f in files:
        if Path(f).is_absolute() or ".." in Path(f).parts:
            raise UsageError(f"{folder}: file names must be relative to the folder ({f!r})")
    cache = _cache_path(folder, cfg, files)
    if cache.is_file():
        images = np.load(cache)
    else:
        jobs = [(str(folder / f), cfg) for f in files]
        images = _run_all(_prep_one, jobs, cfg, workers, progress, "preprocess")
        _save_cache(cache, images)
    signal = None
    if masks:
        if "masks_file" not in rows[0]:
            raise UsageError(f"{folder}: mask guidance needs a masks_file column (a cohort)")
        mcache = cache.with_name(cache.stem + "-signal.npy")
        if mcache.is_file():
            signal = np.load(mcache)
        else:
            mjobs = [(str(folder / r["file"]), str(folder / r["masks_file"]), cfg) for r in rows]
            signal = _run_all(_signal_one, mjobs, cfg, workers, progress, "masks")
            _save_cache(mcache, signal)
    region = None
    if focus:
        if site not in MEASUREMENT_REGIONS or "masks_file" not in rows[0]:
            raise UsageError(f"{folder}: focus guidance needs a cohort's masks and a site")
        fcache = cache.with_name(cache.stem + "-focus.npy")
        if fcache.is_file():
            region = np.load(fcache)
        else:
            fjobs = [
                (str(folder / r["file"]), str(folder / r["masks_file"]), cfg, site) for r in rows
            ]
            region = _run_all(_focus_one, fjobs, cfg, workers, progress, "regions")
            _save_cache(fcache, region)
    return Dataset(
        folder,
        rows,
        images,
        np.asarray(labels, dtype=np.int64),
        np.asarray(tscores, dtype=np.float32),
        [facts_from_row(r) for r in rows],
        signal,
        region,
    )


def _run_all(
    fn, jobs: list, cfg: PreprocessConfig, workers: int | None, progress: bool, desc: str
) -> NDArray:
    from tqdm import tqdm

    n = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, file=sys.stderr)
    out = np.zeros((len(jobs), cfg.size, cfg.size), dtype=np.uint8)
    if n <= 1:
        for i, job in enumerate(jobs):
            out[i] = fn(job)
            bar.update(1)
    else:
        # forkserver, not fork: forking a process that runs threads can deadlock the child.
        ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(n) as pool:
            for i, img in enumerate(pool.imap(fn, jobs, chunksize=8)):
                out[i] = img
                bar.update(1)
    bar.close()
    return out


def _save_cache(path: Path, images: NDArray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: np.save(fh, images))
    except OSError:
        pass  # a read-only dataset folder: no cache, still correct
