"""Model weights <-> Flower ArrayRecords, with optional half-precision transfer and a digest."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SType
from numpy.lib import format as npformat

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern under a marked key.
BF16_SUFFIX = _BF16_SUFFIX = "::bf16"


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


def decode_arrays(record: ArrayRecord, *, views: bool = False) -> dict[str, np.ndarray]:
    """Numpy arrays keyed like the model's state dict; half precision widened to float32. With
    `views`, arrays that need no widening are read-only views of the record's bytes (no copy)."""
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        value = _view_or_load(array) if views else array.numpy()
        if key.endswith(_BF16_SUFFIX):
            value = widen_bf16_bits(value)
            key = key[: -len(_BF16_SUFFIX)]
        elif value.dtype == np.float16:
            value = value.astype(np.float32)
        out[key] = value
    return out


def widen_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (16-bit integers): exact, a 16-bit shift."""
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# Zero-copy access to the .npy bytes an Array carries (Array.numpy() copies through np.load). The
# header np.save writes is matched with a regex and cached by its exact bytes: numpy's own parser runs
# `ast.literal_eval` (~0.1 ms per array), which adds up over hundreds of keys and sites; anything
# unusual falls back to numpy's parser.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z][0-9]{1,2})', 'fortran_order': (True|False), "
                         rb"'shape': \(((?:[0-9]+, ?)*[0-9]*)\), \}\s*\n")
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}  # header bytes -> parsed


class NpyError(ValueError):
    """An Array whose bytes are not a plain (non-object) .npy array."""


def _parse_npy_header(data: bytes, start: int, length: int) -> tuple[np.dtype, tuple[int, ...], bool]:
    match = _NPY_HEADER.match(data, start, start + length)
    if match:
        dtype = np.dtype(match.group(1).decode())
        fortran = match.group(2) == b"True"
        shape = tuple(int(s) for s in match.group(3).split(b",") if s.strip())
    else:
        stream = io.BytesIO(data)
        version = npformat.read_magic(stream)
        reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        try:
            shape, fortran, dtype = reader(stream)
        except ValueError as exc:
            raise NpyError(f"unreadable .npy header ({exc})") from None
    if dtype.hasobject:
        raise NpyError("object arrays are refused")
    return dtype, tuple(shape), bool(fortran)


def npy_header(data: bytes) -> tuple[bytes, np.dtype, tuple[int, ...], bool, int, int]:
    """(header bytes, dtype, shape, fortran_order, element count, data offset) of .npy bytes, cached by
    the exact header bytes. Raises NpyError for anything np.load(allow_pickle=False) would refuse."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise NpyError("not in .npy format")
    start, length = (10, int.from_bytes(data[8:10], "little")) if data[6] == 1 else \
        (12, int.from_bytes(data[8:12], "little"))
    head = bytes(data[:start + length])
    parsed = _HEADERS.get(head)
    if parsed is None:
        dtype, shape, fortran = _parse_npy_header(data, start, length)
        if len(_HEADERS) > 4096:
            _HEADERS.clear()
        parsed = _HEADERS[head] = (dtype, shape, fortran, math.prod(shape))
    return (head, *parsed, start + length)


