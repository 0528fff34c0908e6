"""DP-compatible models: BatchNorm replaced by GroupNorm, and why Opacus cannot train a model."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leukfed.common.dp_settings import require_opacus
from leukfed.common.errors import LeukError

_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of `model` that DP-SGD can train: every BatchNorm becomes GroupNorm.

    Deterministic, so the server and every site derive the same architecture (same state-dict
    keys and shapes) from the same model: a BatchNorm over C channels becomes
    GroupNorm(gcd(32, C), C) (Opacus' default group count) with the BatchNorm's eps and affine
    flag, and its affine weight and bias are copied over (no random draw). timm's
    BatchNormAct2d (BatchNorm + dropout + activation in one module) becomes
    Sequential(GroupNorm, drop, act), so its keys gain a ".0" ("bn1.weight" -> "bn1.0.weight").
    Running statistics are dropped: GroupNorm has none. In-place activations are made
    out-of-place (no weights change). Raises LeukError for what Opacus still cannot train privately.
    """
    fixed = copy.deepcopy(model)
    for name, module in list(fixed.named_modules()):
        if isinstance(module, _BatchNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(fixed.get_submodule(parent_name), child, _replace_batchnorm(name, module))
    for module in fixed.modules():
        # Autograd forbids in-place ops on the outputs of Opacus' backward hooks (ReLU(inplace)).
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    problems = dp_problems(fixed)
    if problems:
        raise LeukError(f"model cannot be trained with DP-SGD: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return fixed


def _replace_batchnorm(name: str, bn: _BatchNorm) -> nn.Module:
    norm = nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            norm.weight.copy_(bn.weight)
            norm.bias.copy_(bn.bias)
    norm = norm.to(device=bn.weight.device if bn.affine else None)
    if type(bn) in _PLAIN_BATCHNORMS:
        return norm
    if _is_timm_batchnorm_act(bn):
        return nn.Sequential(norm, bn.drop, bn.act)  # BatchNormAct2d.forward: norm, drop, act
    raise LeukError(f"model cannot be trained with DP-SGD: layer {name} is an unknown BatchNorm "
                    f"variant {type(bn).__name__}")


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return type(module) is BatchNormAct2d


def dp_problems(model: nn.Module) -> list[str]:
    """Why Opacus cannot train `model` privately (empty when it can)."""
    require_opacus()
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    # ModuleValidator matches exact types, so BatchNorm subclasses (timm) slip through it.
    problems = [f"layer {n} is a BatchNorm ({type(m).__name__})"
                for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    problems += [str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)]
    problems += [str(e).splitlines()[0] for e in GradSampleModule.validate(model, strict=False)]
    return list(dict.fromkeys(problems))
