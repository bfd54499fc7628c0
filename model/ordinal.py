"""The ordinal fusion network: one T-score estimate from which class, probabilities and referral
all follow, and a heat map that is the exact image part of that estimate.

    image -> MobileNet -> A [N,C,h,w] -> 1x1 conv + hardswish -> F [N,D,h,w]   (evidence map)
    T_img = w . GAP(F) + b                 (so the map m = w . F / (h w) sums to T_img - b)
    T_clin = sum_j x_j (W_j + sum_m G_jm missing_m) + sum_m U_m missing_m
    T-score estimate mu = T_img + T_clin;  scale s = softplus(a0 + a . missing) * tau
    P(T <= c) = sigmoid((c - mu) / s) for the WHO cut points c = -1, -2.5 (cumulative logit)

One coherent answer (the rule written into the card): the class is the WHO band of ``mu``; the
probabilities are the bands of one logistic distribution centred on ``mu``, so P(osteoporosis)
>= 0.5 exactly when the class is osteoporosis and P(normal) >= 0.5 exactly when it is normal;
referral is P(osteoporosis) >= a threshold kept between the two, so an osteoporosis answer is
always referred and a normal one never is. Nothing can contradict anything else.

The explanation is exact. Because the head is linear after the pooling, ``m`` is each feature
cell's additive share of the image part of the T-score estimate, and Grad-CAM of a class's
log-probability is that map times d log P_k / d mu (a per-image scalar, analytic): the
osteoporosis map is where the image lowers the estimate, the normal map where it raises it.
Clinical contributions are exact too: each fact's term in T_clin (its coefficient may depend on
which other facts are missing, so weight can stand in for an unknown height), in T-score units
and divided by the scale as its push on the log-odds of osteoporosis.

The scale depends on which facts are known, never on their values: with only the facts a DICOM
header carries the distribution is wider, and calibrated as such. Mask guidance during
training ("right for the right reasons", Ross et al. 2017) penalises |m| outside bone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from model.fusion import OOD_TAP, OOD_THUMB
from model.mobilenet import init_weights, make_backbone

CUTS = (-1.0, -2.5)  # WHO: normal T >= -1, osteoporosis T <= -2.5
MIN_SCALE = 0.05
HEAD = "ordinal-tscore-v1"


class OrdinalFusionNet(nn.Module):
    tau: torch.Tensor
    ood_mean: torch.Tensor
    ood_whiten: torch.Tensor
    head = HEAD

    def __init__(
        self, backbone: str, n_clinical: int, evidence: int = 128, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = make_backbone(backbone)
        channels = int(self.backbone.out_channels)  # type: ignore[arg-type]
        self.evidence = nn.Sequential(nn.Conv2d(channels, evidence, 1), nn.Hardswish())
        self.t_img = nn.Linear(evidence, 1)
        self.k = n_clinical // 2
        self.t_clin = nn.Linear(n_clinical, 1, bias=False)
        self.t_gate = nn.Parameter(torch.zeros(self.k, self.k))
        self.log_scale = nn.Linear(self.k, 1)
        self.dropout = nn.Dropout(dropout)
        init_weights(self)
        with torch.no_grad():
            nn.init.normal_(self.t_img.weight, 0.0, 0.05)
            self.t_img.bias.fill_(-1.5)
            self.log_scale.weight.zero_()
            self.log_scale.bias.fill_(-0.3)  # softplus(-0.3) ~ 0.55 T-score units
        self.register_buffer("tau", torch.ones(()))
        with torch.no_grad():
            tap = int(self._body()[:OOD_TAP](torch.zeros(1, 1, 32, 32)).shape[1])
        ood_dim = channels + OOD_THUMB * OOD_THUMB + 2 * tap
        self.register_buffer("ood_mean", torch.zeros(ood_dim))
        self.register_buffer("ood_whiten", torch.eye(ood_dim))

    def _body(self) -> nn.Sequential:
        body = self.backbone.body
        if not isinstance(body, nn.Sequential):
            raise TypeError(f"backbone {self.backbone_name} has no sequential body")
        return body

    def clinical_terms(self, clinical: torch.Tensor) -> torch.Tensor:
        """[N, 2K]: each input's additive term in the T-score estimate (values, then flags)."""
        k = self.k
        w = self.t_clin.weight[0]
        flags = clinical[:, k:]
        coef = w[:k].unsqueeze(0) + flags @ self.t_gate.T
        return torch.cat([clinical[:, :k] * coef, flags * w[k:].unsqueeze(0)], dim=1)

    def scale(self, clinical: torch.Tensor) -> torch.Tensor:
        """[N, 1] logistic scale from the missing flags (calibrated by ``tau``)."""
        s = F.softplus(self.log_scale(clinical[:, self.k :])) + MIN_SCALE
        return s * self.tau

    def parts(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        body = self._body()
        early = body[:OOD_TAP](image)
        a = body[OOD_TAP:](early)
        f = self.evidence(a)
        t_img = self.t_img(self.dropout(f.mean((2, 3))))
        terms = self.clinical_terms(clinical)
        mu = t_img + terms.sum(1, keepdim=True)
        thumb = F.adaptive_avg_pool2d(image, OOD_THUMB).flatten(1)
        e_mean = early.mean((2, 3))
        e_sd = torch.sqrt(torch.clamp((early * early).mean((2, 3)) - e_mean * e_mean, min=1e-12))
        return {
            "features": f,
            "mu": mu,
            "scale": self.scale(clinical),
            "terms": terms,
            "ood_features": torch.cat([a.mean((2, 3)), thumb, e_mean, e_sd], dim=1),
        }

    def contribution_map(self, f: torch.Tensor) -> torch.Tensor:
        """[N, h, w]: each cell's additive share of T_img - b (sums to it exactly)."""
        n, d, h, w = f.shape
        return torch.einsum("d,ndhw->nhw", self.t_img.weight[0], f) / (h * w)


def band_probs(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[N, 3] (normal, osteopenia, osteoporosis) from the cumulative-logit distribution."""
    le1 = torch.sigmoid((CUTS[0] - mu) / s)
    le25 = torch.sigmoid((CUTS[1] - mu) / s)
    return torch.cat([1.0 - le1, torch.clamp(le1 - le25, min=0.0), le25], dim=1)


def dlogp_dmu(mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[N, 3]: d log P_k / d mu for each class, analytic (for Grad-CAM in the graph)."""
    le1 = torch.sigmoid((CUTS[0] - mu) / s)
    le25 = torch.sigmoid((CUTS[1] - mu) / s)
    normal = le1 / s
    osteo = -(1.0 - le25) / s
    d1, d25 = le1 * (1.0 - le1), le25 * (1.0 - le25)
    penia = (d25 - d1) / (s * torch.clamp(le1 - le25, min=1e-6))
    return torch.cat([normal, penia, osteo], dim=1)


def tscore_nll(mu: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Negative log-density of the logistic distribution at the known T-scores ([N])."""
    z = (t - mu) / s
    return torch.log(s) + z + 2.0 * F.softplus(-z)


def band_nll(mu: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-probability of the WHO band (for rows whose T-score is not known)."""
    p = band_probs(mu, s)
    return -torch.log(torch.clamp(p.gather(1, labels[:, None]), min=1e-7))[:, 0]


def guidance_loss(m: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Share of |m| outside the signal (``inside``: [N,h,w] fraction of each cell on bone)."""
    e = m.abs()
    total = e.sum((1, 2)) + 1e-6
    return ((e * (1.0 - inside)).sum((1, 2)) / total).mean()


class OrdinalExport(nn.Module):
    """Inference graph: probs, tscore, cam, clinical_attr and ood from one forward pass."""

    def __init__(self, net: OrdinalFusionNet) -> None:
        super().__init__()
        self.net = net
        # The wrapper itself in eval mode: torch.onnx.export restores the wrapper's mode after
        # exporting, and a wrapper left in training mode would put the network back in it.
        self.eval()

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.net.parts(image, clinical)
        mu, s = p["mu"], p["scale"]
        probs = band_probs(mu, s)
        m = self.net.contribution_map(p["features"])  # [N, h, w]
        cam = torch.relu(dlogp_dmu(mu, s)[:, :, None, None] * m[:, None])
        terms = p["terms"]
        # Rows: push on logit P(normal), the T-score term itself, push on logit P(osteoporosis).
        clinical_attr = torch.stack([terms / s, terms, -terms / s], dim=1)
        z = torch.matmul(p["ood_features"] - self.net.ood_mean, self.net.ood_whiten)
        ood = torch.sqrt((z * z).sum(dim=1, keepdim=True))
        return probs, mu, cam, clinical_attr, ood


def autograd_gradcam(
    net: OrdinalFusionNet, image: torch.Tensor, clinical: torch.Tensor
) -> torch.Tensor:
    """Reference Grad-CAM of each class's log-probability by autograd, for tests."""
    net.eval()
    p = net.parts(image, clinical)
    f = p["features"]
    logp = torch.log(torch.clamp(band_probs(p["mu"], p["scale"]), min=1e-12))
    maps = []
    for k in range(3):
        (grad,) = torch.autograd.grad(logp[:, k].sum(), f, retain_graph=True)
        weights = grad.mean((2, 3), keepdim=True)
        maps.append(torch.relu((weights * f).sum(1)))
    return torch.stack(maps, dim=1)
