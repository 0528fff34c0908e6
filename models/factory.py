"""`create_model`: one factory for every registered model and every weight source."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from leukfed.common.errors import LeukError
from leukfed.models.registry import ModelInfo, ModelSpec, check_image_size, get_spec, resolve_data_config
from leukfed.models.weights import file_digest, fit_state_dict, read_state_dict

RANDOM_INIT = "none (random init)"
_SOURCES = ("none", "hub", "package")


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str = False,
    weights: str | Path | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build model `name` with `num_classes` logits; attach `model.leuk_info`.

    pretrained: False/"none" (random init), True (the model's default offline source if it has
    one, else the timm hub), "hub", "package", or a weight file path. `weights` (a file) takes
    precedence over `pretrained`. A file whose classifier head differs in shape only (e.g. 1000
    ImageNet classes vs 4) loads everything but the head, and the source says so.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LeukError(f"num_classes must be a positive integer, got {num_classes!r}")
    size = check_image_size(spec, image_size)
    source = _source(spec, pretrained, weights)
    if source == "hub":
        model, label = _build_from_hub(spec, num_classes, size)
    else:
        model = spec.builder(num_classes, size, False)
        label = _load_source(spec, model, source)
    model.leuk_info = ModelInfo(name, num_classes, resolve_data_config(name, size), label)
    return model


def _source(spec: ModelSpec, pretrained: bool | str, weights: str | Path | None) -> str:
    """Normalise the requested weight source to "none" | "hub" | "package" | a file path."""
    if weights is not None:
        return str(weights)
    if pretrained is False or pretrained is None:
        return "none"
    if pretrained is True:
        default = spec.default_pretrained
        if default is None:
            raise LeukError(
                f"model {spec.name} has no pretrained weights; pass --weights FILE or --pretrained none"
            )
        return default
    if not isinstance(pretrained, (str, Path)):
        raise LeukError(f"pretrained must be a bool, 'none', 'hub', 'package' or a file, got {pretrained!r}")
    value = str(pretrained)
    if value.lower() in _SOURCES:
        return value.lower()
    return value


def _build_from_hub(spec: ModelSpec, num_classes: int, size: int) -> tuple[nn.Module, str]:
    if not spec.hub_tag:
        raise LeukError(
            f"model {spec.name} has no timm hub weights; pass --weights FILE or --pretrained none"
        )
    try:
        model = spec.builder(num_classes, size, True)
    except Exception:  # huggingface_hub / urllib / timm raise many unrelated types offline
        raise LeukError(
            f"could not download pretrained weights for {spec.name} (offline?); "
            "pass --weights FILE or --pretrained none"
        ) from None
    cfg = getattr(model, "pretrained_cfg", None)  # timm models carry it, our wrappers do not
    if cfg is None:
        return model, f"timm-hub:{spec.hub_tag} (backbone only)"
    if cfg.get("num_classes") != num_classes:
        return model, f"timm-hub:{spec.hub_tag} (classifier head randomly initialised)"
    return model, f"timm-hub:{spec.hub_tag}"


def _load_source(spec: ModelSpec, model: nn.Module, source: str) -> str:
    if source == "none":
        return RANDOM_INIT
    if source == "package":
        if spec.package is None:
            raise LeukError(
                f"model {spec.name} has no packaged weights; pass --weights FILE or --pretrained none"
            )
        sd, label = spec.package(model)
        origin = f"{label} weights for {spec.name}"
    else:
        path = Path(source).expanduser().resolve()
        sd = read_state_dict(path)
        label = f"file:{path} sha256:{file_digest(path)[:16]}"
        origin = f"weights file {path} for model {spec.name}"
    note = fit_state_dict(model, sd, classifier=spec.classifier, origin=origin)
    return f"{label} ({note})" if note else label
