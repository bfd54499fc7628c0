"""``osteofy train``: fit the fusion network on a folder of radiographs (CPU is enough).

One command does the whole recipe, so the shipped reference packages are reproducible:
split (train / validation, stratified, seeded), train with augmentation and *missing-fact
dropout* (a clinic often knows only what the DICOM header carries: the model must be right and
calibrated then too), optional *mask guidance* (the cohort's bone masks: heat outside bone is
penalised), keep the best epoch by validation loss, calibrate on validation, fit the OOD
statistics on training features, pick the referral threshold on validation, and save
``checkpoint.pt`` plus ``training.json``. ``osteofy export`` then writes the model package.

Two heads: ``ordinal`` (``model.ordinal``: one T-score estimate from which class, probabilities
and referral follow; the reference packages) and ``softmax`` (three logits and a separate
T-score regression: the earlier packages and the image-only baselines).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from edge.clinical import HEADER_FACTS, ClinicalSpec, all_missing, fit_spec, only_facts
from edge.preprocess import PreprocessConfig, normalise
from model import heads
from model.data import Dataset, load_folder
from model.fusion import fit_ood
from model.missing import clinical_matrix, drop_mask, hide_facts


@dataclass
class TrainConfig:
    site: str
    backbone: str = "mobilenet_v3_small_os16"
    head: str = "ordinal"
    size: int = 320
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    seed: int = 0
    tscore_weight: float = 0.3  # softmax head: weight of its T-score regression
    band_weight: float = 0.5  # ordinal head: weight of the WHO-band likelihood
    guidance: float = 0.0  # weight of the mask-guidance loss (needs the cohort's masks)
    focus: float = 0.0  # weight of the loss that pulls the map onto the measurement region
    p_header_only: float = 0.35  # only the facts a DICOM header carries (age, sex, weight)
    p_drop_risk_all: float = 0.3  # all risk factors unknown
    p_drop_risk_each: float = 0.1
    p_drop_anthro: float = 0.1
    p_drop_age_sex: float = 0.02
    referral_sensitivity: float = 0.90
    image_only: bool = False  # a baseline that never sees the clinical facts
    threads: int = 0  # 0: torch default
    extra_data: list[str] = field(default_factory=list)  # more folders (a mixed-domain split)
    preprocess: dict = field(default_factory=dict)


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same seed gives the same validation set."""
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        val.extend(idx[: max(1, int(round(fraction * idx.size)))])
    val_idx = np.sort(np.asarray(val))
    train_idx = np.setdiff1d(np.arange(labels.size), val_idx)
    return train_idx, val_idx


