"""A CycloneDX 1.5 SBOM of what is installed: Python distributions and the model packages.

Why: a medical device must be able to say exactly what it runs - for vulnerability notices
(which devices carry the affected version of OpenCV or pydicom?) and for audits (which model,
byte for byte, produced these results?). The SBOM is built from ``importlib.metadata`` (the
environment actually installed, not the one ``pyproject.toml`` asks for) and from the model
packages' files as found on disk, hashed here rather than copied from their cards, so a
tampered file shows up as a hash that differs from the card (``osteofy:card-sha256-matches``).

Pure standard library: the tool that inventories the environment must not add to it.
The command line wires it as ``osteofy sbom --out FILE``; ``python -m osteofy.sbom --out FILE``
does the same without the CLI.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import re
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from osteofy import __version__
from osteofy.compat import UTC
from osteofy.fsutil import atomic_write_bytes, sha256_file

__all__ = ["SPEC_VERSION", "build_sbom", "purl", "write_sbom"]

SPEC_VERSION = "1.5"
SELF = "osteofy-edge"
# SPDX identifiers that distributions commonly write in their License field; anything else
# is recorded as a license *name*, never guessed into an identifier.
SPDX_IDS = frozenset({
    "0BSD", "AGPL-3.0-only", "AGPL-3.0-or-later", "Apache-2.0", "BSD-2-Clause",
    "BSD-3-Clause", "BSL-1.0", "CC0-1.0", "EPL-2.0", "GPL-2.0-only", "GPL-2.0-or-later",
    "GPL-3.0-only", "GPL-3.0-or-later", "HPND", "ISC", "LGPL-2.1-only", "LGPL-2.1-or-later",
    "LGPL-3.0-only", "LGPL-3.0-or-later", "MIT", "MIT-CMU", "MPL-2.0", "PSF-2.0", "Python-2.0",
    "Unlicense", "Zlib",
})  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def _normalise(name: str) -> str:
    """PEP 503 name, which is also the purl-spec form for ``pkg:pypi``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def purl(name: str, version: str) -> str:
    """``pkg:pypi/<normalised name>@<percent-encoded version>``."""
    return f"pkg:pypi/{quote(_normalise(name), safe='')}@{quote(version, safe='.-_~')}"


def _field(meta: md.PackageMetadata, key: str) -> str:
    """A metadata field's first value, stripped; "" when absent."""
    values = meta.get_all(key) or []
    return str(values[0]).strip() if values else ""


def _licenses(meta: md.PackageMetadata) -> list[dict[str, Any]]:
    """CycloneDX ``licenses``: one SPDX expression, or license ids/names; [] if none declared."""
    expression = _field(meta, "License-Expression")
    if expression:
        return [{"expression": expression}]
    out: list[dict[str, Any]] = []
    field = _field(meta, "License")
    if field and "\n" not in field and len(field) <= 100:  # long fields are the full text
        out.append({"license": {"id": field} if field in SPDX_IDS else {"name": field}})
    for classifier in meta.get_all("Classifier") or []:
        parts = [p.strip() for p in classifier.split("::")]
        if parts[0] == "License" and len(parts) > 1 and parts[-1] != "OSI Approved":
            entry = {"license": {"name": parts[-1]}}
            if entry not in out:
                out.append(entry)
    return out


def _requirements(dist: md.Distribution) -> list[str]:
    """Normalised names this distribution needs unconditionally (extras left out)."""
    names = []
    for req in dist.requires or []:
        requirement, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        m = _NAME.match(requirement.strip())
        if m:
            names.append(_normalise(m.group(0)))
    return names


