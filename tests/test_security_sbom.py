"""The SBOM (osteofy/sbom.py): CycloneDX 1.5 JSON, checked structurally against the spec's rules.

No schema validator is installed (and the tool must stay standard-library only), so the test
checks what the CycloneDX 1.5 JSON schema requires of the fields we write: the top-level
keys, component types, purls, hashes, licenses (an expression alone, or license ids/names),
unique bom-refs, and dependencies that point only at declared bom-refs.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from osteofy import sbom

ROOT = Path(__file__).parent.parent
TOP_LEVEL = {"bomFormat", "specVersion", "serialNumber", "version", "metadata", "components",
             "dependencies"}  # fmt: skip
TYPES = {"application", "framework", "library", "container", "platform", "operating-system",
         "device", "device-driver", "firmware", "file", "machine-learning-model",
         "data"}  # fmt: skip
HASH_LENGTHS = {"SHA-256": 64}
PURL = re.compile(r"^pkg:pypi/[a-z0-9][a-z0-9-]*@[A-Za-z0-9.%_~-]+$")


def _all_components(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in components:
        out.append(c)
        out += _all_components(c.get("components", []))
    return out


def _check_component(c: dict[str, Any]) -> None:
    assert c["type"] in TYPES and isinstance(c["name"], str) and c["name"]
    assert isinstance(c["bom-ref"], str) and c["bom-ref"]
    if "purl" in c:
        assert PURL.match(c["purl"]), c["purl"]
    for h in c.get("hashes", []):
        assert re.fullmatch(rf"[0-9a-f]{{{HASH_LENGTHS[h['alg']]}}}", h["content"])
    licenses = c.get("licenses", [])
    if any("expression" in entry for entry in licenses):
        assert len(licenses) == 1 and isinstance(licenses[0]["expression"], str)
    for entry in licenses:
        if "license" in entry:
            lic = entry["license"]
            assert set(lic) in ({"id"}, {"name"}) and next(iter(lic.values()))
            if "id" in lic:
                assert lic["id"] in sbom.SPDX_IDS
    for prop in c.get("properties", []):
        assert set(prop) == {"name", "value"} and isinstance(prop["value"], str)


def test_sbom_is_structurally_valid_cyclonedx_1_5(tmp_path: Path) -> None:
    out = tmp_path / "sbom.json"
    written = sbom.write_sbom(out, ROOT / "models")
    bom = json.loads(out.read_text())
    assert bom == written and set(bom) == TOP_LEVEL
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5"
    assert re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", bom["serialNumber"]) and bom["version"] == 1
    meta = bom["metadata"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["timestamp"])
    assert meta["component"]["name"] == "osteofy-edge" and PURL.match(meta["component"]["purl"])
    assert meta["tools"]["components"][0]["name"] == "osteofy.sbom"
    everything = _all_components(bom["components"])
    for component in everything:
        _check_component(component)
    refs = [c["bom-ref"] for c in everything] + [meta["component"]["bom-ref"]]
    assert len(refs) == len(set(refs))
    for dep in bom["dependencies"]:
        assert dep["ref"] in refs and set(dep["dependsOn"]) <= set(refs)


def test_installed_distributions_are_listed_with_their_versions(tmp_path: Path) -> None:
    bom = sbom.build_sbom()
    libraries = {c["name"].lower(): c for c in bom["components"] if c["type"] == "library"}
    for name in ("numpy", "pydicom", "onnxruntime", "opencv-python-headless", "paho-mqtt",
                 "pydantic"):  # fmt: skip
        assert libraries[name]["version"] == md.version(name), name
        assert libraries[name]["purl"] == f"pkg:pypi/{name}@{md.version(name)}"
    assert any("licenses" in c for c in libraries.values())
    top = next(d for d in bom["dependencies"] if d["ref"] == bom["metadata"]["component"]["purl"])
    assert f"pkg:pypi/pydicom@{md.version('pydicom')}" in top["dependsOn"]
    assert sbom.purl("PyYAML", "6.0.3") == "pkg:pypi/pyyaml@6.0.3"
    assert sbom.purl("torch", "2.13.0+cpu") == "pkg:pypi/torch@2.13.0%2Bcpu"


def test_model_files_are_hashed_as_found_and_compared_with_their_cards(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "hand-v1", models / "hand-v1",
                    ignore=shutil.ignore_patterns("eval*"))  # fmt: skip
    card = json.loads((models / "hand-v1" / "card.json").read_text())
    onnx = models / "hand-v1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")  # tampered after packaging
    bom = sbom.build_sbom(models)
    (package,) = [c for c in bom["components"] if c["type"] == "machine-learning-model"]
    assert package["name"] == card["name"] and package["version"] == card["version"]
    files = {c["name"]: c for c in package["components"]}
    assert set(files) == {"card.json", *card["files"]}
    matches = {n: c["properties"][0]["value"] for n, c in files.items() if n != "card.json"}
    assert matches == {"model.onnx": "false", "model.int8.onnx": "true"}
    int8 = files["model.int8.onnx"]
    assert int8["type"] == "machine-learning-model"
    assert int8["hashes"] == [{"alg": "SHA-256", "content": card["files"]["model.int8.onnx"]}]
    assert files["card.json"]["type"] == "data"


def test_the_sbom_module_needs_only_the_standard_library() -> None:
    tree = ast.parse(Path(sbom.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
        if not (isinstance(node, ast.ImportFrom) and node.module is None)
    }
    assert imported <= set(sys.stdlib_module_names) | {"osteofy", "__future__"}, imported
