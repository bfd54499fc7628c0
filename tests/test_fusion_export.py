"""The fusion network's one-pass explanations, in PyTorch and in the exported ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch (the 'train' extra) is not installed")

from model.fusion import ExportModule, FusionNet, autograd_gradcam, fit_ood  # noqa: E402

N_CLIN = 26


def _net(backbone: str = "mobilenet_v3_small") -> FusionNet:
    torch.manual_seed(0)
    net = FusionNet(backbone, N_CLIN)
    with torch.no_grad():  # a non-degenerate head: random weights of a trained-like scale
        for p in (net.fc1.weight, net.fc2.weight, net.clin.weight):
            p.normal_(0, 0.1)
    net.eval()
    fit_ood(net, torch.randn(64, net.ood_mean.shape[0]))
    return net


def _batch(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, size, size, generator=g), torch.randn(4, N_CLIN, generator=g)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 and b.std() == 0:
        return 1.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "mobilenet_v2"])
def test_in_graph_cam_equals_autograd_gradcam(backbone: str) -> None:
    net = _net(backbone)
    x, c = _batch()
    _, _, cam, _, _ = ExportModule(net)(x, c)
    ref = autograd_gradcam(net, x, c)
    for i in range(cam.shape[0]):
        for k in range(cam.shape[1]):
            assert _pearson(cam[i, k].detach().numpy(), ref[i, k].detach().numpy()) >= 0.999


def test_clinical_attributions_sum_to_the_clinical_part_of_the_logit() -> None:
    net = _net()
    x, c = _batch()
    with torch.no_grad():
        _, _, _, attr, _ = ExportModule(net)(x, c)
        assert torch.allclose(attr.sum(-1), net.clin(c), atol=1e-5)


def test_exported_onnx_matches_pytorch_and_autograd(tmp_path: Path) -> None:
    import onnxruntime as ort

    from model.export import export_onnx
    from model.fusion import OUTPUT_NAMES

    net = _net()
    x, c = _batch()
    path = tmp_path / "m.onnx"
    export_onnx(ExportModule(net), 128, N_CLIN, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(
        zip(
            OUTPUT_NAMES,
            sess.run(list(OUTPUT_NAMES), {"image": x.numpy(), "clinical": c.numpy()}),
            strict=True,
        )
    )
    assert got["probs"].shape == (4, 3) and np.allclose(got["probs"].sum(1), 1, atol=1e-5)
    assert got["tscore"].shape == (4, 1) and got["ood"].shape == (4, 1)
    assert got["clinical_attr"].shape == (4, 3, N_CLIN)
    ref = autograd_gradcam(net, x, c).detach().numpy()
    assert got["cam"].shape == ref.shape
    for i in range(4):
        for k in range(3):
            assert _pearson(got["cam"][i, k], ref[i, k]) >= 0.999


def test_ood_is_larger_far_from_the_training_features() -> None:
    net = _net()
    feats = torch.randn(256, net.ood_mean.shape[0])
    fit_ood(net, feats)
    z_in = (feats[:8] - net.ood_mean) @ net.ood_whiten
    z_out = (feats[:8] * 5 + 3 - net.ood_mean) @ net.ood_whiten
    assert (z_out.norm(dim=1) > z_in.norm(dim=1)).all()


def test_library_gradcam_comparison_where_available() -> None:
    try:
        import pytorch_grad_cam  # noqa: F401
    except Exception as exc:  # ImportError, or its torchvision import failing
        pytest.skip(f"pytorch-grad-cam is not importable here (it needs torchvision): {exc}")
    from pytorch_grad_cam import GradCAM

    net = _net()
    x, c = _batch()

    class ImageOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.net(image, c)[0]

    wrapper = ImageOnly().eval()
    cam_lib = GradCAM(model=wrapper, target_layers=[net.backbone.body[-1]])
    _, _, ours, _, _ = ExportModule(net)(x, c)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    lib = cam_lib(input_tensor=x, targets=[ClassifierOutputTarget(2)] * 4)
    up = torch.nn.functional.interpolate(ours[:, 2:3], size=lib.shape[1:], mode="bilinear")
    for i in range(4):
        assert _pearson(up[i, 0].detach().numpy(), lib[i]) >= 0.99
