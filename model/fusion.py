"""The fusion network and its one-pass explanation graph.

Logits are *additive* in the two modalities:

    logit_k = MLP_img(GAP(A))_k + sum_j W_kj * clinical_j

- The image part is GAP -> Linear -> ReLU -> Linear, so the gradient of a logit with respect to
  the pooled features is analytic: dlogit_k/dp = W2[k] * 1[W1 p + b1 > 0] @ W1. Grad-CAM's
  channel weights are that gradient divided by h*w (the GAP), so ``cam`` is computed in the
  forward graph — no backward pass, exportable to ONNX and TensorRT, and it works for a
  multi-input model because the clinical branch does not touch the image path.
- The clinical part is linear, so ``clinical_attr[k, j] = W_kj * clinical_j`` is each input's
  exact contribution to logit k, relative to a patient at the training means with every fact
  known (all-zero input).
- ``ood`` is the Mahalanobis distance, from the training set's, of the pooled features joined
  with an 8x8 thumbnail of the input and the per-channel mean and SD of an early layer's
  activations: deep features alone can miss a grossly wrong image (an inverted one has
  hand-like features, noise or a blank plate have pelvis-like ones), the early statistics see
  texture that is not a radiograph's. Fitted after training (``fit_ood``).
"""

from __future__ import annotations

import torch
from torch import nn

from model.mobilenet import init_weights, make_backbone

OOD_THUMB = 8  # side of the input thumbnail joined to the pooled features for ``ood``
OOD_TAP = 4  # backbone layers before the tap whose activation mean/SD also feed ``ood``


class FusionNet(nn.Module):
    temperature: torch.Tensor
    ood_mean: torch.Tensor
    ood_whiten: torch.Tensor

    def __init__(
        self,
        backbone: str,
        n_clinical: int,
        hidden: int = 128,
        n_classes: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = make_backbone(backbone)
        channels = int(self.backbone.out_channels)  # type: ignore[arg-type]
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)
        self.clin = nn.Linear(n_clinical, n_classes, bias=False)
        self.t_img = nn.Linear(hidden, 1)
        self.t_clin = nn.Linear(n_clinical, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        init_weights(self)
        # Temperature (calibration) and OOD statistics are buffers: saved, not trained.
        self.register_buffer("temperature", torch.ones(()))
        with torch.no_grad():
            tap_channels = int(self._body()[:OOD_TAP](torch.zeros(1, 1, 32, 32)).shape[1])
        ood_dim = channels + OOD_THUMB * OOD_THUMB + 2 * tap_channels
        self.register_buffer("ood_mean", torch.zeros(ood_dim))
        self.register_buffer("ood_whiten", torch.eye(ood_dim))

    def _body(self) -> nn.Sequential:
        body = self.backbone.body
        if not isinstance(body, nn.Sequential):
            raise TypeError(f"backbone {self.backbone_name} has no sequential body")
        return body

    def parts(self, image: torch.Tensor, clinical: torch.Tensor) -> dict[str, torch.Tensor]:
        body = self._body()
        early = body[:OOD_TAP](image)
        a = body[OOD_TAP:](early)
        pooled = a.mean((2, 3))
        pre = self.fc1(pooled)
        h = torch.relu(pre)
        logits = self.fc2(self.dropout(h)) + self.clin(clinical)
        tscore = self.t_img(h) + self.t_clin(clinical)
        thumb = torch.nn.functional.adaptive_avg_pool2d(image, OOD_THUMB).flatten(1)
        e_mean = early.mean((2, 3))
        e_sd = torch.sqrt(torch.clamp((early * early).mean((2, 3)) - e_mean * e_mean, min=1e-12))
        return {
            "features": a,
            "pooled": pooled,
            "pre": pre,
            "logits": logits,
            "tscore": tscore,
            "ood_features": torch.cat([pooled, thumb, e_mean, e_sd], dim=1),
        }

    def forward(
        self, image: torch.Tensor, clinical: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts(image, clinical)
        return p["logits"], p["tscore"]

    def image_logit_gradient(self, pre: torch.Tensor) -> torch.Tensor:
        """d logit / d pooled for every class: [N, K, C], from the ReLU mask of the head."""
        mask = (pre > 0).to(pre.dtype)  # [N, H]
        g = self.fc2.weight.unsqueeze(0) * mask.unsqueeze(1)  # [N, K, H]
        return torch.matmul(g, self.fc1.weight)  # [N, K, C]


class ExportModule(nn.Module):
    """Inference graph with all DESIGN.md outputs from one forward pass."""

    def __init__(self, net: FusionNet) -> None:
        super().__init__()
        self.net = net
        # The wrapper itself in eval mode: torch.onnx.export restores the wrapper's mode after
        # exporting, and a wrapper left in training mode would put the network back in it.
        self.eval()

    def forward(self, image: torch.Tensor, clinical: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.net.parts(image, clinical)
        a = p["features"]
        n, c, h, w = a.shape
        probs = torch.softmax(p["logits"] / self.net.temperature, dim=1)
        alpha = self.net.image_logit_gradient(p["pre"]) / (h * w)  # Grad-CAM weights
        cam = torch.relu(torch.matmul(alpha, a.reshape(n, c, h * w))).reshape(n, -1, h, w)
        clinical_attr = clinical.unsqueeze(1) * self.net.clin.weight.unsqueeze(0)
        z = torch.matmul(p["ood_features"] - self.net.ood_mean, self.net.ood_whiten)
        ood = torch.sqrt((z * z).sum(dim=1, keepdim=True))
        return probs, p["tscore"], cam, clinical_attr, ood


OUTPUT_NAMES = ("probs", "tscore", "cam", "clinical_attr", "ood")
INPUT_NAMES = ("image", "clinical")


def autograd_gradcam(net: FusionNet, image: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
    """Reference Grad-CAM by autograd (backward pass), for tests: [N, K, h, w]."""
    net.eval()
    p = net.parts(image, clinical)
    a = p["features"]
    logits = p["logits"]
    maps = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), a, retain_graph=True)
        weights = grad.mean((2, 3), keepdim=True)
        maps.append(torch.relu((weights * a).sum(1)))
    return torch.stack(maps, dim=1)


@torch.no_grad()
def fit_ood(net: FusionNet, pooled: torch.Tensor, shrinkage: float = 0.1) -> None:
    """Set the Mahalanobis statistics from training-set ``ood_features`` [N, D]."""
    mean = pooled.mean(0)
    x = pooled - mean
    cov = x.T @ x / max(pooled.shape[0] - 1, 1)
    # Shrink towards the diagonal: C can exceed N, and the inverse must stay well conditioned.
    target = torch.diag(torch.diag(cov)).clamp_min(1e-6)
    cov = (1 - shrinkage) * cov + shrinkage * target
    evals, evecs = torch.linalg.eigh(cov.double())
    whiten = evecs @ torch.diag(evals.clamp_min(1e-9).rsqrt()) @ evecs.T
    net.ood_mean.copy_(mean)
    net.ood_whiten.copy_(whiten.float())
