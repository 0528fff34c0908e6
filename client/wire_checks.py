"""Received arrays checked against the site's own model from their headers, before any copy; digests."""
from __future__ import annotations

import hashlib
from typing import Iterator, Mapping

import numpy as np
from flwr.app import ArrayRecord

from leukfed.common.flower.wire import BF16_SUFFIX, PACKED_KEY, NpyError, PackedEntry, npy_header, packed_entries
from leukfed.client.site_errors import ReceivedArraysRefused

Layout = Mapping[str, tuple[tuple[int, ...], str]]   # state-dict key -> (shape, dtype name)

MAX_HEADER_BYTES = 4096          # np.save writes ~128 bytes of .npy header per array
DEFAULT_MAX_MODEL_MB = 4096      # node config `max-model-mb`: the most model bytes a site accepts
_LAYOUTS: dict[tuple, dict[str, tuple[tuple[int, ...], str]]] = {}


def array_entries(record: ArrayRecord, *, max_index_bytes: int = 1 << 24) -> Iterator[PackedEntry]:
    """The arrays of a plain or packed (common/flower/wire.py `pack_record`) record, read in place."""
    if PACKED_KEY not in record:
        for key, array in record.items():
            yield PackedEntry(key, str(array.dtype), tuple(array.shape), str(array.stype), memoryview(array.data))
        return
    yield from packed_entries(record, max_index_bytes=max_index_bytes)


def record_sha256(record: ArrayRecord) -> str:
    """client/records.py `record_digest` of the unpacked record, computed on a packed one in place."""
    digest = hashlib.sha256()
    for entry in sorted(array_entries(record), key=lambda e: e.key):
        digest.update(entry.key.encode())
        digest.update(entry.data)
    return digest.hexdigest()


def expected_layout(fed, num_classes: int) -> Layout:
    """Keys, shapes and dtypes of the model this site builds for the run (on the meta device: no memory);
    with --task patients, the patient head over the recipe's frozen features."""
    if fed.task == "patients":
        return patient_head_layout(fed.patient_recipe)
    key = (fed.model, fed.image_size, fed.dp, num_classes)
    if key not in _LAYOUTS:
        import torch

        from leukfed.common.site import build_site_model

        try:
            with torch.device("meta"):
                model = build_site_model(fed, num_classes)
        except Exception:  # noqa: BLE001 - model code that needs real values at construction
            model = build_site_model(fed, num_classes)
        _LAYOUTS[key] = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                         for k, v in model.state_dict().items()}
    return _LAYOUTS[key]


def expected_records(fed, num_classes: int, config) -> dict[str, Layout]:
    """The array records a train or evaluate message may carry, with their layouts: the model's "arrays";
    in the patient task's secure stages (train config patient-stage) the sums' starting arrays, and for
    calibration the head as "head"."""
    if fed.task != "patients" or config.get("patient-stage") not in ("moments", "calibrate"):
        return {"arrays": expected_layout(fed, num_classes)}
    from leukfed.common.patient_federated import feature_dim, federable_recipe, histogram_layout, moments_layout

    if config["patient-stage"] == "calibrate":
        return {"arrays": histogram_layout(), "head": patient_head_layout(fed.patient_recipe)}
    recipe = federable_recipe(fed.patient_recipe)
    return {"arrays": moments_layout(feature_dim(recipe.backbone, recipe.image_size))}


def patient_head_layout(recipe_name: str) -> Layout:
    key = ("patients", recipe_name)
    if key not in _LAYOUTS:
        from leukfed.common.patient_federated import feature_dim, federable_recipe, head_layout

        recipe = federable_recipe(recipe_name)
        _LAYOUTS[key] = head_layout(recipe.head, feature_dim(recipe.backbone, recipe.image_size))
    return _LAYOUTS[key]


def check_received(record: ArrayRecord, layout: Layout, max_bytes: int) -> None:
    """Refuse (ReceivedArraysRefused) arrays that are not exactly the site's model, from the headers only:
    every key once, the model's shape, float32/float16/bfloat16 for float tensors (the exact dtype
    otherwise), .npy bytes of exactly that size, at most `max_bytes` in all."""
    if PACKED_KEY in record and len(record[PACKED_KEY].data) > max_bytes + MAX_HEADER_BYTES * (len(layout) + 1):
        raise ReceivedArraysRefused(f"{len(record[PACKED_KEY].data)} bytes of arrays, over the site's limit")
    seen: set[str] = set()
    total = 0
    try:
        for entry in array_entries(record, max_index_bytes=512 * len(layout) + 4096):
            name = entry.key.removesuffix(BF16_SUFFIX)
            if name not in layout or name in seen:
                raise ReceivedArraysRefused(f"array {name[:80]!r} is not in the site's model, or repeated")
            seen.add(name)
            total += _check_entry(entry, name, *layout[name])
            if total > max_bytes:
                raise ReceivedArraysRefused(f"over {max_bytes} bytes of arrays, the site's limit")
    except NpyError as exc:
        raise ReceivedArraysRefused(f"malformed arrays: {exc}") from None
    if missing := set(layout) - seen:
        raise ReceivedArraysRefused(f"{len(missing)} arrays of the site's model are missing, e.g. {min(missing)!r}")


def _check_entry(entry: PackedEntry, name: str, shape: tuple[int, ...], dtype: str) -> int:
    floating = np.dtype(dtype).kind == "f"
    allowed = {"int16"} if entry.key.endswith(BF16_SUFFIX) and floating else \
        {"float32", "float16"} | ({dtype} if dtype == "float64" else set()) if floating else {dtype}
    header = npy_header(bytes(entry.data[:MAX_HEADER_BYTES]))
    _, header_dtype, header_shape, _, count, offset = header
    if entry.dtype not in allowed or header_dtype.name != entry.dtype or not header_dtype.isnative:
        raise ReceivedArraysRefused(f"array {name!r}: dtype {entry.dtype[:20]!r}, expected one of {sorted(allowed)}")
    if entry.shape != shape or header_shape != shape:
        raise ReceivedArraysRefused(f"array {name!r}: shape {entry.shape[:8]} where the site's model has {shape}")
    if len(entry.data) != offset + count * header_dtype.itemsize:
        raise ReceivedArraysRefused(f"array {name!r}: {len(entry.data)} bytes, not one array of its shape")
    return len(entry.data)


def max_model_bytes(node_config: Mapping) -> int:
    try:
        return int(float(node_config.get("max-model-mb", DEFAULT_MAX_MODEL_MB)) * 2**20)
    except (TypeError, ValueError):
        return DEFAULT_MAX_MODEL_MB * 2**20
