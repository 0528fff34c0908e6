"""Checkpoints without pickle: one safetensors file, tensors as tensors, everything else as JSON.

A checkpoint is any tree of dicts, lists, tuples, JSON scalars, torch tensors and numpy arrays. Each
tensor or array is stored under its path in the tree (`optimizer/state/0/exp_avg`); the tree itself,
with each tensor replaced by a marker, is JSON kept in the file's header metadata. One file, so one
atomic replace writes a complete checkpoint; reading it executes nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from leukfed.common.atomic import atomic_write_bytes
from leukfed.common.errors import LeukError

CHECKPOINT_FORMAT = "leukfed-checkpoint/2"
_TREE_KEY = "leukfed-checkpoint"
# Markers: a dict with exactly one of these keys stands for a value JSON cannot hold as it is.
_TENSOR, _ARRAY, _SCALAR, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__items__", "__float__"
_MARKERS = {_TENSOR, _ARRAY, _SCALAR, _TUPLE, _ITEMS, _FLOAT}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (see the module docstring for what it may hold) to `path` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(payload, "", tensors)
    header = json.dumps({"format": CHECKPOINT_FORMAT, "tree": tree}, allow_nan=False)
    atomic_write_bytes(path, save_safetensors(tensors, metadata={_TREE_KEY: header}))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; LeukError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LeukError(f"no checkpoint to resume from: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {}).get(_TREE_KEY, "null"))
            if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a leukfed checkpoint")
            tree = _decode(header["tree"], f)
    except LeukError:
        raise
    except Exception as exc:  # safetensors, json and our own checks each raise their own types
        raise LeukError(f"checkpoint {path} is unreadable: {_one_line(exc)}") from None
    if not isinstance(tree, dict):
        raise LeukError(f"checkpoint {path} is unreadable: its content is not a mapping")
    return tree


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and where in tensors:
        raise LeukError(f"cannot checkpoint: two tensors would be stored as {where}")
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: where}
    if isinstance(value, np.ndarray):
        tensors[where] = torch.from_numpy(np.array(value, copy=True, order="C"))
        return {_ARRAY: where}
    if isinstance(value, np.generic):
        tensors[where] = torch.from_numpy(np.asarray(value).reshape(1).copy())
        return {_SCALAR: where}
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT: repr(value)}  # inf / nan: JSON has no literal for them
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in value.items()}
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            return {_ITEMS: [[k, _encode(v, f"{where}/{k}", tensors)] for k, v in value.items()]}
    raise LeukError(f"cannot checkpoint {type(value).__name__} at {where or '/'}")


def _decode(value: Any, f) -> Any:
    if isinstance(value, list):
        return [_decode(v, f) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _MARKERS:
        (marker, inner), = value.items()
        if marker == _TENSOR:
            return f.get_tensor(_key(inner))
        if marker == _ARRAY:
            return f.get_tensor(_key(inner)).numpy()
        if marker == _SCALAR:
            return f.get_tensor(_key(inner)).numpy().reshape(-1)[0]
        if marker == _FLOAT:
            if inner not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad float {inner!r}")
            return float(inner)
        if marker == _TUPLE:
            return tuple(_decode(v, f) for v in _list(inner))
        return {_dict_key(k): _decode(v, f) for k, v in (_pair(p) for p in _list(inner))}
    return {k: _decode(v, f) for k, v in value.items()}


def _key(name: Any) -> str:
    if not isinstance(name, str):
        raise ValueError("a tensor reference is not a string")
    return name


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError("malformed tree")
    return value


def _pair(value: Any) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("malformed mapping entry")
    return value[0], value[1]


def _dict_key(key: Any) -> str | int:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ValueError("malformed mapping key")
    return key


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
