"""Reading weight files and fitting state dicts onto models, with clear errors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from leukfed.common.errors import LeukError

_SHOWN = 3  # how many offending keys an error message names


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch .pt/.pth (state dict or {"model": ...})."""
    p = Path(path)
    if not p.is_file():
        raise LeukError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/pickle/safetensors each raise their own error types
        raise LeukError(f"cannot read weights file {p}: {_one_line(e)}") from None
    return _as_state_dict(obj, p)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _as_state_dict(obj: object, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise LeukError(f"weights file {p} holds no state dict (expected name -> tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LeukError(f"weights file {p} is not a state dict: entry {bad[0]!r} is not a tensor")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def fit_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    classifier: str,
    origin: str,
    allow_head_skip: bool = True,
) -> str | None:
    """Load `sd` into `model` strictly; LeukError naming the first keys that do not fit.

    If only the classifier (keys under `classifier.`) differs in shape and `allow_head_skip`,
    the model keeps its freshly initialised head; the returned note says so (else None).
    """
    own = model.state_dict()
    sd = dict(sd)
    for k in own:  # files written without BatchNorm counters are still complete
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    head = [k for k in wrong if _under(k, classifier)]
    note = None
    if allow_head_skip and head and head == wrong and not missing and not unexpected:
        note = _head_note(sd, own, head)
        for k in head:
            sd[k] = own[k]
        wrong = []
    if missing or unexpected or wrong:
        raise LeukError(f"{origin} does not fit: {_mismatch(missing, unexpected, wrong, sd, own)}")
    model.load_state_dict(sd, strict=True)
    return note


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _head_note(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], head: list[str]) -> str:
    k = head[0]
    return (
        f"classifier head skipped: file has {sd[k].shape[0]} outputs, model {own[k].shape[0]}; "
        "head randomly initialised"
    )


def _mismatch(
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
    sd: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_names(unexpected)}")
    if wrong:
        shapes = ", ".join(
            f"{k} file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:_SHOWN]
        )
        more = f" (+{len(wrong) - _SHOWN} more)" if len(wrong) > _SHOWN else ""
        parts.append(f"shape mismatch {shapes}{more}")
    return "; ".join(parts)


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more
