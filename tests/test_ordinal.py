"""The ordinal head: one T-score estimate, one coherent answer, exact explanations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="PyTorch (the 'train' extra) is not installed")

from edge.answer import AnswerRule, contradictions  # noqa: E402
from model.fusion import fit_ood  # noqa: E402
from model.ordinal import (  # noqa: E402
    OrdinalExport,
    OrdinalFusionNet,
    autograd_gradcam,
    band_probs,
    dlogp_dmu,
    guidance_loss,
)

N_CLIN = 26


def _net(backbone: str = "mobilenet_v3_small") -> OrdinalFusionNet:
    torch.manual_seed(0)
    net = OrdinalFusionNet(backbone, N_CLIN)
    with torch.no_grad():  # a non-degenerate head, as after training
        net.t_img.weight.normal_(0, 0.5)
        net.t_clin.weight.normal_(0, 0.2)
        net.t_gate.normal_(0, 0.1)
        net.log_scale.weight.normal_(0, 0.2)
    net.eval()
    fit_ood(net, torch.randn(64, net.ood_mean.shape[0]))
    return net


def _batch(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c = torch.randn(4, N_CLIN, generator=g)
    c[:, N_CLIN // 2 :] = (torch.rand(4, N_CLIN // 2, generator=g) < 0.3).float()
    return torch.randn(4, 1, size, size, generator=g), c


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "mobilenet_v3_small_os16"])
def test_in_graph_cam_equals_autograd_gradcam_of_each_class_log_probability(
    backbone: str,
) -> None:
    net = _net(backbone)
    x, c = _batch()
    _, _, cam, _, _ = OrdinalExport(net)(x, c)
    ref = autograd_gradcam(net, x, c)
    scale = float(ref.abs().max())
    assert scale > 0
    assert float((cam - ref).abs().max()) <= 1e-4 * scale


def test_the_map_and_the_terms_add_up_to_the_tscore_estimate_exactly() -> None:
    net = _net()
    x, c = _batch()
    with torch.no_grad():
        p = net.parts(x, c)
        mu = net.contribution_map(p["features"]).sum((1, 2)) + net.t_img.bias + p["terms"].sum(1)
        assert torch.allclose(mu, p["mu"][:, 0], atol=1e-5)
        _, tscore, _, attr, _ = OrdinalExport(net)(x, c)
        assert torch.allclose(attr[:, 1], p["terms"], atol=1e-6)  # T-score units
        assert torch.allclose(attr[:, 2], -attr[:, 1] / p["scale"], atol=1e-6)  # logit push
        assert torch.allclose(tscore, p["mu"])


def test_a_missing_fact_changes_the_coefficients_of_the_others_not_its_own_value() -> None:
    net = _net()
    _, c = _batch()
    k = N_CLIN // 2
    with torch.no_grad():
        hidden = c.clone()
        hidden[:, 3] = 0.0
        hidden[:, k + 3] = 1.0
        terms = net.clinical_terms(hidden)
        assert torch.all(terms[:, 3] == 0)  # an unknown value contributes nothing itself


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    import onnxruntime as ort

    from model.export import export_onnx

    net = _net()
    path = tmp_path / "m.onnx"
    export_onnx(OrdinalExport(net), 128, N_CLIN, path)
    x, c = _batch()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy(), "clinical": c.numpy()})
    with torch.no_grad():
        want = OrdinalExport(net)(x, c)
    for g, w in zip(got, want, strict=True):
        w = w.numpy()
        assert g.shape == w.shape
        assert float(np.abs(g - w).max()) <= 1e-4 * max(1.0, float(np.abs(w).max()))


def test_probabilities_are_the_bands_of_one_distribution() -> None:
    mu = torch.linspace(-5, 2, 200)[:, None]
    s = torch.full_like(mu, 0.7)
    p = band_probs(mu, s)
    assert torch.allclose(p.sum(1), torch.ones(200, dtype=p.dtype), atol=1e-6)
    assert torch.all(p >= 0)
    # P(osteoporosis) rises and P(normal) falls as the estimate falls.
    assert torch.all(torch.diff(p[:, 2]) <= 1e-7) and torch.all(torch.diff(p[:, 0]) >= -1e-7)


def test_dlogp_dmu_matches_autograd() -> None:
    mu = torch.linspace(-4, 1, 50, dtype=torch.float64)[:, None].requires_grad_(True)
    s = torch.full_like(mu, 0.8)
    logp = torch.log(band_probs(mu, s))
    want = torch.stack(
        [torch.autograd.grad(logp[:, k].sum(), mu, retain_graph=True)[0][:, 0] for k in range(3)],
        1,
    )
    assert torch.allclose(dlogp_dmu(mu, s), want, atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(
    mu=st.lists(st.floats(-6.0, 3.0), min_size=1, max_size=32),
    s=st.floats(0.1, 2.0),
    thr_frac=st.floats(0.001, 1.0),
)
def test_ordinal_answers_never_contradict_themselves(
    mu: list[float], s: float, thr_frac: float
) -> None:
    t = torch.tensor(mu, dtype=torch.float64)[:, None]
    probs = band_probs(t, torch.full_like(t, s)).numpy()
    floor = 1.0 / (1.0 + np.exp(1.5 / s))
    thr = floor + thr_frac * (0.5 - floor)
    card = {
        "answer": {"class_rule": "who_band_of_tscore", "cuts": [-1.0, -2.5]},
        "referral": {"threshold": thr, "floor": floor},
    }
    rule = AnswerRule.from_card(card)
    found = contradictions(rule, probs, t.numpy()[:, 0])
    assert found == dict.fromkeys(found, 0)


def test_guidance_loss_is_the_share_of_heat_outside_bone() -> None:
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 3.0
    m[0, 3, 3] = -1.0
    inside = torch.zeros(1, 4, 4)
    inside[0, 0, 0] = 1.0
    assert guidance_loss(m, inside).item() == pytest.approx(0.25, abs=1e-4)


def test_focus_layer_is_the_measurement_region_inside_bone_and_moves_with_the_image(
    small_hand_cohort: Path,
) -> None:
    from edge.preprocess import PreprocessConfig
    from model.data import load_folder
    from model.heads import Batch, loss
    from model.train import TrainConfig, augment

    pre = PreprocessConfig(size=128)
    ds = load_folder(small_hand_cohort, pre, site="hand", progress=False, masks=True, focus=True)
    assert ds.focus is not None and ds.signal is not None
    focus, bone = ds.focus.astype(float) / 255.0, ds.signal.astype(float) / 255.0
    # The metacarpal shafts: a small part of the image, almost all of it on bone.
    share = focus.sum((1, 2)) / (bone.sum((1, 2)) + 1e-9)
    assert np.all((share > 0.02) & (share < 0.6)), share
    assert (np.minimum(focus, bone).sum() / focus.sum()) > 0.9
    # Both layers ride through the same augmentation as the image.
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(len(ds), 1, 128, 128)
    layers = torch.from_numpy(np.stack([bone, focus], 1).astype(np.float32))
    _, moved = augment(img, gen, layers)
    assert moved is not None and moved.shape == layers.shape
    # The focus term is the share of the map outside the region, added to the loss.
    net = OrdinalFusionNet("mobilenet_v3_small", N_CLIN)
    cfg = TrainConfig(site="hand", guidance=1.0, focus=0.5)
    b = Batch(
        torch.rand(len(ds), 1, 128, 128),
        torch.zeros(len(ds), N_CLIN),
        torch.from_numpy(ds.labels),
        torch.from_numpy(ds.tscore),
        layers[:, :1],
        layers[:, 1:],
    )
    out = loss(net, b, cfg, 1.0)
    assert 0.0 <= out["off_focus"].item() <= 1.0
    assert out["off_focus"].item() >= out["off_signal"].item() - 1e-6  # region inside bone
    expected = (
        out["nll"] + cfg.band_weight * out["band"] + out["off_signal"] + 0.5 * out["off_focus"]
    )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
