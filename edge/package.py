"""Model packages (``models/<name>/``): card, files and their integrity.

A package is refused — never half-used — when its card is malformed, a file it names is missing,
or a file's sha256 differs from the card (a tampered or truncated model). Both outcomes are
audit events (``model_refused`` with the package and the failed check; ``model_loaded`` with
the package, version and each file's sha256), so a clinic can show which model ran when.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge.audit import audit_event
from edge.clinical import ClinicalSpec
from edge.preprocess import PreprocessConfig
from osteofy.errors import Unavailable
from osteofy.fsutil import sha256_file

__all__ = ["CARD_SCHEMA", "PRECISION_FILES", "ModelPackage", "load_package", "sha256_file"]

CARD_SCHEMA = "osteofy.card.v1"
PRECISION_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    card: dict
    preprocess: PreprocessConfig
    clinical: ClinicalSpec

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    def model_file(self, precision: str) -> Path:
        name = PRECISION_FILES.get(precision)
        if name is None or name not in self.card.get("files", {}):
            raise Unavailable(f"model {self.name} has no {precision} file")
        return self.path / name


def _refuse(path: Path, check: str, message: str) -> Unavailable:
    """The error for a refused package, recorded in the audit log first."""
    audit_event("model_refused", package=path.name[-200:], check=check)
    return Unavailable(message)


def load_package(path: Path, verify: bool = True) -> ModelPackage:
    path = Path(path)
    card_path = path / "card.json"
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise _refuse(path, "card", f"{path}: no card.json (not a model package)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise _refuse(path, "card", f"{card_path}: unreadable model card ({exc})") from None
    if not isinstance(card, dict) or card.get("schema") != CARD_SCHEMA:
        schema = card.get("schema") if isinstance(card, dict) else None
        raise _refuse(path, "card", f"{card_path}: unsupported card schema {schema!r}")
    files = card.get("files", {})
    if verify:
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise _refuse(path, "missing_file", f"{path.name}: {name} is missing")
            if sha256_file(f) != digest:
                raise _refuse(
                    path, "sha256", f"{path.name}: {name} fails its integrity check (sha256)"
                )
    try:
        pre = PreprocessConfig.from_card(card["preprocessing"])
        clin = ClinicalSpec.from_card(card["clinical"])
    except (KeyError, TypeError) as exc:
        raise _refuse(path, "card", f"{card_path}: incomplete model card ({exc})") from None
    audit_event(
        "model_loaded",
        package=path.name[-200:],
        name=str(card.get("name", ""))[:200],
        version=str(card.get("version", ""))[:200],
        verified=verify,
        files={str(n)[:200]: str(d)[:64] for n, d in list(files.items())[:64]},
    )
    return ModelPackage(path=path, card=card, preprocess=pre, clinical=clin)
