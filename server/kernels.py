"""The compiled inner loop of the fused FedAvg pass (numba, optional): each update is read once."""
from __future__ import annotations

import functools
from typing import Callable


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
