"""DSCNet (paper 004): fixed image-filter stage, then dense blocks with concatenating skips.

Our reading of the paper (it gives no layer table):
- Filter stage: a fixed depthwise bank applied to each RGB channel: identity, Gaussian blur
  (5x5, sigma 1), unsharp-mask sharpen (2*identity - Gaussian) and a Laplacian edge map,
  concatenated to 12 channels. It is a buffer, not a parameter: the paper describes a
  preprocessing filter, a learned linear filter followed by the linear stem conv would add
  nothing the stem cannot learn, and federated averaging has nothing extra to average.
- Stem: 3x3/2 conv -> BN -> ReLU -> 3x3/2 max-pool.
- Three DenseNet-BC blocks (4, 6, 8 layers, growth 24; BN-LeakyReLU-1x1 conv -> BN-LeakyReLU-3x3
  conv, output concatenated to the input), with BN-LeakyReLU-1x1 conv-avgpool transitions
  halving the channels.
- BN-ReLU, global average pooling, dropout 0.1, linear head (~0.66M parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from leukfed.common.errors import LeukError
from leukfed.models.registry import default_data_config, register_model

_SLOPE = 0.1  # LeakyReLU negative slope inside the dense blocks
NORMS = ("batch", "group")
_GROUPS = 8  # GroupNorm groups: every DSCNet width (32 + k*24, halved) is a multiple of 8
NormFactory = Callable[[int], nn.Module]


def norm_layer(kind: str) -> NormFactory:
    """`batch`: BatchNorm2d (running statistics); `group`: GroupNorm, the same per-sample in train and
    eval mode and nothing but weights for federated averaging (same parameter names, no buffers)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda chans: nn.GroupNorm(math.gcd(_GROUPS, chans), chans)
    raise LeukError(f"unknown DSCNet norm {kind!r}; choose one of {', '.join(NORMS)}")


def filter_bank(size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """(4, size, size) kernels: identity, Gaussian, sharpen, Laplacian."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    g1 = torch.exp(-(r**2) / (2 * sigma**2))
    gauss = torch.outer(g1, g1)
    gauss /= gauss.sum()
    ident = torch.zeros(size, size)
    ident[size // 2, size // 2] = 1.0
    lap = torch.zeros(size, size)
    c = size // 2
    lap[c, c] = 4.0
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        lap[c + dy, c + dx] = -1.0
    return torch.stack([ident, gauss, 2 * ident - gauss, lap])


class FilterStage(nn.Module):
    """Fixed depthwise filter bank: C input channels -> 4*C filtered channels."""

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        bank = filter_bank()
        self.pad = bank.shape[-1] // 2
        self.groups = in_chans
        weight = bank.repeat(in_chans, 1, 1).unsqueeze(1)  # (4*C, 1, k, k)
        self.register_buffer("weight", weight, persistent=False)

    @property
    def out_chans(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return F.conv2d(x, self.weight, groups=self.groups)


class DenseLayer(nn.Module):
    """BN-LeakyReLU-1x1 conv (4*growth) -> BN-LeakyReLU-3x3 conv (growth); output appended."""

    def __init__(self, in_chans: int, growth: int, norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        mid = 4 * growth
        self.body = nn.Sequential(
            norm(in_chans),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv2d(in_chans, mid, 1, bias=False),
            norm(mid),
            nn.LeakyReLU(_SLOPE, inplace=True),
            nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def dense_block(in_chans: int, layers: int, growth: int, norm: NormFactory = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(*(DenseLayer(in_chans + i * growth, growth, norm) for i in range(layers)))


def transition(in_chans: int, out_chans: int, norm: NormFactory = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(
        norm(in_chans),
        nn.LeakyReLU(_SLOPE, inplace=True),
        nn.Conv2d(in_chans, out_chans, 1, bias=False),
        nn.AvgPool2d(2),
    )


class DSCNet(nn.Module):
    """Dense Skip Connection Net; forward returns logits."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_chans: int = 3,
        stem_chans: int = 32,
        growth: int = 24,
        block_layers: tuple[int, ...] = (4, 6, 8),
        drop_rate: float = 0.1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        make_norm = norm_layer(norm)
        self.filters = FilterStage(in_chans)
        self.stem = nn.Sequential(
            nn.Conv2d(self.filters.out_chans, stem_chans, 3, stride=2, padding=1, bias=False),
            make_norm(stem_chans),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        chans = stem_chans
        for i, n in enumerate(block_layers):
            stages.append(dense_block(chans, n, growth, make_norm))
            chans += n * growth
            if i < len(block_layers) - 1:
                stages.append(transition(chans, chans // 2, make_norm))
                chans //= 2
        self.features = nn.Sequential(*stages, make_norm(chans), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(chans, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=_SLOPE)
            elif isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(self.filters(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


@register_model(
    "dscnet",
    data_config=default_data_config(224, min_size=32),
    classifier="fc",
    description="paper 004 DSCNet: filter stage + 3 dense blocks, dropout 0.1",
)
def dscnet(num_classes: int, image_size: int, hub: bool) -> nn.Module:
    return DSCNet(num_classes)


@register_model(
    "dscnet_gn",
    data_config=default_data_config(224, min_size=32),
    classifier="fc",
    description="DSCNet with GroupNorm (8 groups) for BatchNorm: no running statistics to drift or average",
)
def dscnet_gn(num_classes: int, image_size: int, hub: bool) -> nn.Module:
    return DSCNet(num_classes, norm="group")
