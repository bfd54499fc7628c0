"""``osteofy export``: checkpoint -> model package (``model.onnx`` + ``card.json``).

The ONNX graph has the DESIGN.md inputs (``image`` [N,1,S,S], ``clinical`` [N,F]) and outputs
(``probs``, ``tscore``, ``cam``, ``clinical_attr``, ``ood``), all from one forward pass; the card
carries everything a device needs to use it, and the sha256 of every file it describes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from edge.backends.onnxruntime import BATCH_DIM
from edge.package import CARD_SCHEMA, sha256_file
from model.fusion import INPUT_NAMES, OUTPUT_NAMES, ExportModule, FusionNet
from model.ordinal import CUTS, HEAD, OrdinalExport, OrdinalFusionNet
from model.train import load_checkpoint
from osteofy.fsutil import atomic_write_bytes

CLASS_NAMES = ["normal", "osteopenia", "osteoporosis"]


def write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def export_onnx(module: torch.nn.Module, size: int, n_clinical: int, path: Path) -> None:
    image = torch.zeros(1, 1, size, size)
    clinical = torch.zeros(1, n_clinical)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        module,
        (image, clinical),
        str(tmp),
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=17,
        dynamo=False,
        dynamic_axes={n: {0: BATCH_DIM} for n in (*INPUT_NAMES, *OUTPUT_NAMES)},
    )
    os.replace(tmp, path)


def export_package(model_dir: Path, name: str | None = None, version: str = "1.0.0") -> Path:
    """Write ``model.onnx`` and ``card.json`` beside ``checkpoint.pt``; returns the card path."""
    net, meta = load_checkpoint(model_dir / "checkpoint.pt")
    cfg = meta["train_config"]
    size = int(meta["preprocessing"]["size"])
    n_clin = len(meta["clinical"]["input_names"])
    onnx_path = model_dir / "model.onnx"
    if isinstance(net, OrdinalFusionNet):
        module: torch.nn.Module = OrdinalExport(net)
    elif isinstance(net, FusionNet):
        module = ExportModule(net)
    else:
        raise TypeError(f"cannot export {type(net).__name__}")
    export_onnx(module, size, n_clin, onnx_path)
    _verify(onnx_path, module, size, n_clin)
    card_path = model_dir / "card.json"
    old = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card = {
        "schema": CARD_SCHEMA,
        "name": name or model_dir.name,
        "version": version,
        "sites": [cfg["site"]],
        "body_parts": {"hand": ["HAND", "WRIST"], "hip": ["HIP", "PELVIS"]}.get(cfg["site"], []),
        "intended_use": "Screening aid for low bone density on radiographs; not a diagnosis. "
        "Confirm every result with DXA.",
        "backbone": cfg["backbone"],
        "input": {"image": [1, size, size], "clinical": n_clin},
        "preprocessing": meta["preprocessing"],
        "clinical": meta["clinical"],
        "classes": CLASS_NAMES,
        "outputs": list(OUTPUT_NAMES),
        "clinical_inputs": not cfg.get("image_only", False),
        "temperature": meta["temperature"],
        "answer": answer_rule(net),
        "calibration": meta.get("calibration", {}),
        "referral": {
            "rule": "refer when P(osteoporosis) >= threshold",
            **meta.get("referral", {}),
            "threshold": meta["referral_threshold"],
            "chosen_for_validation_sensitivity": cfg["referral_sensitivity"],
        },
        "ood": {
            "threshold": meta["ood_threshold"],
            "meaning": "Mahalanobis distance of pooled image features from training",
        },
        "training_data": {
            "description": "Virtual cohort (synthetic patients and simulated radiographs) "
            "made by `osteofy simulate`; not real patients.",
            "synthetic": True,
            "source": meta["data"],
            "n_train": meta["n_train"],
            "n_validation": meta["n_val"],
        },
        "training": {"seconds": meta["train_seconds"], "config": cfg, "history": meta["history"]},
        "baselines": meta.get("baselines", {}),
        "evaluation": old.get("evaluation", {}),
        "files": {"model.onnx": sha256_file(onnx_path)},
    }
    if (model_dir / "model.int8.onnx").is_file():
        card["files"]["model.int8.onnx"] = sha256_file(model_dir / "model.int8.onnx")
    write_json_atomic(card_path, card)
    return card_path


def answer_rule(net: torch.nn.Module) -> dict:
    """How class, T-score, probabilities and referral relate (the device applies this rule)."""
    if isinstance(net, OrdinalFusionNet):
        return {
            "head": HEAD,
            "class_rule": "who_band_of_tscore",
            "cuts": list(CUTS),
            "rule": "The class is the WHO band of the T-score estimate (normal >= -1 > osteopenia "
            "> -2.5 >= osteoporosis). The probabilities are the bands of one logistic "
            "distribution centred on that estimate, so P(osteoporosis) >= 0.5 exactly when the "
            "class is osteoporosis and P(normal) >= 0.5 exactly when it is normal. Referral is "
            "P(osteoporosis) >= the threshold, which lies above the floor (the largest "
            "P(osteoporosis) of a normal answer) and at or below 0.5: an osteoporosis answer is "
            "always referred, a normal one never.",
            "clinical_attr_rows": [
                "push on logit P(normal)",
                "term of the T-score estimate (T-score units)",
                "push on logit P(osteoporosis)",
            ],
            "cam": "Grad-CAM of each class's log-probability on the evidence map: the image "
            "part of the T-score estimate, cell by cell, times d log P / d estimate",
        }
    return {
        "head": "softmax-v1",
        "class_rule": "argmax",
        "rule": "The class is the most probable one; the T-score is a separate regression.",
    }


def _verify(path: Path, module: torch.nn.Module, size: int, n_clin: int) -> None:
    """The ONNX graph must reproduce PyTorch on a random batch (catches export drift)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, size, size)).astype(np.float32)
    c = rng.standard_normal((2, n_clin)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(list(OUTPUT_NAMES), {"image": x, "clinical": c})
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(c))
    for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
        w = w.numpy()
        tol = 1e-3 * max(1.0, float(np.abs(w).max()))
        if g.shape != w.shape or float(np.abs(g - w).max()) > tol:
            raise RuntimeError(f"ONNX export of {name} differs from PyTorch")
