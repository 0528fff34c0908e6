"""Small CNNs: `smallcnn` (paper 003, grayscale 50x50) and `tinycnn` (tests and demo)."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from leukfed.models.registry import IMAGENET_MEAN, IMAGENET_STD, DataConfig, register_model


class SmallCNN(nn.Module):
    """Paper 003: 3 conv layers (32/64/64, 3x3, ReLU, max-pool), 2 dense layers of 128, head.

    The paper's Keras model does not state its padding; we use "same" padding so any input
    >= 16 px works, and size the first dense layer from `image_size`.
    """

    def __init__(self, num_classes: int, image_size: int = 50, in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = (in_chans, 32, 64, 64)
        for cin, cout in pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 8  # three 2x2 max-pools, each flooring
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 128),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.features(x)))


class TinyCNN(nn.Module):
    """About 20k parameters: three conv-BN-ReLU stages, global average pooling, linear head."""

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        chans = (in_chans, 16, 32, 48)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(pairwise(chans)):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            if i < len(chans) - 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model(
    "smallcnn",
    data_config=DataConfig((1, 50, 50), (0.5,), (0.5,), "bilinear", min_size=16, preprocess="gray_median"),
    classifier="fc",
    description="paper 003 modified CNN: grayscale + median blur, 50x50",
)
def smallcnn(num_classes: int, image_size: int, hub: bool) -> nn.Module:
    return SmallCNN(num_classes, image_size)


@register_model(
    "tinycnn",
    data_config=DataConfig((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, "bilinear", min_size=16),
    classifier="fc",
    description="~20k-parameter CNN for tests and the embedded demo",
)
def tinycnn(num_classes: int, image_size: int, hub: bool) -> nn.Module:
    return TinyCNN(num_classes)