def augment(
    img: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Small geometric and photometric jitter (positioning and processing vary in clinics);
    a guidance mask moves with its image."""
    n = img.shape[0]
    ang = (torch.rand(n, generator=gen) - 0.5) * math.radians(16)
    scale = 1.0 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.1
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, padding_mode="zeros", align_corners=False)
    gain = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    bias = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    moved = None
    if mask is not None:
        moved = F.grid_sample(mask, grid, padding_mode="zeros", align_corners=False)
    return out * gain + bias, moved


def _batches(n: int, size: int, gen: torch.Generator, shuffle: bool):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for a in range(0, n, size):
        yield order[a : a + size]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    images: np.ndarray,
    clinical: np.ndarray,
    pre: PreprocessConfig,
    batch: int = 64,
) -> dict[str, np.ndarray]:
    """The head's raw outputs over a dataset (eval mode, no augmentation)."""
    net.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for a in range(0, images.shape[0], batch):
        x = _channels_last(torch.from_numpy(normalise(images[a : a + batch], pre)))
        c = torch.from_numpy(clinical[a : a + batch])
        for k, v in heads.raw(net, x, c).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def referral_threshold(p_osteoporosis: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """Highest threshold on P(osteoporosis) that refers >= ``sensitivity`` of osteoporosis cases."""
    pos = np.sort(p_osteoporosis[labels == 2])
    if pos.size == 0:
        return 0.5
    k = int(np.floor((1.0 - sensitivity) * pos.size))
    return float(pos[min(k, pos.size - 1)])


def _load(data: Path, cfg: TrainConfig, pre: PreprocessConfig, progress: bool) -> Dataset:
    masks, focus = cfg.guidance > 0, cfg.focus > 0
    ds = load_folder(data, pre, site=cfg.site, progress=progress, masks=masks, focus=focus)
    for extra in cfg.extra_data:
        more = load_folder(
            Path(extra), pre, site=cfg.site, progress=progress, masks=masks, focus=focus
        )
        ds = ds.concat(more)
    return ds


def _patterns(c: np.ndarray, spec: ClinicalSpec) -> list[np.ndarray]:
    """The fact patterns the model is selected and calibrated on: all known, header only."""
    return [c, only_facts(c, spec, HEADER_FACTS)]


def train(data: Path, out: Path, cfg: TrainConfig, progress: bool = True) -> Path:
    """Train and save ``out/checkpoint.pt`` and ``out/training.json``; returns the checkpoint."""
    from tqdm import tqdm

    from cohort.stats import auroc

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    pre = PreprocessConfig(size=cfg.size, **{k: v for k, v in cfg.preprocess.items()})
    t_start = time.time()
    ds = _load(data, cfg, pre, progress)
    train_idx, val_idx = split_indices(ds.labels, cfg.val_fraction, cfg.seed)
    tr, va = ds.subset(train_idx), ds.subset(val_idx)
    spec = fit_spec([dict(f) for f in tr.facts])
    c_tr, c_va = clinical_matrix(tr, spec), clinical_matrix(va, spec)
    if cfg.image_only:
        c_tr, c_va = all_missing(c_tr), all_missing(c_va)
    val_sets = [c_va] if cfg.image_only else _patterns(c_va, spec)
    y_va = np.concatenate([va.labels] * len(val_sets))
    net = heads.make(cfg.head, cfg.backbone, spec.width)
    # channels-last convolutions train about 1.3x faster on a CPU (oneDNN), same weights.
    # (Module.to takes memory_format at run time; torch's stubs do not list it.)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    t_known = ~np.isnan(tr.tscore)
    t_sd = float(np.nanstd(tr.tscore)) if t_known.any() else 1.0
    history: list[dict] = []
    best: tuple[float, dict] | None = None
    for epoch in range(cfg.epochs):
        net.train()
        bar = tqdm(
            total=len(tr),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="img",
            disable=not progress,
            file=sys.stderr,
        )
        sums: dict[str, float] = {}
        for idx in _batches(len(tr), cfg.batch_size, gen, shuffle=True):
            i = idx.numpy()
            mask = None
            layers = [m[i] for m in (tr.signal, tr.focus) if m is not None]
            if layers:
                mask = torch.from_numpy(np.stack(layers, 1).astype(np.float32) / 255.0)
            x, mask = augment(torch.from_numpy(normalise(tr.images[i], pre)), gen, mask)
            focus = None
            if mask is not None and tr.focus is not None:
                focus = mask[:, -1:]
                mask = mask[:, :1] if tr.signal is not None else None
            c = hide_facts(torch.from_numpy(c_tr[i]), drop_mask(len(i), spec, cfg, gen))
            batch = heads.Batch(
                _channels_last(x),
                c,
                torch.from_numpy(tr.labels[i]),
                torch.from_numpy(tr.tscore[i]),
                mask,
                focus,
            )
            losses = heads.loss(net, batch, cfg, t_sd)
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(i)
            bar.update(len(i))
            bar.set_postfix(loss=f"{sums['loss'] / max(bar.n, 1):.3f}")
        bar.close()
        pv = _predict_sets(net, va.images, val_sets, pre)
        val_loss = heads.val_loss(cfg.head, pv, y_va)
        val_auc = auroc(heads.probs(cfg.head, pv)[:, 2], y_va == 2)
        history.append(
            {
                "epoch": epoch + 1,
                **{f"train_{k}": v / len(tr) for k, v in sums.items()},
                "val_loss": val_loss,
                "val_auroc_osteoporosis": val_auc,
            }
        )
        if progress:
            print(
                f"epoch {epoch + 1}: val loss {val_loss:.4f}, val AUROC {val_auc:.3f}",
                file=sys.stderr,
            )
        if best is None or val_loss < best[0]:
            best = (val_loss, {k: v.detach().clone() for k, v in net.state_dict().items()})
    if best is None:
        raise ValueError("training ran no epoch")
    net.load_state_dict(best[1])
    pv = _predict_sets(net, va.images, val_sets, pre)
    calibration = heads.calibrate(net, cfg.head, pv, y_va)
    pv = _predict_sets(net, va.images, val_sets, pre)
    ood_threshold = fit_ood_and_threshold(
        net, predict(net, tr.images, c_tr, pre)["ood_features"], pv["ood_features"][: len(va)]
    )
    threshold = heads.referral(
        net, cfg.head, heads.probs(cfg.head, pv)[:, 2], y_va, cfg.referral_sensitivity
    )
    from cohort.stats import fit_logistic

    # Clinical-only baseline (logistic, osteoporosis vs rest) on the same training rows and the
    # same clinical vector, with the same missing-fact dropout applied once.
    c_drop = hide_facts(torch.from_numpy(c_tr), drop_mask(len(tr), spec, cfg, gen)).numpy()
    w_clin = fit_logistic(c_drop, (tr.labels == 2).astype(float), l2=1.0)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "train_config": asdict(cfg),
        "head": heads.head_name(cfg.head),
        "preprocessing": pre.to_card(),
        "clinical": spec.to_card(),
        "n_train": len(tr),
        "n_val": len(va),
        "data": [str(data), *cfg.extra_data],
        "history": history,
        "calibration": calibration,
        "temperature": calibration.get("temperature", calibration.get("tau")),
        "referral_threshold": threshold["threshold"],
        "referral": threshold,
        "ood_threshold": ood_threshold,
        "t_sd": t_sd,
        "baselines": {
            "clinical_only": {
                "model": "logistic, osteoporosis vs rest",
                "bias": float(w_clin[0]),
                "weights": [float(x) for x in w_clin[1:]],
            }
        },
        "train_seconds": round(time.time() - t_start, 1),
    }
    ckpt = out / "checkpoint.pt"
    torch.save({"state_dict": net.state_dict(), "meta": meta}, ckpt)
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return ckpt


def _predict_sets(
    net: torch.nn.Module, images: np.ndarray, sets: list[np.ndarray], pre: PreprocessConfig
) -> dict[str, np.ndarray]:
    """``predict`` for the same images under several fact patterns, rows concatenated."""
    runs = [predict(net, images, c, pre) for c in sets]
    return {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}


def _ood(net: torch.nn.Module, feats: np.ndarray) -> np.ndarray:
    mean, whiten = net.get_buffer("ood_mean"), net.get_buffer("ood_whiten")
    with torch.no_grad():
        z = (torch.from_numpy(feats) - mean) @ whiten
        return torch.sqrt((z * z).sum(1)).numpy()


def fit_ood_and_threshold(
    net: torch.nn.Module, train_feats: np.ndarray, val_feats: np.ndarray
) -> float:
    """Fit the OOD statistics on training features; threshold = 99.5th percentile of the
    validation distances plus a 10 % margin."""
    fit_ood(net, torch.from_numpy(train_feats))  # type: ignore[arg-type]
    return float(np.percentile(_ood(net, val_feats), 99.5) * 1.10)


def load_checkpoint(path: Path, ood: bool = True) -> tuple[torch.nn.Module, dict]:
    """``ood=False`` loads the weights but not the OOD statistics (to re-fit them)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    cfg = meta["train_config"]
    n_clin = len(meta["clinical"]["input_names"])
    net = heads.make(cfg.get("head", "softmax"), cfg["backbone"], n_clin)
    state = blob["state_dict"]
    if not ood:
        state = {k: v for k, v in state.items() if not k.startswith("ood_")}
    net.load_state_dict(state, strict=ood)
    return net.eval(), meta


def refit_ood(model_dir: Path, data: Path, progress: bool = True) -> float:
    """Re-fit the OOD statistics of a trained checkpoint on its own training split."""
    ckpt = model_dir / "checkpoint.pt"
    net, meta = load_checkpoint(ckpt, ood=False)
    cfg = meta["train_config"]
    pre = PreprocessConfig(**meta["preprocessing"])
    ds = load_folder(data, pre, site=cfg["site"], progress=progress)
    train_idx, val_idx = split_indices(ds.labels, cfg["val_fraction"], cfg["seed"])
    spec = ClinicalSpec.from_card(meta["clinical"])
    tr, va = ds.subset(train_idx), ds.subset(val_idx)
    c_tr, c_va = clinical_matrix(tr, spec), clinical_matrix(va, spec)
    if cfg.get("image_only"):
        c_tr, c_va = all_missing(c_tr), all_missing(c_va)
    meta["ood_threshold"] = fit_ood_and_threshold(
        net,
        predict(net, tr.images, c_tr, pre)["ood_features"],
        predict(net, va.images, c_va, pre)["ood_features"],
    )
    torch.save({"state_dict": net.state_dict(), "meta": meta}, ckpt)
    (model_dir / "training.json").write_text(json.dumps(meta, indent=2))
    return float(meta["ood_threshold"])
