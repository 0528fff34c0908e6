"""The inner loop of the fused FedAvg pass: compiled with numba when installed, on one thread."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable

import numpy as np


@functools.cache
def fused_step() -> Callable | None:
    """`step(x, ref, acc, factor, first) -> |x - ref|^2` doing acc = (ref if first else acc) + factor * (x - ref)
    in one loop over float32 arrays; None when numba is not installed (the numpy/torch path then runs)."""
    try:
        import numba
    except ImportError:
        return None

    # reassoc lets the norm's sum vectorise; no "nnan"/"ninf": NaN and Inf must survive into the norm.
    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
    def step(x, ref, acc, factor, first):  # pragma: no cover - compiled
        sq = 0.0
        if first:
            for i in range(x.size):
                d = x[i] - ref[i]
                sq += d * d
                acc[i] = ref[i] + factor * d
        else:
            for i in range(x.size):
                d = x[i] - ref[i]
                sq += d * d
                acc[i] += factor * d
        return sq

    return step


def torch_from_numpy(array: np.ndarray):
    import torch   # imported on first use: the server starts without paying for torch here
    return torch.from_numpy(array)


@contextmanager
def one_thread():
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
