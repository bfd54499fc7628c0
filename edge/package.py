"""Model packages (``models/<name>/``): card, files and their integrity.

A package is refused — never half-used — when its card is malformed, a file it names is missing,
or a file's sha256 differs from the card (a tampered or truncated model).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edge.clinical import ClinicalSpec
from edge.preprocess import PreprocessConfig
from osteofy.errors import Unavailable

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_package(path: Path, verify: bool = True) -> ModelPackage:
    path = Path(path)
    card_path = path / "card.json"
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise Unavailable(f"{path}: no card.json (not a model package)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise Unavailable(f"{card_path}: unreadable model card ({exc})") from None
    if card.get("schema") != CARD_SCHEMA:
        raise Unavailable(f"{card_path}: unsupported card schema {card.get('schema')!r}")
    if verify:
        for name, digest in card.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise Unavailable(f"{path.name}: {name} is missing")
            if sha256_file(f) != digest:
                raise Unavailable(f"{path.name}: {name} fails its integrity check (sha256)")
    try:
        pre = PreprocessConfig.from_card(card["preprocessing"])
        clin = ClinicalSpec.from_card(card["clinical"])
    except (KeyError, TypeError) as exc:
        raise Unavailable(f"{card_path}: incomplete model card ({exc})") from None
    return ModelPackage(path=path, card=card, preprocess=pre, clinical=clin)
