"""FedAvg's weighted mean computed in one pass over the reply bytes, with the guard's checks fused in."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from leukfed.common.flower.wire import BF16_SUFFIX, NpyError, npy_header, npy_header_for, widen_bf16_bits
from leukfed.server.kernels import fused_step, one_thread, torch_from_numpy

FUSED_CHUNK = 1 << 17   # float32 elements per chunk (512 KiB): every update's chunk meets the global
                        # model's chunk and the running sum while both are in cache
ROWS = 16              # updates whose differences are summed by one matrix-vector product (addmv)
PACK_BELOW = 1 << 14    # float arrays smaller than this (BatchNorm vectors, biases) share packed chunks
_F32, _CAST, _BF16 = 0, 1, 2   # how an update array becomes float32: as it is, by a cast, from bf16 bits
_NUMPY = "numpy.ndarray"


@dataclass(eq=False)
class FusedUpdate:
    """One reply: zero-copy flat views of its arrays (keyed like the model), its weight and its norm."""

    msg: Message
    node: int
    weight: float
    flat: dict[str, np.ndarray] = field(default_factory=dict)
    mode: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    factor: float = 0.0
    sq: float = 0.0   # squared L2 distance to the global model over the float arrays

    def nonfinite_problem(self, reference: dict[str, np.ndarray]) -> str | None:
        """The first float array holding NaN or Inf, named as the guard names it (rare path)."""
        for key, flat in self.flat.items():
            if reference[key].dtype.kind == "f" and not np.isfinite(_widened(flat, self.mode[key])).all():
                return f"array {key} contains NaN or Inf"
        return None




def _widened(flat: np.ndarray, mode: int) -> np.ndarray:
    return widen_bf16_bits(flat) if mode == _BF16 else flat


class _Segment:
    """A cache-sized piece of the float parameters: a slice of one array, or several small arrays packed."""

    __slots__ = ("acc", "acc_t", "hi", "key", "keys", "lo", "n", "offset", "ref", "ref_t", "sizes")

    def __init__(self, keys: list[str], sizes: list[int], lo: int = 0, hi: int = 0, offset: int = -1):
        self.keys, self.sizes = keys, sizes
        self.key = keys[0] if offset < 0 else None   # None: packed
        self.lo, self.hi = lo, hi
        self.n = hi - lo if offset < 0 else sum(sizes)
        self.offset = offset


class FusedMean:
    """FedAvg's weighted mean of zero-copy update views, with the guard's checks fused in.

    `read` checks keys, shapes and dtypes from the .npy headers (cached by their bytes) and keeps flat
    zero-copy views of the reply's bytes. `first_pass` then reads every update once, chunk by chunk and
    chunk-outer (all updates' chunks meet the global model's chunk and the running sum while both are in
    cache, so only the updates themselves stream from memory): d_i = x_i - global into row i of a reused
    float32 scratch matrix, |d_i|^2 with a BLAS dot (the update norm; NaN/Inf show up as a non-finite
    value, and only then is the chunk searched for the array to name), and for up to ROWS updates at a
    time sum = global + sum_i w_i d_i with one `addmv`, which is sum_i w_i x_i since the weights add up
    to 1. Half precision (float16, bf16 bits) is widened chunk by chunk. The sums are written straight
    into the result's .npy buffers (see `_new_result`). Integer buffers are averaged in float64 and
    rounded back, as FedAvg + `_restore_dtypes` do. When an update is dropped after it was summed (NaN
    found late, a norm outlier), `weighted_pass` sums the others again with FedAvg's own operations,
    which gives FedAvg's result bit for bit.
    """

    def __init__(self, chunk: int = FUSED_CHUNK, pack_below: int = PACK_BELOW, compiled: bool | None = None) -> None:
        """compiled: the numba loop (`server/kernels.py`); None: when numba is installed."""
        self.chunk, self.pack_below = chunk, pack_below
        self.signature: tuple | None = None
        self.step = fused_step() if compiled is not False else None
        if compiled and self.step is None:
            raise RuntimeError("the compiled aggregation loop needs numba (pip install 'leukfed[fast]')")

    @staticmethod
    def supports(reference: dict[str, np.ndarray]) -> bool:
        """The global model is float32 and integer arrays (anything else: the materialised path)."""
        return bool(reference) and all(v.dtype == np.float32 or v.dtype.kind in "iu" for v in reference.values())

    # -- layout (once per model shape) and the round's global model ---------------------------------
    def prepare(self, reference: dict[str, np.ndarray]) -> None:
        """The round's global model: its chunks, and fresh buffers for the result."""
        import torch

        self._layout(reference)
        self._new_result()
        flat = {k: np.ascontiguousarray(v).reshape(-1) for k, v in reference.items()}
        with warnings.catch_warnings():   # a read-only global model: torch only ever reads it
            warnings.filterwarnings("ignore", message=".*not writable.*")
            flat_t = {k: torch.from_numpy(flat[k]) for k in self.float_keys}
        for seg in self.segments:
            if seg.key is not None:
                seg.ref, seg.ref_t = flat[seg.key][seg.lo:seg.hi], flat_t[seg.key][seg.lo:seg.hi]
            else:
                np.concatenate([flat[k] for k in seg.keys], out=seg.ref)

    def _layout(self, reference: dict[str, np.ndarray]) -> None:
        signature = tuple((k, v.shape, v.dtype.str) for k, v in reference.items())
        if signature == self.signature:
            return
        import torch

        self.signature = signature
        self.keys = list(reference)
        self.dtypes = {k: v.dtype for k, v in reference.items()}
        self.shapes = {k: tuple(int(s) for s in v.shape) for k, v in reference.items()}
        self.headers: dict[tuple[str, bytes], tuple] = {}   # (name, .npy header) -> what read() needs
        self.npy_headers = {k: npy_header_for(v.shape, v.dtype) for k, v in reference.items()}
        self.float_keys = [k for k, v in reference.items() if v.dtype.kind == "f" and v.size]
        self.int_keys = [k for k, v in reference.items() if v.dtype.kind in "iu" and v.size]
        segments, small, packed = [], [], 0
        for key in self.float_keys:
            n = reference[key].size
            if n < self.pack_below:
                small.append(key)
                if sum(reference[k].size for k in small) >= self.chunk:
                    segments.append(_Segment(small, [reference[k].size for k in small], offset=packed))
                    packed += segments[-1].n
                    small = []
                continue
            parts = -(-n // self.chunk)
            step = -(-n // parts)
            segments.extend(_Segment([key], [n], lo, min(lo + step, n)) for lo in range(0, n, step))
        if small:
            segments.append(_Segment(small, [reference[k].size for k in small], offset=packed))
            packed += segments[-1].n
        longest = max((s.n for s in segments), default=0)
        self.segments = segments
        self.packed_acc = np.empty(packed, np.float32)
        self.packed_ref = np.empty(packed, np.float32)
        self.rows = np.empty((ROWS, longest), np.float32)   # d = x - global of up to ROWS updates
        self.factors = np.empty(ROWS, np.float32)
        self.d = self.rows[0]
        self.wide = np.empty(longest, np.float32)
        self.wide_bits = self.wide.view(np.uint32)
        self.wide_t = torch.from_numpy(self.wide)
        self.half_bits = np.empty(longest, np.uint16)
        self.rows_t, self.factors_t = torch.from_numpy(self.rows), torch.from_numpy(self.factors)
        packed_acc_t, packed_ref_t = torch.from_numpy(self.packed_acc), torch.from_numpy(self.packed_ref)
        for seg in segments:
            if seg.key is None:
                window = slice(seg.offset, seg.offset + seg.n)
                seg.acc, seg.acc_t = self.packed_acc[window], packed_acc_t[window]
                seg.ref, seg.ref_t = self.packed_ref[window], packed_ref_t[window]

    def _new_result(self) -> None:
        """This round's result: one BytesIO per array, holding the .npy header and room for the data.

        The sums are written straight into them (`getbuffer()`), and `getvalue()` then hands each
        buffer over as the Array's bytes: in CPython without a copy, since `BytesIO(bytes(n))` owns its
        only reference. (Building the bytes from a buffer of our own would copy the whole model once
        more, and Array(ndarray) copies it three times.)"""
        import torch

        self.files, self.views, self.out = {}, {}, {}
        for key in self.keys:
            header = self.npy_headers[key]
            size = len(header) + math.prod(self.shapes[key]) * self.dtypes[key].itemsize
            self.files[key] = io.BytesIO(bytes(size))
            view = self.views[key] = self.files[key].getbuffer()
            view[: len(header)] = header
            self.out[key] = np.frombuffer(view, dtype=self.dtypes[key], offset=len(header))
        for seg in self.segments:
            if seg.key is not None:
                seg.acc = self.out[seg.key][seg.lo:seg.hi]
                seg.acc_t = torch.from_numpy(seg.acc)

    # -- one reply's headers ------------------------------------------------------------------------
    def read(self, update: FusedUpdate, record: ArrayRecord) -> str | None:
        """Keys, shapes and dtypes from the .npy headers (no data touched); fills update.flat/mode.
        The reason the update is refused, or None."""
        headers, problems = self.headers, []
        flat, mode = update.flat, update.mode
        for name, array in record.items():
            data = array.data
            try:
                if array.stype != _NUMPY:
                    raise NpyError(f"serialised as {array.stype!r}")
                head, dtype, shape, fortran, count, offset = npy_header(data)   # parsed once per header
                entry = headers.get((name, head))
                if entry is None:
                    if len(headers) > 8 * len(self.keys) + 64:
                        headers.clear()
                    entry = headers[(name, head)] = (*self._header_entry(name, dtype, shape, fortran),
                                                     shape if fortran and len(shape) > 1 else None)
                key, kind, problem, fortran_shape = entry
                if key in flat:
                    return f"keys differ (array {key} sent twice)"
                values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            except (NpyError, ValueError, TypeError) as exc:
                return f"array {name.removesuffix(BF16_SUFFIX)} is not a readable .npy array: {exc}"
            if problem:
                problems.append(problem)
            elif fortran_shape is not None:   # storage order differs from the model's: one copy
                values = np.ascontiguousarray(values.reshape(fortran_shape, order="F")).reshape(-1)
            flat[key], mode[key] = values, kind
        if len(flat) != len(self.keys) or not all(k in flat for k in self.keys):
            missing, extra = sorted(set(self.keys) - set(flat)), sorted(set(flat) - set(self.keys))
            return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
        return problems[0] if problems else None

    def _header_entry(self, name: str, dtype: np.dtype, shape: tuple, fortran: bool) -> tuple:
        bf16 = name.endswith(BF16_SUFFIX)
        key = name[: -len(BF16_SUFFIX)] if bf16 else name
        mode = _BF16 if bf16 else _F32 if dtype == np.float32 else _CAST
        if key not in self.dtypes:
            return key, mode, None          # reported as "keys differ"
        expected = self.dtypes[key]
        if tuple(shape) != self.shapes[key]:
            return key, mode, f"array {key} has shape {tuple(shape)}, expected {self.shapes[key]}"
        if bf16 and (dtype.kind not in "iu" or dtype.itemsize != 2):
            return key, mode, f"array {key} has dtype {dtype}, expected bfloat16 bits (16-bit integers)"
        widened = np.dtype(np.float32) if bf16 or dtype == np.float16 else dtype
        if widened.kind != expected.kind:
            return key, mode, f"array {key} has dtype {widened}, expected {expected}"
        return key, mode, None

    # -- the update's chunk as float32 -------------------------------------------------------------
    def _chunk(self, update: FusedUpdate, seg: _Segment) -> np.ndarray:
        n = seg.n
        if seg.key is not None:
            src, mode = update.flat[seg.key][seg.lo:seg.hi], update.mode[seg.key]
            if mode == _F32:
                return src                                   # zero-copy view of the reply's bytes
            if mode == _BF16:
                np.left_shift(src.view(np.uint16), 16, out=self.wide_bits[:n], dtype=np.uint32)
            elif src.dtype == np.float16:   # torch widens float16 about 15 x faster than numpy
                self.wide_t[:n].copy_(torch_from_numpy(src))
            else:
                np.copyto(self.wide[:n], src, casting="same_kind")
            return self.wide[:n]
        modes = {update.mode[k] for k in seg.keys}
        if _BF16 not in modes:
            np.concatenate([update.flat[k] for k in seg.keys], out=self.wide[:n], casting="same_kind")
        elif modes == {_BF16}:
            np.concatenate([update.flat[k].view(np.uint16) for k in seg.keys], out=self.half_bits[:n])
            np.left_shift(self.half_bits[:n], 16, out=self.wide_bits[:n], dtype=np.uint32)
        else:
            at = 0
            for key, size in zip(seg.keys, seg.sizes):
                np.copyto(self.wide[at:at + size], _widened(update.flat[key], update.mode[key]), casting="same_kind")
                at += size
        return self.wide[:n]

    def _scatter(self, seg: _Segment) -> None:
        at = 0
        for key, size in zip(seg.keys, seg.sizes):
            self.out[key][:] = seg.acc[at:at + size]
            at += size

    @staticmethod
    def _nonfinite_key(x: np.ndarray, seg: _Segment) -> str | None:
        if np.isfinite(x).all():
            return None
        at = 0
        for key, size in zip(seg.keys, seg.sizes):
            if not np.isfinite(x[at:at + size]).all():
                return key
            at += size
        return seg.keys[0]

    # -- the passes -----------------------------------------------------------------------------------
    def first_pass(self, updates: list[FusedUpdate]) -> bool:
        """Norms (update.sq), NaN/Inf (update.problem) and the weighted mean of the float arrays.
        False when the result must be summed again (an update was dropped part way, or overflowed)."""
        total = sum(u.weight for u in updates)
        for u in updates:
            u.factor, u.sq = (u.weight / total if total > 0 else 0.0), 0.0
        with one_thread(), warnings.catch_warnings():  # torch only reads the read-only reply bytes
            warnings.filterwarnings("ignore", message=".*not writable.*")
            exact = self._compiled_pass(updates) if self.step is not None else self._first_pass(updates)
        return exact and total > 0

    def _compiled_pass(self, updates: list[FusedUpdate]) -> bool:
        """The same pass as `_first_pass` with one compiled loop per chunk and update: x is read once,
        and the sum is built in place (an update found non-finite makes the sum inexact: summed again)."""
        exact, active, step, isfinite = True, list(updates), self.step, math.isfinite
        for seg in self.segments:
            ref, acc, first, dropped = seg.ref, seg.acc, True, False
            for u in active:
                x = self._chunk(u, seg)
                part = step(x, ref, acc, np.float32(u.factor), first)
                first = False
                if isfinite(part):
                    u.sq += part
                else:
                    exact = False
                    dropped = self._nonfinite(u, x, seg) or dropped
            if dropped:
                active = [u for u in active if u.problem is None]
            if seg.key is None and not first:
                self._scatter(seg)
        return exact

    def _nonfinite(self, u: FusedUpdate, x: np.ndarray, seg: _Segment) -> bool:
        """A chunk whose distance to the global model is not finite: True when it holds NaN/Inf (the
        update is dropped), else its values are finite but too far apart for float32 (norm: inf)."""
        key = self._nonfinite_key(x, seg)
        if key is None:
            u.sq = math.inf
            return False
        u.problem = f"array {key} contains NaN or Inf"
        return True

    def _first_pass(self, updates: list[FusedUpdate]) -> bool:
        import torch

        exact, active = True, list(updates)
        subtract, dot, isfinite, addmv = np.subtract, np.dot, math.isfinite, torch.addmv
        rows, rows_t, factors, factors_t = self.rows, self.rows_t, self.factors, self.factors_t
        for seg in self.segments:
            ref, n = seg.ref, seg.n
            started = dropped = False
            for first in range(0, len(active), len(rows)):
                used = 0
                for u in active[first:first + len(rows)]:
                    x = self._chunk(u, seg)
                    d = rows[used, :n]
                    subtract(x, ref, out=d)
                    part = float(dot(d, d))
                    if isfinite(part):
                        u.sq += part
                        factors[used] = u.factor
                        used += 1
                        continue
                    exact = False      # this row is not summed (the next update overwrites it)
                    dropped = self._nonfinite(u, x, seg) or dropped
                if not used:
                    continue
                block, weights = rows_t[:used, :n].t(), factors_t[:used]
                if started:
                    seg.acc_t.addmv_(block, weights)
                else:                  # the sum starts at the global model: global + sum_i w_i d_i
                    addmv(seg.ref_t, block, weights, out=seg.acc_t)
                    started = True
            if dropped:
                active = [u for u in active if u.problem is None]
            if seg.key is None and started:
                self._scatter(seg)
        return exact

    def weighted_pass(self, updates: list[FusedUpdate]) -> None:
        """sum_i (w_i / sum w) * x_i with FedAvg's operations (float32 product, then float32 sum)."""
        total = sum(u.weight for u in updates)
        for u in updates:
            u.factor = u.weight / total
        with one_thread(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            for seg in self.segments:
                acc, d = seg.acc, self.d[:seg.n]
                for i, u in enumerate(updates):
                    if i == 0:
                        np.multiply(self._chunk(u, seg), u.factor, out=acc)
                    else:
                        np.multiply(self._chunk(u, seg), u.factor, out=d)
                        np.add(acc, d, out=acc)
                if seg.key is None:
                    self._scatter(seg)

    def result(self, updates: list[FusedUpdate]) -> ArrayRecord:
        """Integer buffers averaged in float64 and rounded back (FedAvg + `_restore_dtypes`), then the
        ArrayRecord: one copy of each .npy buffer."""
        if self.int_keys:
            total = 0
            for i, u in enumerate(updates):
                part = np.concatenate([u.flat[k] for k in self.int_keys]) * u.factor
                total = part if i == 0 else total + part
            at = 0
            for key in self.int_keys:
                size = self.out[key].size
                self.out[key][:] = np.rint(total[at:at + size]).astype(self.dtypes[key])
                at += size
        views, files = self.views, self.files
        self.release()                 # drop every view of the result's buffers...
        record = ArrayRecord()
        for key in self.keys:          # ...so that each BytesIO hands its bytes over
            try:
                views[key].release()
                data = files[key].getvalue()
            except BufferError:        # a view is still alive somewhere: copy instead
                data = bytes(views[key])
            record[key] = Array(dtype=str(self.dtypes[key]), shape=self.shapes[key], stype=_NUMPY, data=data)
        return record

    def release(self) -> None:
        """Forget this round's result buffers (and every view of them)."""
        for seg in self.segments:
            if seg.key is not None:
                seg.acc = seg.acc_t = seg.ref = seg.ref_t = None
        self.out, self.views, self.files = {}, {}, {}
