"""Grad-CAM overlays of single cells (pytorch-grad-cam), the target layer chosen per model family."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from leukfed.common.errors import LeukError
from leukfed.common.images import load_image
from leukfed.common.transforms import Normalize, prepare_image

# The last spatial feature map before global pooling, per registered model (models/registry.py).
# Grad-CAM is only as sharp as this map: 1/32 of the input for the timm families, 1/16 for DSCNet.
TARGET_LAYERS: dict[str, str] = {
    "dscnet": "features",                  # dense blocks + final BatchNorm/ReLU
    "efficientnet_b0": "bn2",              # timm EfficientNet: conv_head -> bn2 (BatchNormAct2d)
    "efficientnet_lite0": "bn2",
    "efficientnet_lite2": "bn2",
    "efficientnet_b0_attn": "backbone.bn2",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "inception_v3": "Mixed_7c",
    "vgg16": "features",                   # timm VGG: the last max-pooled conv map (its ConvMlp is 7x7)
    "smallcnn": "features",
    "tinycnn": "features.10",              # the last ReLU before its global pooling
}


def target_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The Grad-CAM layer of `model` (by its registry name), else its last Conv2d."""
    name = name or getattr(getattr(model, "leuk_info", None), "name", None)
    if name in TARGET_LAYERS:
        return model.get_submodule(TARGET_LAYERS[name])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise LeukError(f"no convolutional layer in model {name!r} to compute a Grad-CAM on")
    return convs[-1]


def _grad_cam():
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise LeukError("heat maps need the grad-cam package: pip install 'leukfed[explain]'") from None
    return GradCAM, show_cam_on_image, ClassifierOutputTarget


def gradcam_overlays(model: nn.Module, files: Sequence[Path], target_class: int,
                     batch_size: int = 16) -> list[np.ndarray]:
    """One RGB uint8 image per file: the model's input (resized) with the Grad-CAM of `target_class`."""
    GradCAM, show_cam_on_image, ClassifierOutputTarget = _grad_cam()
    config = model.leuk_info.data_config
    normalize = Normalize(config)
    device = next(model.parameters()).device
    overlays: list[np.ndarray] = []
    model.eval()
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        for start in range(0, len(files), batch_size):
            pixels = [prepare_image(load_image(f), config) for f in files[start:start + batch_size]]
            batch = normalize(torch.stack(pixels)).to(device)
            # Frozen backbones (requires_grad=False) still get a gradient at the target layer.
            batch.requires_grad_(True)
            masks = cam(input_tensor=batch, targets=[ClassifierOutputTarget(target_class)] * len(pixels))
            for image, mask in zip(pixels, masks):
                rgb = image.expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float32) / 255.0
                overlays.append(show_cam_on_image(rgb, np.nan_to_num(mask), use_rgb=True))
    return overlays
