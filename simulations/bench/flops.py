"""How close a training step is to the compute ceiling: FLOPs per image, measured and datasheet peaks."""
from __future__ import annotations

import copy
import time

from leukfed.simulations.bench.measure import median, sync

# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment; first match wins (specific first).
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),      # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def train_step_flops(model, input_size: tuple[int, int, int], num_classes: int, batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by FlopCounterMode on CPU."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).cpu().float().train()
    x = torch.randn(batch, *input_size)
    y = torch.randint(0, num_classes, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(probe(x), y).backward()
    return counter.get_total_flops() / batch


def matmul_peak_flops(device, dtype=None, size: int | None = None, repeats: int = 5) -> float:
    """Measured dense-matmul FLOP/s on this device: the compute-bound ceiling we can actually reach."""
    import torch

    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / median(times)


def gpu_peak_tflops(name: str | None) -> float | None:
    """The datasheet's dense bf16 peak of a GPU named `name` (None: not in the table)."""
    if not name:
        return None
    for fragment, peak in GPU_PEAK_BF16_TFLOPS:
        if fragment.lower() in name.lower():
            return peak
    return None