def npy_view(array: Array) -> tuple[np.ndarray, tuple[int, ...], bool]:
    """(flat zero-copy view of the data in storage order, shape, fortran_order) of an Array's .npy bytes.

    Raises NpyError for anything np.load(allow_pickle=False) would refuse or misread.
    """
    data = array.data
    _, dtype, shape, fortran, count, offset = npy_header(data)
    if len(data) < offset + count * dtype.itemsize:
        raise NpyError("truncated data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset), shape, fortran


def array_view(array: Array) -> np.ndarray:
    """Zero-copy numpy view of a Flower Array (read-only; the same array Array.numpy() returns)."""
    flat, shape, fortran = npy_view(array)
    return flat.reshape(shape, order="F" if fortran else "C")


def npy_header_for(shape: tuple[int, ...], dtype) -> bytes:
    """The .npy (1.0) header np.save writes for a C-ordered array of this shape and dtype."""
    header = io.BytesIO()
    npformat.write_array_header_1_0(header, {"descr": npformat.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue()


def _view_or_load(array: Array) -> np.ndarray:
    try:
        return array_view(array)
    except NpyError:
        return array.numpy()  # numpy's reader for anything unusual, with its own errors


def decode_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors the caller owns, each array's bytes copied once."""
    return {k: torch.from_numpy(v if v.flags.writeable else v.copy())
            for k, v in decode_arrays(record, views=True).items()}


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


# On the wire, every array of a record travels inside ONE uint8 Array. Flower moves each Array as
# objects of its own (one per array plus one per 5 MB chunk), each a separate HTTP request on every
# hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back): a trained resnet18's 122 arrays are
# 210 objects per message; packed, the same bytes are 11. Each array keeps its exact Array fields and
# .npy bytes, so unpacking gives back an identical record (same digest).
PACKED_KEY = "::packed"
_INDEX_LENGTH = 8  # bytes of the little-endian length of the JSON index that opens the payload


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """The record as one Array: [index length][JSON index: key, dtype, shape, stype, bytes][data...]."""
    if len(record) < 2 or PACKED_KEY in record:
        return record
    index = json.dumps([[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in record.items()])
    head = index.encode()
    size = _INDEX_LENGTH + len(head) + sum(len(a.data) for a in record.values())
    data = b"".join([npy_header_for((size,), np.uint8), len(head).to_bytes(_INDEX_LENGTH, "little"), head,
                     *(a.data for a in record.values())])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(size,), stype=SType.NUMPY, data=data)})


@dataclass(frozen=True)
class PackedEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    stype: str
    data: memoryview     # the array's .npy bytes, a view into the packed payload (no copy)


def packed_entries(record: ArrayRecord, *, max_index_bytes: int | None = None) -> Iterator[PackedEntry]:
    """The arrays of a packed record, read in place, each index entry checked as it is reached. Raises
    NpyError if malformed (an index over `max_index_bytes`, an entry past the payload, trailing bytes)."""
    if len(record) != 1:
        raise NpyError("a packed record carries nothing beside its packed array")
    data = record[PACKED_KEY].data
    _, dtype, shape, _, count, offset = npy_header(data)
    if dtype != np.uint8 or len(shape) != 1 or len(data) != offset + count:
        raise NpyError("packed arrays: not one flat uint8 array")
    view = memoryview(data)[offset:]
    length = int.from_bytes(view[:_INDEX_LENGTH], "little")
    if length > min(len(view) - _INDEX_LENGTH, max_index_bytes if max_index_bytes is not None else length):
        raise NpyError(f"packed arrays: an index of {length} bytes")
    try:
        index = json.loads(bytes(view[_INDEX_LENGTH:_INDEX_LENGTH + length]))
    except ValueError:
        raise NpyError("packed arrays: unreadable index") from None
    position = _INDEX_LENGTH + length
    for item in index if isinstance(index, list) else [None]:
        if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str) and isinstance(item[1], str)
                and isinstance(item[2], list) and all(type(n) is int and n >= 0 for n in item[2])
                and isinstance(item[3], str) and type(item[4]) is int and 0 <= item[4] <= len(view) - position):
            raise NpyError("packed arrays: malformed index entry")
        key, a_dtype, a_shape, stype, size = item
        yield PackedEntry(key, a_dtype, tuple(a_shape), stype, view[position:position + size])
        position += size
    if position != len(view):
        raise NpyError("packed arrays: trailing bytes")


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The record pack_record was given; any other record unchanged. Raises NpyError if malformed."""
    if PACKED_KEY not in record:
        return record
    return ArrayRecord({entry.key: Array(dtype=entry.dtype, shape=entry.shape, stype=entry.stype,
                                         data=bytes(entry.data)) for entry in packed_entries(record)})


def pack_message(message: Message, packed: dict[int, ArrayRecord] | None = None) -> Message:
    """Pack every ArrayRecord of the message's content in place (before it is sent). `packed` maps
    id(record) to its packed form, so a model sent to many sites is packed (and hashed) once."""
    packed = {} if packed is None else packed
    if message.has_content():
        records = message.content.array_records
        for name in list(records):
            record = records[name]
            if id(record) not in packed:
                packed[id(record)] = pack_record(record)
            records[name] = packed[id(record)]
    return message


def unpack_message(message: Message) -> Message:
    """Unpack every packed ArrayRecord of the message's content in place (once it has arrived)."""
    if message.has_content():
        records = message.content.array_records
        for name in list(records):
            records[name] = unpack_record(records[name])
    return message


def packed_arrays_mod(message: Message, context, call_next) -> Message:
    """ClientApp mod: unpack what arrives and pack what leaves (see PACKED_KEY)."""
    reply = call_next(unpack_message(message), context)
    return pack_message(reply)
