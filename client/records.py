"""Model weights <-> Flower ArrayRecords, with optional half-precision transfer and a digest."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern under a marked key.
_BF16_SUFFIX = "::bf16"


def encode_state(state: dict[str, torch.Tensor], transfer_dtype: str = "float32") -> ArrayRecord:
    """Float tensors cast to the transfer dtype; integer buffers (BatchNorm counters) unchanged."""
    record = ArrayRecord()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and transfer_dtype == "float16":
            record[key] = Array(tensor.to(torch.float16).numpy())
        elif tensor.is_floating_point() and transfer_dtype == "bfloat16":
            record[key + _BF16_SUFFIX] = Array(tensor.to(torch.bfloat16).view(torch.int16).numpy())
        else:
            record[key] = Array(tensor.numpy())
    return record


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays keyed like the model's state dict; half precision widened to float32."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = array.numpy()
        if key.endswith(_BF16_SUFFIX):
            value = torch.from_numpy(value.copy()).view(torch.bfloat16).float().numpy()
            key = key[: -len(_BF16_SUFFIX)]
        elif value.dtype == np.float16:
            value = value.astype(np.float32)
        out[key] = value
    return out


def decode_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in decode_arrays(record).items()}


def widen(record: ArrayRecord) -> ArrayRecord:
    """A float32 ArrayRecord from a possibly half-precision one (what the strategies aggregate)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in decode_arrays(record).items()})


def record_digest(record: ArrayRecord) -> str:
    """sha256 over keys and raw array bytes: what a site logs about the update it sent."""
    digest = hashlib.sha256()
    for key in sorted(record.keys()):
        digest.update(key.encode())
        digest.update(record[key].data)
    return digest.hexdigest()
