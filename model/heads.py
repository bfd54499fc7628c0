"""What differs between the two heads during training: the network, its loss, its calibration.

``ordinal`` (``model.ordinal``, the reference packages): one T-score estimate and a logistic
scale; the loss is the logistic likelihood of the known T-score plus the WHO band's, and the
calibration is a factor on the scale fitted on validation. ``softmax`` (``model.fusion``, the
earlier packages and the image-only baselines): three logits and a T-score regression, with
temperature scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from model import ordinal
from model.fusion import FusionNet

HEADS = ("ordinal", "softmax")


@dataclass
class Batch:
    image: torch.Tensor
    clinical: torch.Tensor
    labels: torch.Tensor
    tscore: torch.Tensor  # NaN where unknown
    signal: torch.Tensor | None  # [N,1,S,S] share of bone per pixel, for guidance
    focus: torch.Tensor | None = None  # [N,1,S,S] share in the measurement region


def head_name(head: str) -> str:
    return ordinal.HEAD if head == "ordinal" else "softmax-v1"


def make(head: str, backbone: str, n_clinical: int) -> torch.nn.Module:
    if head == "ordinal":
        return ordinal.OrdinalFusionNet(backbone, n_clinical)
    if head == "softmax":
        return FusionNet(backbone, n_clinical)
    raise ValueError(f"unknown head {head!r} (choose from {', '.join(HEADS)})")


def raw(net: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row outputs that calibration and selection need (no gradients)."""
    p = net.parts(x, c)  # type: ignore[operator]
    if isinstance(net, ordinal.OrdinalFusionNet):
        return {"mu": p["mu"][:, 0], "scale": p["scale"][:, 0], "ood_features": p["ood_features"]}
    return {"logits": p["logits"], "tscore": p["tscore"][:, 0], "ood_features": p["ood_features"]}


def probs(head: str, pv: dict[str, np.ndarray], tau: float = 1.0) -> np.ndarray:
    """[N, 3] class probabilities from ``raw`` outputs (``tau`` scales scale / temperature)."""
    if head == "ordinal":
        mu = torch.from_numpy(pv["mu"])[:, None].double()
        s = torch.from_numpy(pv["scale"])[:, None].double() * tau
        return ordinal.band_probs(mu, s).numpy()
    return torch.softmax(torch.from_numpy(pv["logits"]).double() / tau, 1).numpy()


def loss(net: torch.nn.Module, b: Batch, cfg: Any, t_sd: float) -> dict[str, torch.Tensor]:
    p = net.parts(b.image, b.clinical)  # type: ignore[operator]
    known = ~torch.isnan(b.tscore)
    out: dict[str, torch.Tensor] = {}
    if isinstance(net, ordinal.OrdinalFusionNet):
        mu, s = p["mu"][:, 0], p["scale"][:, 0]
        band = ordinal.band_nll(mu[:, None], s[:, None], b.labels)
        t_true = torch.where(known, b.tscore, mu.detach())
        dens = ordinal.tscore_nll(mu, s, t_true)
        main = torch.where(known, dens, band)
        out["nll"] = main.mean()
        out["band"] = band.mean()
        total = out["nll"] + cfg.band_weight * out["band"]
        if cfg.guidance > 0 and b.signal is not None:
            f = p["features"]
            inside = F.adaptive_avg_pool2d(b.signal, f.shape[-2:])[:, 0]
            out["off_signal"] = ordinal.guidance_loss(net.contribution_map(f), inside)
            total = total + cfg.guidance * out["off_signal"]
        if getattr(cfg, "focus", 0.0) > 0 and b.focus is not None:
            f = p["features"]
            region = F.adaptive_avg_pool2d(b.focus, f.shape[-2:])[:, 0]
            out["off_focus"] = ordinal.guidance_loss(net.contribution_map(f), region)
            total = total + cfg.focus * out["off_focus"]
    else:
        total = F.cross_entropy(p["logits"], b.labels)
        out["ce"] = total
        if known.any():
            err = (p["tscore"][:, 0][known] - b.tscore[known]) / t_sd
            total = total + cfg.tscore_weight * F.smooth_l1_loss(err, torch.zeros_like(err))
    out["loss"] = total
    return out


def val_loss(head: str, pv: dict[str, np.ndarray], labels: np.ndarray, tau: float = 1.0) -> float:
    """Mean negative log-likelihood of the WHO class (comparable across heads)."""
    p = probs(head, pv, tau)
    return float(-np.mean(np.log(np.clip(p[np.arange(labels.size), labels], 1e-7, None))))


def _golden(fn, lo: float, hi: float, iters: int = 60) -> float:
    """Minimiser of a unimodal function on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = fn(d)
    return (a + b) / 2.0


def calibrate(
    net: torch.nn.Module, head: str, pv: dict[str, np.ndarray], labels: np.ndarray
) -> dict:
    """Fit the scale factor (ordinal) or temperature (softmax) on validation, set it in ``net``.

    One factor minimising the validation NLL of the WHO class (Guo et al. 2017's temperature
    scaling; for the ordinal head it multiplies the logistic scale).
    """
    log_factor = _golden(lambda lt: val_loss(head, pv, labels, math.exp(lt)), -3.0, 3.0)
    factor = float(np.clip(math.exp(log_factor), 0.05, 20.0))
    before = val_loss(head, pv, labels)
    after = val_loss(head, pv, labels, factor)
    if isinstance(net, ordinal.OrdinalFusionNet):
        net.tau.fill_(factor)
        return {"method": "scale factor on the logistic scale", "tau": factor,
                "val_nll_before": before, "val_nll_after": after}  # fmt: skip
    assert isinstance(net, FusionNet)
    net.temperature.fill_(factor)
    return {"method": "temperature scaling", "temperature": factor,
            "val_nll_before": before, "val_nll_after": after}  # fmt: skip


def referral(
    net: torch.nn.Module, head: str, p_osteo: np.ndarray, labels: np.ndarray, sensitivity: float
) -> dict:
    """The referral threshold on P(osteoporosis), chosen on validation.

    For the ordinal head it is kept inside [floor, 0.5]: at 0.5 or below every osteoporosis
    answer (P >= 0.5) is referred; above the floor — the largest P(osteoporosis) a normal answer
    (T-score estimate >= -1) can have at the widest scale — no normal answer is.
    """
    from model.train import referral_threshold

    thr = referral_threshold(p_osteo, labels, sensitivity)
    out = {"threshold": thr, "chosen_for_validation_sensitivity": sensitivity}
    if isinstance(net, ordinal.OrdinalFusionNet):
        w = net.log_scale.weight.detach()[0]
        top = net.log_scale.bias.detach()[0] + w.clamp(min=0).sum()
        widest = float((F.softplus(top) + ordinal.MIN_SCALE) * net.tau)
        floor = 1.0 / (1.0 + math.exp((ordinal.CUTS[0] - ordinal.CUTS[1]) / widest))
        out["floor"] = floor
        out["widest_scale"] = widest
        if not floor < thr <= 0.5:
            out["chosen"] = thr
            thr = min(max(thr, math.nextafter(floor, 1.0)), 0.5)
            out["threshold"] = thr
    return out
