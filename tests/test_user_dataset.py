"""A user's own dataset: PNG or DICOM files plus labels.csv (docs/training.md)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.clinical import clinical_vector, fit_spec
from edge.preprocess import PreprocessConfig
from model.data import load_folder
from osteofy.errors import InputRejected, UsageError

CFG = PreprocessConfig(size=64, work_side=128)


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.full((200, 160), 30, np.uint16)
    img[30:180, 40:120] = 20000
    img[50:170, 70:90] = 50000
    img = (img + rng.integers(0, 500, img.shape)).astype(np.uint16)
    assert cv2.imwrite(str(path), img)


def _folder(tmp_path: Path, csv_text: str, files: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for i, name in enumerate(files):
        _png(tmp_path / name, i)
    (tmp_path / "labels.csv").write_text(csv_text)
    return tmp_path


def test_png_folder_with_labels_and_unknown_facts(tmp_path: Path) -> None:
    folder = _folder(
        tmp_path, "file,class,age_years,sex,smoking\na.png,osteoporosis,71,F,\nb.png,normal,,M,1\n"
    )
    ds = load_folder(folder, CFG, progress=False)
    assert ds.images.shape == (2, 64, 64) and list(ds.labels) == [2, 0]
    assert np.isnan(ds.tscore).all()
    spec = fit_spec(ds.facts)
    k = len(spec.names)
    a, b = (clinical_vector(f, spec) for f in ds.facts)
    smoking = spec.names.index("smoking")
    age = spec.names.index("age_years")
    assert a[k + smoking] == 1.0 and b[k + smoking] == 0.0  # unknown vs known
    assert b[k + age] == 1.0  # empty age cell -> missing flag


def test_class_derived_from_tscore(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "file,tscore\na.png,-2.7\nb.png,-1.2\n")
    ds = load_folder(folder, CFG, progress=False)
    assert list(ds.labels) == [2, 1]


@pytest.mark.parametrize(
    ("csv_text", "error", "needle"),
    [
        ("file,class\nmissing.png,normal\n", InputRejected, "file not found"),
        ("file,class\na.png,fragile\n", InputRejected, "is not one of"),
        ("file,class\n/etc/passwd,normal\n", UsageError, "relative"),
        ("name,class\na.png,normal\n", UsageError, "'file' column"),
        ("file\na.png\n", InputRejected, "neither class nor tscore"),
    ],
)
def test_bad_datasets_fail_with_a_clear_reason(
    tmp_path: Path, csv_text: str, error: type[Exception], needle: str
) -> None:
    folder = _folder(tmp_path, csv_text)
    with pytest.raises(error, match=needle):
        load_folder(folder, CFG, workers=1, progress=False)


def test_folder_without_labels_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="labels.csv"):
        load_folder(tmp_path, CFG, progress=False)
