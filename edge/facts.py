"""Clinical facts of a study: from its DICOM header, a sidecar file and ``--clinical``.

Patient's Age, Sex, Weight and Size come from the header; a sidecar ``<file>.json`` beside the
DICOM file and the ``--clinical`` JSON may add or override facts (later sources win). An
implausible header value becomes unknown with a note (a person did not state it here); an
unknown name, a wrong type or an implausible value in an explicit source is refused, because a
typo in a person's statement must be seen, not dropped. Unknown facts stay None — never guessed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from pydicom.dataset import Dataset

from edge.clinical import FEATURES, INPUT_FACTS
from edge.dicom_values import reject as _reject
from edge.dicom_values import text_value as _text

__all__ = [
    "dicom_age_years",
    "facts_from_dicom",
    "merge_facts",
    "parse_facts_json",
    "read_sidecar",
    "sidecar_path",
]

_KIND = {name: kind for name, kind, _ in FEATURES}
_RANGE = {name: bounds for name, _, bounds in FEATURES}
_AGE = re.compile(r"(\d{1,3})([DWMY])")
_PER_YEAR = {"D": 365.25, "W": 365.25 / 7.0, "M": 12.0, "Y": 1.0}
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?")
_SIDECAR_MAX = 64 * 1024
_SEX_WORDS = {"M": 1.0, "MALE": 1.0, "F": 0.0, "FEMALE": 0.0,
              "O": None, "OTHER": None, "U": None, "UNKNOWN": None}  # fmt: skip


def _plausible(x: float, name: str, label: str, notes: list[str]) -> float | None:
    lo, hi = _RANGE[name]
    if lo <= x <= hi:
        return x
    notes.append(f"{label} is outside the plausible range {lo:g}-{hi:g}; treated as unknown")
    return None


def _decimal(ds: Dataset, tag: int, label: str, notes: list[str]) -> float | None:
    text = _text(ds, tag)
    if text is None:
        return None
    if _DECIMAL.fullmatch(text) and math.isfinite(x := float(text)):
        return x
    notes.append(f"{label} is not a number; treated as unknown")
    return None


def dicom_age_years(text: str) -> float | None:
    """An Age String (``065Y``, ``006M``, ``010W``, ``030D``) in years; None if not one."""
    m = _AGE.fullmatch(text.strip().upper())
    return None if m is None else int(m[1]) / _PER_YEAR[m[2]]


def facts_from_dicom(ds: Dataset, notes: list[str] | None = None) -> dict[str, float | None]:
    """Age, sex, weight and height from the header; unknown or implausible values are None.

    Values are read as raw bytes, so pydicom never validates (and logs) a patient value. A value
    that cannot be read, or lies outside the model's plausible range, is dropped with a plain
    note appended to ``notes`` (no value in it), never repaired: a Patient Size above 3 is
    probably centimetres, but guessing would put a silent error into the model's input.
    """
    notes = [] if notes is None else notes
    out: dict[str, float | None] = dict.fromkeys(("age_years", "sex_male", "weight_kg", "height_m"))
    age_text = _text(ds, 0x00101010)
    age = dicom_age_years(age_text) if age_text else None
    if age is not None:
        out["age_years"] = _plausible(age, "age_years", "Patient Age", notes)
    elif age_text:
        notes.append("Patient Age is not in the DICOM form such as 065Y; treated as unknown")
    sex = (_text(ds, 0x00100040) or "").upper()
    if sex in ("M", "F"):
        out["sex_male"] = _SEX_WORDS[sex]
    elif sex not in ("", "O"):
        notes.append("Patient Sex is not M, F or O; treated as unknown")
    weight = _decimal(ds, 0x00101030, "Patient Weight", notes)
    if weight:  # 0 is how many systems write "not weighed"
        out["weight_kg"] = _plausible(weight, "weight_kg", "Patient Weight", notes)
    size = _decimal(ds, 0x00101020, "Patient Size", notes)
    if size and size > 3.0:
        notes.append("Patient Size looks like centimetres, not metres; treated as unknown")
    elif size:
        out["height_m"] = _plausible(size, "height_m", "Patient Size", notes)
    return out


def _fact(name: str, value: object, source: str) -> float | None:
    """One explicit fact, type- and range-checked; the reason never repeats the value."""
    if name == "sex":
        word = value.strip().upper() if isinstance(value, str) else None
        if word not in _SEX_WORDS:
            raise _reject(f"clinical fact sex in the {source} must be M, F or O", "clinical")
        return _SEX_WORDS[word]
    if _KIND[name] == "binary":
        if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
            return float(value)
        raise _reject(f"clinical fact {name} in the {source} must be true/false or 1/0", "clinical")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _reject(f"clinical fact {name} in the {source} must be a number", "clinical")
    lo, hi = _RANGE[name]
    if not lo <= value <= hi:
        reason = f"clinical fact {name} in the {source} is outside the plausible {lo:g}-{hi:g}"
        raise _reject(reason, "clinical")
    return float(value)


def _explicit(facts: object, source: str) -> dict[str, float]:
    if not isinstance(facts, Mapping):
        raise _reject(f"the {source} must be a JSON object of clinical facts", "clinical")
    out: dict[str, float] = {}
    for key, value in facts.items():
        if key != "sex" and key not in INPUT_FACTS:
            shown = key if isinstance(key, str) and re.fullmatch(r"[a-z_]{1,40}", key) else "?"
            raise _reject(f"unknown clinical fact '{shown}' in the {source}", "clinical")
        x = None if value is None else _fact(key, value, source)
        name = "sex_male" if key == "sex" else key
        if x is None:
            continue
        if name in out and out[name] != x:
            raise _reject(f"sex and sex_male disagree in the {source}", "clinical")
        out[name] = x
    return out


def merge_facts(
    dicom_facts: Mapping[str, object],
    sidecar: Mapping[str, object] | None = None,
    cli: Mapping[str, object] | None = None,
) -> dict[str, float | None]:
    """Every INPUT_FACTS name -> value or None; the sidecar overrides DICOM, ``cli`` both.

    An explicit ``null`` means "not known here" and overrides nothing. Unknown names, wrong
    types and implausible values are refused: an explicit fact is a person's statement, and a
    typo in it must be seen, not dropped.
    """
    out: dict[str, float | None] = dict.fromkeys(INPUT_FACTS)
    sources = {"DICOM header": dicom_facts, "clinical sidecar file": sidecar, "--clinical": cli}
    for source, facts in sources.items():
        if facts is not None:
            out.update(_explicit(facts, source))
    return out


def parse_facts_json(text: str | bytes, source: str = "--clinical facts") -> dict[str, object]:
    """A JSON object of clinical facts, or IngestRejected naming the ``source``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise _reject(f"the {source} is not valid JSON", "clinical") from None
    if not isinstance(value, dict):
        raise _reject(f"the {source} must be a JSON object of clinical facts", "clinical")
    return value


def sidecar_path(path: Path) -> Path:
    """``<file>.json`` beside the DICOM file (``a.dcm`` -> ``a.dcm.json``)."""
    return path.with_name(path.name + ".json")


def read_sidecar(path: Path) -> dict[str, object] | None:
    """The clinical facts of the sidecar beside ``path``, or None when there is none."""
    try:
        with open(sidecar_path(Path(path)), "rb") as fh:
            data = fh.read(_SIDECAR_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError:
        raise _reject("the clinical sidecar file could not be read", "clinical") from None
    if len(data) > _SIDECAR_MAX:
        raise _reject("the clinical sidecar file is too large", "clinical")
    return parse_facts_json(data, "clinical sidecar file")
