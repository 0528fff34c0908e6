"""Plain timm architectures (papers 000, 001, 002 baselines) registered under our names."""

from __future__ import annotations

import timm
from torch import nn

from leukfed.models.registry import Builder, DataConfig, register_model


def timm_data_config(arch: str, *, min_size: int = 32) -> DataConfig:
    """Input size, mean, std and interpolation from timm's default pretrained config (no download)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config for {arch!r}")
    c, h, w = cfg.input_size
    return DataConfig(
        input_size=(c, h, w),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
        min_size=min_size,
        fixed_size=bool(cfg.fixed_input_size),
    )


def timm_hub_tag(arch: str) -> str:
    """The `arch.tag` timm downloads for pretrained=True."""
    cfg = timm.models.get_pretrained_cfg(arch)
    return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture


def timm_classifier(arch: str) -> str:
    return str(timm.models.get_pretrained_cfg(arch).classifier)


def timm_builder(arch: str) -> Builder:
    """Builder creating timm `arch`; hub=True lets timm download its ImageNet weights."""

    def build(num_classes: int, image_size: int, hub: bool) -> nn.Module:
        return timm.create_model(arch, pretrained=hub, num_classes=num_classes)

    build.__doc__ = f"timm {arch}"
    return build


def register_timm(name: str, arch: str, *, min_size: int = 32, description: str = "") -> None:
    """Register timm `arch` as `name` with its timm data config and hub weights."""
    register_model(
        name,
        data_config=timm_data_config(arch, min_size=min_size),
        classifier=timm_classifier(arch),
        hub_tag=timm_hub_tag(arch),
        description=description or f"timm {arch}",
    )(timm_builder(arch))


register_timm("resnet18", "resnet18", description="timm ResNet-18")
register_timm("resnet50", "resnet50", description="timm ResNet-50 (paper 000, 64x64 there)")
register_timm("efficientnet_b0", "efficientnet_b0", description="timm EfficientNet-B0 (paper 002)")
register_timm("vgg16", "vgg16", description="timm VGG-16 (paper 001)")
register_timm("inception_v3", "inception_v3", min_size=75, description="timm Inception-v3 (paper 001)")
