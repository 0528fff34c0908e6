"""Flower strategies by name, with a guard that checks, widens and records every reply."""
from __future__ import annotations

import math
import io
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
                                     Krum)
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from leukfed.common.flower.wire import BF16_SUFFIX, NpyError, decode_arrays, npy_header, npy_header_for
from leukfed.common.fedconfig import FedConfig
from leukfed.common.privacy import noise_problem
from leukfed.server.kernels import fused_step


@dataclass
class RoundLog:
    """What the server saw in one round, filled in by the guard, read by the evaluate_fn hook."""

    started: float = 0.0
    train_sent_at: float = 0.0
    aggregation_seconds: float = 0.0
    train_phase_seconds: float = 0.0
    evaluate_phase_started: float = 0.0
    evaluate_phase_seconds: float = 0.0
    sites_sampled: list[int] = field(default_factory=list)
    train: dict[int, dict] = field(default_factory=dict)       # node id -> metrics
    evaluate: dict[int, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    aggregated_train: dict = field(default_factory=dict)
    aggregated_evaluate: dict = field(default_factory=dict)
    evaluated_round: int = 0    # the earlier round whose model the sites scored in this round's train task
    evaluate_in_train: dict[int, dict] = field(default_factory=dict)   # node id -> those metrics
    aggregated_evaluate_in_train: dict = field(default_factory=dict)


def reply_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    """Why an update must not reach the global model (wrong keys, shapes, dtypes, NaN/Inf), or None."""
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in arrays.items():
        if value.shape != reference[key].shape:
            return f"array {key} has shape {value.shape}, expected {reference[key].shape}"
        if value.dtype.kind != reference[key].dtype.kind:
            return f"array {key} has dtype {value.dtype}, expected {reference[key].dtype}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"array {key} contains NaN or Inf"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over the float arrays."""
    total = 0.0
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            delta = value.ravel() - reference[key].ravel()
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def split_evaluation(metrics: dict) -> tuple[dict, dict]:
    """A train reply's own metrics, and the scores of the previous global model it carries (`eval_*`,
    counted by `eval_num_examples`, which becomes their `num-examples`)."""
    train = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
    scores = {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_num_examples"}
    if "eval_num_examples" in metrics:
        scores["num-examples"] = metrics["eval_num_examples"]
    return train, scores


def keep_common_metrics(messages: list[Message]) -> None:
    """Flower aggregates only metric records with identical keys; a site whose small-sample metrics were
    suppressed sends fewer keys, so every reply keeps just the keys all replies share."""
    records = [(m, key, rec) for m in messages for key, rec in m.content.metric_records.items()]
    if not records:
        return
    common = set.intersection(*(set(rec.keys()) for _, _, rec in records))
    for message, key, rec in records:
        if set(rec.keys()) != common:
            message.content[key] = MetricRecord({k: rec[k] for k in rec.keys() if k in common})


# --------------------------------------------------------------------------------------------
# FedAvg/FedProx: the guard's checks, the update norms and the weighted mean in one pass
# --------------------------------------------------------------------------------------------

FUSED_CHUNK = 1 << 17   # float32 elements per chunk (512 KiB): every update's chunk meets the global
                        # model's chunk and the running sum while both are in cache
ROWS = 16              # updates whose differences are summed by one matrix-vector product (addmv)
PACK_BELOW = 1 << 14    # float arrays smaller than this (BatchNorm vectors, biases) share packed chunks
_F32, _CAST, _BF16 = 0, 1, 2   # how an update array becomes float32: as it is, by a cast, from bf16 bits
_NUMPY = "numpy.ndarray"


def _plain_weighted_mean(strategy) -> bool:
    """True when the strategy under the guard aggregates with FedAvg's own aggregate_train (FedAvg,
    FedProx): a weighted mean of the arrays, which FusedMean computes without materialising them."""
    mro = type(strategy).__mro__
    for cls in mro[mro.index(ReplyGuard) + 1:]:
        if "aggregate_train" in cls.__dict__:
            return cls.__dict__["aggregate_train"] is FedAvg.__dict__["aggregate_train"]
    return False


def _reply_weight(msg: Message, key: str) -> float:
    """The reply's `num-examples` as FedAvg reads it; 0 when unusable (FedAvg's check then refuses it)."""
    record = next(iter(msg.content.metric_records.values()), None)
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _check_consistency(messages: list[Message], weighted_by_key: str) -> None:
    """FedAvg's reply checks (it raises InconsistentMessageReplies). The ArrayRecord keys were checked
    against the global model already (with the bf16 marker removed), so only their number is left."""
    if any(len(m.content.array_records) != 1 for m in messages):
        raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies. Skipping aggregation.")
    validate_message_reply_consistency([m.content for m in messages], weighted_by_key, check_arrayrecord=False)


@dataclass(eq=False)
class _Update:
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


def torch_from_numpy(array: np.ndarray):
    import torch   # imported on first use: the server starts without paying for torch here
    return torch.from_numpy(array)


def _widened(flat: np.ndarray, mode: int) -> np.ndarray:
    if mode == _BF16:
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return flat


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
    def read(self, update: _Update, record: ArrayRecord) -> str | None:
        """Keys, shapes and dtypes from the .npy headers (no data touched); fills update.flat/mode.
        The reason the update is refused, or None."""
        headers, problems = self.headers, []
        flat, mode = update.flat, update.mode
        for name, array in record.items():
            data = array.data
            try:
                if array.stype != _NUMPY:
                    raise NpyError(f"serialised as {array.stype!r}")
                # A header seen before (the same bytes, magic included) needs no parsing: the cache key.
                end = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else \
                    12 + int.from_bytes(data[8:12], "little")
                entry = headers.get((name, data[:end]))
                if entry is None:
                    head, dtype, shape, fortran, count, offset = npy_header(data)
                    if len(headers) > 8 * len(self.keys) + 64:
                        headers.clear()
                    entry = headers[(name, head)] = (*self._header_entry(name, dtype, shape, fortran),
                                                     dtype, count, offset, shape if fortran and len(shape) > 1 else None)
                key, kind, problem, dtype, count, offset, fortran_shape = entry
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
    def _chunk(self, update: _Update, seg: _Segment) -> np.ndarray:
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
    def first_pass(self, updates: list[_Update]) -> bool:
        """Norms (update.sq), NaN/Inf (update.problem) and the weighted mean of the float arrays.
        False when the result must be summed again (an update was dropped part way, or overflowed)."""
        total = sum(u.weight for u in updates)
        for u in updates:
            u.factor, u.sq = (u.weight / total if total > 0 else 0.0), 0.0
        with _one_thread(), warnings.catch_warnings():  # torch only reads the read-only reply bytes
            warnings.filterwarnings("ignore", message=".*not writable.*")
            exact = self._compiled_pass(updates) if self.step is not None else self._first_pass(updates)
        return exact and total > 0

    def _compiled_pass(self, updates: list[_Update]) -> bool:
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

    def _nonfinite(self, u: _Update, x: np.ndarray, seg: _Segment) -> bool:
        """A chunk whose distance to the global model is not finite: True when it holds NaN/Inf (the
        update is dropped), else its values are finite but too far apart for float32 (norm: inf)."""
        key = self._nonfinite_key(x, seg)
        if key is None:
            u.sq = math.inf
            return False
        u.problem = f"array {key} contains NaN or Inf"
        return True

    def _first_pass(self, updates: list[_Update]) -> bool:
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

    def weighted_pass(self, updates: list[_Update]) -> None:
        """sum_i (w_i / sum w) * x_i with FedAvg's operations (float32 product, then float32 sum)."""
        total = sum(u.weight for u in updates)
        for u in updates:
            u.factor = u.weight / total
        with _one_thread(), warnings.catch_warnings():
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

    def result(self, updates: list[_Update]) -> ArrayRecord:
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


@contextmanager
def _one_thread():
    """Memory-bound work: one thread reaches DRAM speed, and never waits at an OpenMP barrier for a
    core another process holds."""
    import torch

    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


class ReplyGuard:
    """Mixin over a Flower strategy: validate and widen replies, record per-site facts and timings."""

    norm_outlier_factor: float = 10.0

    def setup_guard(self, min_noise_multiplier: float = 0.0, evaluate_every: int = 1, rounds: int = 0,
                    evaluate_with_train: bool = False) -> None:
        self.log = RoundLog()
        self.reference: dict[str, np.ndarray] = {}
        self.min_noise_multiplier = min_noise_multiplier
        self.evaluate_every = evaluate_every
        self.rounds = rounds
        self.round_offset = 0  # a resumed run's strategy counts its rounds from 1 again
        # Round r's evaluation message would carry the same model as round r+1's train message: the sites
        # score it there instead, before training. Only the last round sends an evaluation message.
        self.evaluate_with_train = evaluate_with_train
        self.deferred_round = 0

    def evaluates_in(self, server_round: int) -> bool:
        """Sites score the global model every `evaluate_every` rounds and always after the last one."""
        absolute, every = server_round + self.round_offset, self.evaluate_every
        return absolute >= self.rounds or (every > 0 and absolute % every == 0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.log = RoundLog()
        if self.deferred_round:
            config = ConfigRecord({**dict(config), "evaluate-first": True})
            self.log.evaluated_round, self.deferred_round = self.deferred_round, 0
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.log.started = time.perf_counter()  # after sampling: waiting for sites to connect is not round time
        self.log.sites_sampled = [m.metadata.dst_node_id for m in messages]
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        self.log.train_sent_at = time.perf_counter()
        return messages

    fused_mean: bool = True  # FedAvg/FedProx: checks, norms and the weighted mean in one pass (FusedMean)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.fused_mean and _plain_weighted_mean(self) and FusedMean.supports(self.reference):
            result = self._aggregate_train_fused(server_round, replies)
        else:
            result = self._aggregate_train_materialised(server_round, replies)
        self._aggregate_evaluation_in_train()
        return result

    def _aggregate_evaluation_in_train(self) -> None:
        """The previous model's scores that came with the train replies, aggregated as Flower's
        aggregate_evaluate would (weighted by the sites' evaluation counts)."""
        scores = [m for m in self.log.evaluate_in_train.values() if m.get("num-examples")]
        if not scores:
            return
        common = set.intersection(*(set(m) for m in scores))
        contents = [RecordDict({"metrics": MetricRecord({k: m[k] for k in common})}) for m in scores]
        self.log.aggregated_evaluate_in_train = dict(self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key))

    def _open_train_reply(self, msg: Message) -> tuple[int, ArrayRecord | None, dict] | None:
        """Log a failed reply (None) or count its bytes; return (node, arrays record, metrics)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            self.log.failures.append({"node": node, "phase": "train", "reason": msg.error.reason})
            return None
        record = msg.content.array_records.get("arrays")
        self.log.bytes_received += record.count_bytes() if record is not None else 0
        name, metric_record = next(iter(msg.content.metric_records.items()), (None, None))
        metrics, scores = split_evaluation(dict(metric_record or {}))
        if scores:   # the previous model's scores are not training metrics: FedAvg must not average them
            self.log.evaluate_in_train[node] = scores
            msg.content[name] = MetricRecord(metrics)
        return node, record, metrics

    def _aggregate_train_fused(self, server_round: int, replies: Iterable[Message]):
        """FedAvg's weighted mean of the replies that pass the guard, in one pass over their bytes.

        The same checks, norms, rejections, log and result as `_aggregate_train_materialised` followed
        by FedAvg.aggregate_train (to float32 rounding), without materialising any update."""
        start = time.perf_counter()
        if getattr(self, "_fused", None) is None:
            self._fused = FusedMean()
        fused: FusedMean = self._fused
        fused.prepare(self.reference)
        seen: list[_Update] = []
        for msg in replies:
            if (opened := self._open_train_reply(msg)) is None:
                continue
            node, record, metrics = opened
            self.log.train[node] = metrics
            update = _Update(msg, node, _reply_weight(msg, self.weighted_by_key))
            update.problem = "no arrays in reply" if record is None else fused.read(update, record)
            if update.problem is None:
                noise = noise_problem(metrics, self.min_noise_multiplier)
                if noise is not None:  # as before: NaN/Inf is named first, which needs the data
                    update.problem = update.nonfinite_problem(self.reference) or noise
            seen.append(update)
        updates = [u for u in seen if u.problem is None]
        exact = fused.first_pass(updates) if updates else True
        for update in updates:
            if update.problem is None:
                self.log.train[update.node]["update_norm"] = math.sqrt(update.sq)
        self.log.rejected.extend({"node": u.node, "reason": u.problem} for u in seen if u.problem)
        accepted = [u.msg for u in updates if u.problem is None]
        kept = self._reject_norm_outliers(accepted)
        keep_common_metrics(kept)
        arrays = metrics = None
        if kept:
            self._check_and_log_replies(kept, is_train=True, validate=False)  # Flower's log line
            _check_consistency(kept, self.weighted_by_key)                   # and its checks
            ids = {id(m) for m in kept}
            final = [u for u in updates if id(u.msg) in ids]
            if not exact or len(final) != len(updates):  # a rejection after the first pass: sum again
                fused.weighted_pass(final)
            arrays = fused.result(final)
            metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        else:
            fused.release()
        self.log.aggregation_seconds = time.perf_counter() - start  # checks, norms and mean: one pass
        self.log.train_phase_seconds = time.perf_counter() - self.log.started
        self.log.aggregated_train = dict(metrics) if metrics else {}
        return arrays, metrics

    def _aggregate_train_materialised(self, server_round: int, replies: Iterable[Message]):
        """Robust and adaptive strategies (median, trimmed mean, Krum, FedAdam, FedYogi) aggregate
        materialised arrays: each reply is decoded (and half precision widened) once."""
        accepted = []
        for msg in replies:
            if (opened := self._open_train_reply(msg)) is None:
                continue
            node, record, metrics = opened
            arrays = decode_arrays(record) if record is not None else {}  # decoded once, half precision widened
            problem = ("no arrays in reply" if record is None else reply_problem(arrays, self.reference)) \
                or noise_problem(metrics, self.min_noise_multiplier)
            if problem is None:
                metrics["update_norm"] = update_norm(arrays, self.reference)
            self.log.train[node] = metrics
            if problem:
                self.log.rejected.append({"node": node, "reason": problem})
                continue
            if set(arrays) != set(record.keys()) or any(record[k].dtype == "float16" for k in record.keys()):
                msg.content["arrays"] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
            accepted.append(msg)
        accepted = self._reject_norm_outliers(accepted)
        keep_common_metrics(accepted)
        start = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, accepted) if accepted else (None, None)
        if arrays is not None:
            arrays = self._restore_dtypes(arrays)
        self.log.aggregation_seconds = time.perf_counter() - start
        self.log.train_phase_seconds = time.perf_counter() - self.log.started
        self.log.aggregated_train = dict(metrics) if metrics else {}
        return arrays, metrics

    def _restore_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Weighted averaging promotes integer buffers (BatchNorm counters) to float: cast them back."""
        restored = ArrayRecord()
        for key, array in arrays.items():
            value, dtype = array.numpy(), self.reference[key].dtype
            if value.dtype != dtype:
                value = (np.rint(value) if dtype.kind in "iu" else value).astype(dtype)
            restored[key] = Array(np.asarray(value, order="C"))
        return restored

    def _reject_norm_outliers(self, accepted: list[Message]) -> list[Message]:
        """Drop updates whose norm is far outside the cohort's (median-relative), when >= 3 replied."""
        if len(accepted) < 3:
            return accepted
        norms = {m.metadata.src_node_id: self.log.train[m.metadata.src_node_id]["update_norm"] for m in accepted}
        median = float(np.median(list(norms.values())))
        keep = []
        for m in accepted:
            norm = norms[m.metadata.src_node_id]
            if median > 0 and norm > self.norm_outlier_factor * median:
                self.log.rejected.append({"node": m.metadata.src_node_id,
                                          "reason": f"update norm {norm:.3g} > {self.norm_outlier_factor:g}x cohort median {median:.3g}"})
            else:
                keep.append(m)
        return keep

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.log.evaluate_phase_started = time.perf_counter()
        if not self.evaluates_in(server_round):
            return []
        if self.evaluate_with_train and server_round + self.round_offset < self.rounds:
            self.deferred_round = server_round + self.round_offset   # scored in the next train task
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.log.failures.append({"node": node, "phase": "evaluate", "reason": msg.error.reason})
                continue
            self.log.evaluate[node] = dict(next(iter(msg.content.metric_records.values()), {}))
            valid.append(msg)
        keep_common_metrics(valid)
        metrics = super().aggregate_evaluate(server_round, valid) if valid else None
        self.log.evaluate_phase_seconds = time.perf_counter() - self.log.evaluate_phase_started
        self.log.aggregated_evaluate = dict(metrics) if metrics else {}
        return metrics


BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
         "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}

# FedAdam/FedYogi moments: the strategy state a checkpoint must carry.
STATE_ATTRIBUTES = ("m_t", "v_t")


def make_strategy(fed: FedConfig):
    """The named Flower strategy wrapped in the ReplyGuard."""
    base = BASES[fed.strategy]
    guarded = type(f"Guarded{base.__name__}", (ReplyGuard, base), {})
    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_sites,
                  min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites)
    extra = {"fedprox": {"proximal_mu": fed.proximal_mu}, "fedadam": {"eta": fed.server_lr},
             "fedyogi": {"eta": fed.server_lr}, "fedtrimmedavg": {"beta": fed.trim_beta},
             "krum": {"num_malicious_nodes": fed.krum_malicious}}.get(fed.strategy, {})
    strategy = guarded(**common, **extra)
    # Every site trains every round and sees the plain train message: only then can it score the model.
    with_train = fed.evaluate_with_train and fed.fraction_train >= 1.0 and not fed.secure_aggregation
    strategy.setup_guard(min_noise_multiplier=fed.dp_min_noise_multiplier, evaluate_every=fed.evaluate_every,
                         rounds=fed.rounds, evaluate_with_train=with_train)
    return strategy


def strategy_state(strategy) -> dict:
    return {k: getattr(strategy, k) for k in STATE_ATTRIBUTES if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy, key, value)
