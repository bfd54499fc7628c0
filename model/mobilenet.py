"""MobileNet backbones with one input channel, defined here (no torchvision).

MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Small/Large (Howard et al. 2019), following
the papers' layer tables; ``features(x)`` returns the last feature map, which the fusion head
pools and Grad-CAM weighs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.ReLU6,
        dilation: int = 1,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                cin,
                cout,
                k,
                stride,
                dilation * (k - 1) // 2,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class InvertedResidualV2(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            ConvBNAct(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride)
    CONFIG = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, in_channels: int = 1, width: float = 1.0, last_channels: int = 1280) -> None:
        super().__init__()
        cin = _make_divisible(32 * width)
        layers: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2)]
        for t, c, n, s in self.CONFIG:
            cout = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidualV2(cin, cout, s if i == 0 else 1, t))
                cin = cout
        self.out_channels = _make_divisible(last_channels * max(1.0, width))
        layers.append(ConvBNAct(cin, self.out_channels, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = nn.functional.relu(self.fc1(s))
        return x * nn.functional.hardsigmoid(self.fc2(s))


class InvertedResidualV3(nn.Module):
    def __init__(
        self,
        cin: int,
        k: int,
        expanded: int,
        cout: int,
        se: bool,
        act: str,
        stride: int,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        act_cls: Callable[[], nn.Module] = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act_cls))
        layers.append(
            ConvBNAct(
                expanded, expanded, k, stride, groups=expanded, act=act_cls, dilation=dilation
            )
        )
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


# (kernel, expanded, out, SE, activation, stride) from the MobileNetV3 paper, tables 1 and 2.
_V3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
_V3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)


class MobileNetV3(nn.Module):
    """``output_stride`` 16 replaces the last stride-2 stage by dilated convolutions: the final
    feature map (and so Grad-CAM) has twice the resolution, for about a third more compute."""

    def __init__(
        self, variant: str = "small", in_channels: int = 1, output_stride: int = 32
    ) -> None:
        super().__init__()
        cfg = _V3_SMALL if variant == "small" else _V3_LARGE
        layers: list[nn.Module] = [ConvBNAct(in_channels, 16, 3, 2, act=nn.Hardswish)]
        cin, stride_so_far, dilation = 16, 2, 1
        for k, exp, cout, se, act, s in cfg:
            if s == 2 and stride_so_far * 2 > output_stride:
                s, dilation = 1, dilation * 2
            stride_so_far *= s
            layers.append(InvertedResidualV3(cin, k, exp, cout, se, act, s, dilation))
            cin = cout
        self.out_channels = 6 * cin  # 576 (small) / 960 (large)
        layers.append(ConvBNAct(cin, self.out_channels, 1, act=nn.Hardswish))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v2": lambda: MobileNetV2(),
    "mobilenet_v3_small": lambda: MobileNetV3("small"),
    "mobilenet_v3_small_os16": lambda: MobileNetV3("small", output_stride=16),
    "mobilenet_v3_large": lambda: MobileNetV3("large"),
}


def make_backbone(name: str) -> nn.Module:
    try:
        return BACKBONES[name]()
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})"
        ) from None


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