def _distributions() -> dict[str, md.Distribution]:
    """Installed distributions by normalised name (the first on sys.path wins, as at import)."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and _normalise(name) not in found:
            found[_normalise(name)] = dist
    return found


def _library(dist: md.Distribution) -> dict[str, Any]:
    meta = dist.metadata
    ref = purl(meta["Name"], dist.version)
    component: dict[str, Any] = {
        "type": "library",
        "bom-ref": ref,
        "name": meta["Name"],
        "version": dist.version,
        "purl": ref,
    }
    if _field(meta, "Summary"):
        component["description"] = _field(meta, "Summary")[:300]
    licenses = _licenses(meta)
    if licenses:
        component["licenses"] = licenses
    return component


def _model(folder: Path) -> dict[str, Any] | None:
    """A model package as a ``machine-learning-model`` component with one child per file."""
    card_path = folder / "card.json"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict):
        return None
    files = card.get("files")
    if not isinstance(files, dict):
        files = {}
    ref = f"model:{folder.name}"
    children: list[dict[str, Any]] = [
        {
            "type": "data",
            "bom-ref": f"{ref}/card.json",
            "name": "card.json",
            "hashes": [{"alg": "SHA-256", "content": sha256_file(card_path)}],
            "description": "model card: preprocessing, features, thresholds, metrics",
        }
    ]
    for name, expected in sorted(files.items()):
        path = folder / str(name)
        child: dict[str, Any] = {
            "type": "machine-learning-model" if str(name).endswith(".onnx") else "data",
            "bom-ref": f"{ref}/{name}",
            "name": str(name),
        }
        if path.is_file():
            digest = sha256_file(path)
            child["hashes"] = [{"alg": "SHA-256", "content": digest}]
            matches = "true" if digest == expected else "false"
        else:
            matches = "missing"
        child["properties"] = [{"name": "osteofy:card-sha256-matches", "value": matches}]
        children.append(child)
    component: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": ref,
        "name": str(card.get("name") or folder.name),
        "version": str(card.get("version", "0")),
        "description": str(card.get("intended_use") or "osteofy model package")[:300],
        "properties": [
            {"name": "osteofy:package-folder", "value": folder.name},
            {"name": "osteofy:card-schema", "value": str(card.get("schema", ""))},
            {"name": "osteofy:sites", "value": ",".join(map(str, card.get("sites", [])))},
        ],
        "components": children,
    }
    return component


def build_sbom(models_dir: Path | None = None) -> dict[str, Any]:
    """The SBOM as a dict: every installed distribution, and each package in ``models_dir``."""
    dists = _distributions()
    own = dists.pop(_normalise(SELF), None)
    own_version = own.version if own is not None else __version__
    own_ref = purl(SELF, own_version)
    libraries = [_library(d) for _, d in sorted(dists.items())]
    refs = {
        _normalise(d.metadata["Name"]): purl(d.metadata["Name"], d.version) for d in dists.values()
    }
    refs[_normalise(SELF)] = own_ref
    dependencies = []
    for name, dist in sorted([*dists.items(), *([(SELF, own)] if own is not None else [])]):
        needs = sorted({refs[r] for r in _requirements(dist) if r in refs and r != name})
        dependencies.append({"ref": refs[_normalise(name)], "dependsOn": needs})
    models = []
    if models_dir is not None and Path(models_dir).is_dir():
        for card in sorted(Path(models_dir).glob("*/card.json")):
            component = _model(card.parent)
            if component is not None:
                models.append(component)
    if models:
        top = next(d for d in dependencies if d["ref"] == own_ref) if own is not None else None
        if top is not None:
            top["dependsOn"] = sorted([*top["dependsOn"], *(m["bom-ref"] for m in models)])
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "tools": {
                "components": [
                    {"type": "application", "name": "osteofy.sbom", "version": __version__}
                ]
            },
            "component": {
                "type": "application",
                "bom-ref": own_ref,
                "name": SELF,
                "version": own_version,
                "purl": own_ref,
                "description": "Osteofy Edge: explainable osteoporosis screening on the device",
            },
            "properties": [
                {"name": "osteofy:python", "value": platform.python_version()},
                {"name": "osteofy:platform", "value": f"{sys.platform}-{platform.machine()}"},
            ],
        },
        "components": libraries + models,
        "dependencies": dependencies,
    }


def write_sbom(path: Path, models_dir: Path | None = None) -> dict[str, Any]:
    """Write the SBOM as JSON to ``path`` (atomically) and return it."""
    bom = build_sbom(models_dir)
    data = (json.dumps(bom, indent=2, ensure_ascii=True) + "\n").encode("ascii")
    atomic_write_bytes(Path(path), data)
    return bom


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osteofy.sbom", description=__doc__)
    parser.add_argument("--out", required=True, help="where to write the CycloneDX JSON")
    parser.add_argument("--models", default="models", help="model packages folder")
    args = parser.parse_args(argv)
    bom = write_sbom(Path(args.out), Path(args.models))
    print(f"wrote {args.out}: {len(bom['components'])} components (CycloneDX {SPEC_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
