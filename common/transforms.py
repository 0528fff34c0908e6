"""Preprocessing and augmentation driven by a model's data config."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.transforms.functional import InterpolationMode

from leukfed.common.errors import LeukError

AUGMENTATIONS = ("paper002", "flip", "none")
_INTERPOLATION = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def prepare_image(image: Image.Image, data_config) -> torch.Tensor:
    """Apply the deterministic part (paper 003 filter, resize) and return a uint8 CHW tensor."""
    channels, height, width = data_config.input_size
    if data_config.preprocess == "gray_median":
        # Paper 003: grayscale, then a median blur to suppress stain noise.
        image = image.convert("L").filter(ImageFilter.MedianFilter(size=3))
    elif channels == 1:
        image = image.convert("L")
    interpolation = _INTERPOLATION.get(data_config.interpolation, InterpolationMode.BILINEAR)
    resample = Image.Resampling.BICUBIC if interpolation == InterpolationMode.BICUBIC else Image.Resampling.BILINEAR
    if image.size != (width, height):
        image = image.resize((width, height), resample=resample)
    tensor = v2.functional.pil_to_tensor(image)
    return tensor


def augmentation(name: str, height: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random augmentation on uint8 CHW tensors; `paper002` follows paper 002's recipe."""
    if name not in AUGMENTATIONS:
        raise LeukError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if name == "none":
        return v2.Identity()
    flips = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if name == "flip":
        return v2.Compose(flips)
    # Paper 002: flips, rotation up to 20 deg, zoom and shifts up to 20 %, shear. Reflect-pad first
    # so the affine warp never pulls in a black border that the model could learn as a cue.
    pad = height // 4
    return v2.Compose(
        [
            *flips,
            v2.Pad(pad, padding_mode="reflect"),
            v2.RandomAffine(degrees=20, translate=(0.2 * height / (height + 2 * pad),) * 2,
                            scale=(0.8, 1.2), shear=(-10, 10, -10, 10)),
            v2.CenterCrop(height),
        ]
    )


class BatchAugment:
    """Per-sample random augmentation of a whole uint8 batch at once (one affine warp per batch).

    `paper002` draws, per image, flips, rotation up to 20 deg, zoom and shifts up to 20 % and shear up
    to 10 deg, and applies them with a single grid_sample using reflection at the borders, so no black
    border appears that the model could learn as a cue. Runs on the batch's device (GPU when present).
    """

    def __init__(self, name: str, generator: torch.Generator | None = None) -> None:
        if name not in AUGMENTATIONS:
            raise LeukError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.name = name
        self.generator = generator

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) * (high - low) + low

    def _signs(self, n: int) -> torch.Tensor:
        return torch.randint(0, 2, (n,), generator=self.generator).float() * 2 - 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float NCHW in, float NCHW (0..255 scale) out."""
        images = images.float()
        if self.name == "none" or len(images) == 0:
            return images
        n = len(images)
        flip_x, flip_y = self._signs(n), self._signs(n)
        if self.name == "flip":
            images = torch.where((flip_x < 0).view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
            return torch.where((flip_y < 0).view(-1, 1, 1, 1).to(images.device), images.flip(-2), images)
        angle = torch.deg2rad(self._uniform(n, -20, 20))
        shear = torch.deg2rad(self._uniform(n, -10, 10))
        zoom = self._uniform(n, 0.8, 1.2)
        shift = self._uniform(2 * n, -0.4, 0.4).view(n, 2)  # 20 % of the side in [-1, 1] coordinates
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # theta maps output to input coordinates: rotation @ shear @ (flip / zoom).
        a, b = cos, cos * tan - sin
        c, d = sin, sin * tan + cos
        sx, sy = flip_x / zoom, flip_y / zoom
        theta = torch.stack([torch.stack([a * sx, b * sy, shift[:, 0]], 1),
                             torch.stack([c * sx, d * sy, shift[:, 1]], 1)], 1).to(images.device)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                               align_corners=False)


class Normalize:
    """uint8 CHW (or NCHW) tensor -> float tensor normalised with the data config's mean and std."""

    def __init__(self, data_config) -> None:
        channels = data_config.input_size[0]
        self.mean = torch.tensor(data_config.mean[:channels]).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(data_config.std[:channels]).view(-1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - mean) / std
