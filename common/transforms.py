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


class Normalize:
    """uint8 CHW (or NCHW) tensor -> float tensor normalised with the data config's mean and std."""

    def __init__(self, data_config) -> None:
        channels = data_config.input_size[0]
        self.mean = torch.tensor(data_config.mean[:channels]).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(data_config.std[:channels]).view(-1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - mean) / std
