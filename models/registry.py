"""Model registry: names, default input configurations and pretrained sources."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from leukfed.common.errors import LeukError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_KINDS = ("none", "gray_median")
INTERPOLATIONS = ("bilinear", "bicubic")

# builder(num_classes, image_size, hub) -> nn.Module; hub=True loads the timm hub weights.
Builder = Callable[[int, int, bool], nn.Module]
# package loader(model) -> (state dict in the model's own key space, source label)
PackageLoader = Callable[[nn.Module], tuple[dict[str, torch.Tensor], str]]


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a model (consumed by `leukfed.common.transforms`)."""

    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    min_size: int = 32
    fixed_size: bool = False
    preprocess: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "min_size": self.min_size,
            "fixed_size": self.fixed_size,
            "preprocess": self.preprocess,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        try:
            cfg = cls(
                input_size=_int_triple(d["input_size"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                interpolation=str(d["interpolation"]),
                min_size=int(d["min_size"]),
                fixed_size=bool(d["fixed_size"]),
                preprocess=str(d["preprocess"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LeukError(f"invalid data config {dict(d)!r}: {e!r}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise LeukError if the fields are inconsistent."""
        c = self.input_size[0]
        if len(self.mean) != c or len(self.std) != c:
            raise LeukError(f"data config: mean/std need {c} values for {c} channels")
        if self.interpolation not in INTERPOLATIONS:
            raise LeukError(f"data config: interpolation must be one of {INTERPOLATIONS}")
        if self.preprocess not in PREPROCESS_KINDS:
            raise LeukError(f"data config: preprocess must be one of {PREPROCESS_KINDS}")


def _int_triple(v: Any) -> tuple[int, int, int]:
    c, h, w = (int(x) for x in v)
    return (c, h, w)


@dataclass(frozen=True)
class ModelInfo:
    """What a created model is: attached to every model as `model.leuk_info`."""

    name: str
    num_classes: int
    data_config: DataConfig
    pretrained_source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "data_config": self.data_config.to_dict(),
            "pretrained_source": self.pretrained_source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        try:
            return cls(
                name=str(d["name"]),
                num_classes=int(d["num_classes"]),
                data_config=DataConfig.from_dict(d["data_config"]),
                pretrained_source=str(d["pretrained_source"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LeukError(f"invalid model info: {e!r}") from None


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    builder: Builder
    data_config: DataConfig
    classifier: str  # state-dict prefix of the final linear layer (may be re-initialised)
    hub_tag: str | None = None  # timm "arch.tag" whose weights pretrained="hub" loads
    package: PackageLoader | None = None
    description: str = ""

    @property
    def default_pretrained(self) -> str | None:
        """What pretrained=True means for this model: offline package first, then hub."""
        if self.package is not None:
            return "package"
        return "hub" if self.hub_tag else None


_REGISTRY: dict[str, ModelSpec] = {}


def default_data_config(size: int = 224, *, min_size: int = 32) -> DataConfig:
    """ImageNet-normalised RGB config for our own models."""
    return DataConfig((3, size, size), IMAGENET_MEAN, IMAGENET_STD, "bicubic", min_size)


def register_model(
    name: str,
    *,
    data_config: DataConfig | None = None,
    classifier: str = "fc",
    hub_tag: str | None = None,
    package: PackageLoader | None = None,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(num_classes, image_size, hub) -> nn.Module` as `name`."""
    cfg = data_config or default_data_config()
    cfg.validate()

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name, builder, cfg, classifier, hub_tag, package, description or (builder.__doc__ or "")
        )
        return builder

    return deco


def unregister_model(name: str) -> None:
    """Remove a registration (for tests and plugins)."""
    _REGISTRY.pop(name, None)


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or LeukError listing the available names."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise LeukError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return spec


def check_image_size(spec: ModelSpec, image_size: int | None) -> int:
    """The H=W to use for `spec`; LeukError if the model cannot take it."""
    default = spec.data_config.input_size[1]
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise LeukError(f"image size must be an integer number of pixels, got {image_size!r}")
    if spec.data_config.fixed_size and image_size != default:
        raise LeukError(f"model {spec.name} needs input size exactly {default} px, got {image_size}")
    if image_size < spec.data_config.min_size:
        raise LeukError(
            f"model {spec.name} needs input size >= {spec.data_config.min_size} px, got {image_size}"
        )
    return image_size


def resolve_data_config(name: str, image_size: int | None = None) -> DataConfig:
    """The data config of model `name` at `image_size` (default: the model's own)."""
    spec = get_spec(name)
    size = check_image_size(spec, image_size)
    c = spec.data_config.input_size[0]
    return replace(spec.data_config, input_size=(c, size, size))
