"""`leuk bench`: how close training, data loading, aggregation, transfer and simulation are to the hardware.

Every measurement runs our code side by side with a minimal reference doing the same work (a plain
PyTorch loop, a numpy sum over the same bytes, the model's float32 size), interleaved in the same
process with several repeats, and reports medians and the ratio. Each sub-command prints a table,
saves one JSON file (machine, exact command line, timestamp, figures) to `--out`, and appends
long-format rows to `<out>/perf.jsonl` so that a regression shows up as a changed row.

The measured fixes now live in the product code (`train_epoch` without per-step syncs, the fused
single-pass aggregation in `ReplyGuard`), so every "ours" case times the production path. `per_item_loader`
is the classic per-image DataLoader path, kept as the comparison point for our batched loader.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import typer

from leukfed.common.cli_support import new_app, parse_csv_list
from leukfed.common.errors import LeukError

bench_app = new_app("Measure training, data pipeline, aggregation, transfer size and simulation scale "
                    "against plain references on this machine.")

DEFAULT_OUT = Path("benchmarks/results")
PERF_LOG = "perf.jsonl"

# The real settings (what `all` runs, and each sub-command's defaults).
TRAINER_MODELS = "resnet18:128:32:3,tinycnn:32:32:20,dscnet:64:32:3"
PIPELINE_MODELS = "resnet18:128:32,tinycnn:32:32"

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


# --------------------------------------------------------------------------------------------
# Shared plumbing: timing, results, tables
# --------------------------------------------------------------------------------------------

def median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def interleaved(cases: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case `warmup` times, then `repeats` rounds in a rotating order; each case times itself.

    Rotating the order means slow drifts of a noisy machine (other jobs starting, thermal) hit
    every case alike, and the medians compare like with like.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(float(cases[name]()))
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repeats of times[numerator][r] / times[denominator][r].

    Cases of one repeat run back to back, so a slow drift of a shared machine (other jobs coming
    and going) cancels in each pair; the median of the pairs is steadier than a ratio of medians.
    """
    return median(a / b for a, b in zip(times[numerator], times[denominator]))


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def command_line() -> str:
    """The exact command line (a `python -m` run shows as such, not as a path to this file)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "bench.py":
        argv = [sys.executable, "-m", "leukfed.simulations.bench", *argv[1:]]
    return shlex.join(argv)


def save_result(benchmark: str, params: dict, result: dict, rows: list[dict], out: Path) -> Path:
    """One JSON file per run plus long-format rows (benchmark, case, metric, value, unit) in perf.jsonl."""
    from leukfed.common.atomic import atomic_write_json
    from leukfed.common.machine import machine_info

    now = datetime.now(timezone.utc)
    machine = machine_info()
    git = git_state()
    payload = {"benchmark": benchmark, "timestamp": now.isoformat(timespec="seconds"),
               "command": command_line(), "params": params, "machine": machine, "git": git, **result}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    atomic_write_json(path, payload)
    common = {"timestamp": payload["timestamp"], "benchmark": benchmark, "git_commit": git["commit"],
              "git_dirty": git["dirty"], "cpu": machine["cpu"], "cores": machine["cores"],
              "gpu": machine["gpu"], "torch_threads": machine["torch_threads"]}
    with open(out / PERF_LOG, "a", encoding="utf-8") as log:
        for row in rows:
            log.write(json.dumps({**common, **row}, default=str) + "\n")
    return path


def row(case: str, metric: str, value: float | int | None, unit: str) -> dict:
    return {"case": case, "metric": metric, "value": value, "unit": unit}


def format_table(headers: Sequence[str], body: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            if not math.isfinite(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)
    text = [[cell(v) for v in r] for r in body]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(lines)


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class ModelSpec:
    """`name:image_size:batch[:steps]` on the command line (image size 0: the model's default)."""

    name: str
    image_size: int
    batch: int
    steps: int | None = None

    @classmethod
    def parse(cls, text: str, default_steps: int | None = None) -> "ModelSpec":
        parts = text.split(":")
        try:
            name = parts[0]
            size = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            batch = int(parts[2]) if len(parts) > 2 and parts[2] else 32
            steps = int(parts[3]) if len(parts) > 3 and parts[3] else default_steps
        except ValueError:
            raise LeukError(f"bad model spec {text!r}; use name:image_size:batch[:steps]") from None
        if batch < 1 or (steps is not None and steps < 1):
            raise LeukError(f"bad model spec {text!r}: batch and steps must be >= 1")
        return cls(name, size, batch, steps)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.image_size or 'default'}px/b{self.batch}"


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# 1. trainer: our train_epoch vs a minimal PyTorch loop
# --------------------------------------------------------------------------------------------

def per_item_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                    drop_last: bool = False):
    """The classic path: a torch DataLoader calling `SmearDataset.__getitem__` per image (augment and
    normalise one image at a time) and collating, optionally in worker processes. This is what
    `make_loader` was before the batched loader; kept here as the comparison point."""
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last and len(dataset) > batch_size,
                      persistent_workers=num_workers > 0)


def ours_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False):
    """`leukfed.common.dataset.make_loader` as it is now (passing num_workers only if it takes it)."""
    import inspect

    from leukfed.common.dataset import make_loader

    kwargs = dict(shuffle=shuffle, seed=seed, drop_last=drop_last)
    if "num_workers" in inspect.signature(make_loader).parameters:
        kwargs["num_workers"] = num_workers
    elif num_workers:
        raise LeukError("make_loader takes no num_workers")
    return make_loader(dataset, batch_size, **kwargs)


def make_loader_takes_workers() -> bool:
    import inspect

    from leukfed.common.dataset import make_loader
    return "num_workers" in inspect.signature(make_loader).parameters


def per_step_overheads(loader_fn, dataset, batch: int, num_classes: int, steps: int, normalize, images,
                       reps: int = 200) -> dict[str, float]:
    """Microseconds per step of the parts where our loop differs from the plain one (best of several
    repeats, so the shared machine's noise mostly drops out): the bookkeeping `train_epoch` does after
    each step (with host sync, and the on-device variant), and fetching one batch from our loader
    vs slicing + normalising it directly."""
    import torch

    logits = torch.randn(batch, num_classes)
    target = torch.randint(0, num_classes, (batch,))
    loss = torch.nn.functional.cross_entropy(logits, target)

    def best(fn, inner: int) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
        return min(times) * 1e6

    total = torch.zeros((), dtype=torch.float64)
    state = {"correct": 0}

    def synced() -> None:
        nonlocal total
        total += loss.detach().double().cpu() * len(target)
        state["correct"] += int((logits.argmax(1) == target).sum())

    dev_total = torch.zeros((), dtype=torch.float64)
    dev_correct = torch.zeros((), dtype=torch.int64)

    def on_device() -> None:
        dev_total.add_(loss.detach().double() * len(target))
        dev_correct.add_((logits.argmax(1) == target).sum())

    loader = loader_fn(dataset, batch, shuffle=True, seed=0, drop_last=True)

    def loader_epoch() -> None:
        for _ in loader:
            pass
    perm = torch.randperm(len(images))

    def sliced_epoch() -> None:
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            (images[idx].float() - normalize.mean) / normalize.std
    return {"bookkeeping_train_epoch_us": best(synced, reps),
            "bookkeeping_on_device_us": best(on_device, reps),
            "loader_batch_us": best(loader_epoch, 3) / steps,
            "plain_slice_normalise_batch_us": best(sliced_epoch, 3) / steps}


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
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / median(times)


def gpu_peak_tflops(name: str | None) -> float | None:
    if not name:
        return None
    for fragment, peak in GPU_PEAK_BF16_TFLOPS:
        if fragment.lower() in name.lower():
            return peak
    return None


def _trainer_case(spec: ModelSpec, hardware, num_classes: int, repeats: int, warmup: int, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    from leukfed.common.dataset import SmearDataset
    from leukfed.common.train import make_loss, prepare_model
    from leukfed.common.transforms import Normalize
    from leukfed.models import create_model

    torch.manual_seed(seed)
    base = create_model(spec.name, num_classes, pretrained=False, image_size=spec.image_size or None)
    data_config = base.leuk_info.data_config
    channels, height, width = data_config.input_size
    steps = spec.steps or 4
    n = spec.batch * steps
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, height, width), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    device = hardware.device
    loss_fn = make_loss("ce", num_classes)

    def fresh():
        model = prepare_model(copy.deepcopy(base), hardware)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    # Reference: data already on the device, batch-wise normalisation, no per-step host sync.
    ref_model, ref_opt = fresh()
    dev_images, dev_labels = images.to(device), labels.to(device)
    normalize = Normalize(data_config)
    mean, std = normalize.mean.to(device), normalize.std.to(device)

    def reference() -> float:
        ref_model.train()
        perm = torch.randperm(n, generator=g).to(device)
        total = torch.zeros((), device=device)
        _sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * spec.batch:(s + 1) * spec.batch]
            x = (dev_images[idx].float() - mean) / std
            if hardware.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = dev_labels[idx]
            with hardware.autocast():
                logits = ref_model(x)
                loss = F.cross_entropy(logits.float(), y)
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()
            total += loss.detach()
        _sync(device)
        float(total)
        return time.perf_counter() - t0

    def ours_with(train_fn, loader_fn) -> Callable[[], float]:
        model, opt = fresh()
        dataset = SmearDataset(images, labels.numpy(), data_config, train=False)
        loader = loader_fn(dataset, spec.batch, shuffle=True, seed=seed, drop_last=True)

        def run() -> float:
            _sync(device)
            t0 = time.perf_counter()
            stats = train_fn(model, loader, opt, loss_fn, hardware)
            _sync(device)
            assert stats.num_examples == n
            return time.perf_counter() - t0
        return run

    from leukfed.common.train import train_epoch

    cases = {"reference": reference,
             "ours": ours_with(train_epoch, ours_loader),
             "train_epoch+per_item_DataLoader": ours_with(train_epoch, per_item_loader)}
    times = interleaved(cases, repeats, warmup)
    ips = {name: n / median(t) for name, t in times.items()}
    flops_per_image = train_step_flops(base, data_config.input_size, num_classes)
    overheads = per_step_overheads(ours_loader, SmearDataset(images, labels.numpy(), data_config, train=False),
                                   spec.batch, num_classes, steps, normalize, images)
    step_us = median(times["reference"]) / steps * 1e6
    overheads["reference_step_us"] = step_us
    overheads["our_extra_per_step_fraction"] = (
        overheads["bookkeeping_train_epoch_us"] + overheads["loader_batch_us"]
        - overheads["plain_slice_normalise_batch_us"]) / step_us
    result = {
        "model": spec.name, "image_size": height, "batch": spec.batch, "steps": steps, "images_per_run": n,
        "params": sum(p.numel() for p in base.parameters()),
        "seconds": times, "images_per_s": ips,
        # throughput ratio ours/reference = time(reference)/time(ours), paired per repeat
        "ratio_to_reference": {name: paired_ratio(times, "reference", name) for name in times},
        "ratio_of_medians_to_reference": {name: ips[name] / ips["reference"] for name in ips},
        "ratio_ours_to_reference": paired_ratio(times, "reference", "ours"),
        "ratio_per_item_dataloader_to_reference": paired_ratio(times, "reference", "train_epoch+per_item_DataLoader"),
        "train_flops_per_image": flops_per_image,
        "per_step_overheads": overheads,
        "achieved_tflops": {k: v * flops_per_image / 1e12 for k, v in ips.items()},
    }
    return result


@bench_app.command("trainer")
def trainer_cmd(
    models: str = typer.Option(TRAINER_MODELS, "--models",
                               help="Comma list of name:image_size:batch[:steps] (steps: batches per timed run)."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved); medians are reported."),
    warmup: int = typer.Option(1, help="Untimed runs of every case first."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (as `leuk train`)."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
    num_classes: int = typer.Option(4, help="Classes of the head."),
    seed: int = typer.Option(0, help="Seed of the random in-memory images."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON result and perf.jsonl."),
) -> dict:
    """Images/s of our train_epoch + make_loader over an in-memory SmearDataset vs a plain PyTorch loop."""
    from leukfed.common.train import select_hardware

    set_threads(threads)
    params = dict(models=models, repeats=repeats, warmup=warmup, device=device, threads=threads,
                  num_classes=num_classes, seed=seed)
    hardware = select_hardware(device)
    cases = [_trainer_case(ModelSpec.parse(m), hardware, num_classes, repeats, warmup, seed)
             for m in parse_csv_list(models)]
    import torch
    peak_measured = matmul_peak_flops(hardware.device)
    gpu_name = torch.cuda.get_device_name(hardware.device) if hardware.device.type == "cuda" else None
    peak_table = gpu_peak_tflops(gpu_name)
    rows, body = [], []
    for case in cases:
        label = f"{case['model']}@{case['image_size']}px/b{case['batch']}"
        for variant, ips in case["images_per_s"].items():
            tflops = case["achieved_tflops"][variant]
            frac_measured = tflops * 1e12 / peak_measured
            frac_table = tflops / peak_table if peak_table else None
            case.setdefault("fraction_of_measured_matmul_peak", {})[variant] = frac_measured
            case.setdefault("fraction_of_datasheet_peak", {})[variant] = frac_table
            ratio = case["ratio_to_reference"][variant]
            body.append([label, variant, ips, ratio, tflops * 1e3, frac_measured,
                         frac_table if frac_table is not None else float("nan")])
            rows += [row(f"{label}/{variant}", "images_per_s", ips, "img/s"),
                     row(f"{label}/{variant}", "ratio_to_reference", ratio, "x")]
    result = {"hardware": hardware.describe(), "torch_threads": torch.get_num_threads(),
              "measured_matmul_peak_tflops": peak_measured / 1e12, "gpu": gpu_name,
              "datasheet_peak_bf16_tflops": peak_table, "cases": cases}
    typer.echo(f"trainer on {hardware.describe()}, {torch.get_num_threads()} threads; "
               f"measured matmul peak {peak_measured / 1e9:.1f} GFLOP/s"
               + (f", datasheet {peak_table} TFLOP/s" if peak_table else ""))
    typer.echo(format_table(["model", "variant", "img/s (median)", "x ref (paired)", "GFLOP/s", "of matmul",
                             "of datasheet"], body))
    typer.echo(format_table(
        ["model", "step us", "bookkeeping us (sync)", "(on device)", "our batch us", "plain batch us", "extra/step"],
        [[f"{c['model']}@{c['image_size']}px", c["per_step_overheads"]["reference_step_us"],
          c["per_step_overheads"]["bookkeeping_train_epoch_us"], c["per_step_overheads"]["bookkeeping_on_device_us"],
          c["per_step_overheads"]["loader_batch_us"], c["per_step_overheads"]["plain_slice_normalise_batch_us"],
          c["per_step_overheads"]["our_extra_per_step_fraction"]] for c in cases]))
    path = save_result("trainer", params, result, rows, out)
    typer.echo(f"saved {path}")
    return result


# --------------------------------------------------------------------------------------------
# 2. pipeline: decode + augment throughput vs what the model consumes
# --------------------------------------------------------------------------------------------

def pipeline_source(source: str, data_root: str | None, images: int, scratch: Path):
    """(root, samples, description): real JPEGs from $LEUK_DATA_ROOT/all_taleqani, else generated ones."""
    from leukfed.common.data import scan_dataset

    real = Path(data_root) / "all_taleqani" if data_root else None
    if source == "real" and (real is None or not real.is_dir()):
        raise LeukError("--source real needs --data-root (or $LEUK_DATA_ROOT) with all_taleqani/")
    if source != "synthetic" and real is not None and real.is_dir():
        manifest = scan_dataset(real)
        step = max(1, len(manifest.samples) // images)
        samples = list(manifest.samples[::step][:images])
        return real, samples, f"real: {real} ({len(samples)} of {len(manifest.samples)} images)"
    from leukfed.common.synthetic import make_synthetic_dataset

    root = scratch / "synthetic"
    if not root.exists():
        make_synthetic_dataset(root, per_class=max(1, math.ceil(images / 4)), size=224, seed=0)
    manifest = scan_dataset(root)
    samples = list(manifest.samples[:images])
    return root, samples, f"synthetic 224px PNG ({len(samples)} images, make_synthetic_dataset)"


def consumption_timer(spec: ModelSpec, hardware, num_classes: int, steps: int) -> tuple[Callable[[], float], int]:
    """What the model eats: a timer of `steps` plain-loop training steps (as `trainer`'s reference)
    and the number of images it trains on per call."""
    import torch
    import torch.nn.functional as F

    from leukfed.common.train import prepare_model
    from leukfed.models import create_model

    model = prepare_model(create_model(spec.name, num_classes, image_size=spec.image_size or None), hardware)
    c, h, w = model.leuk_info.data_config.input_size
    x = torch.randn(spec.batch, c, h, w, device=hardware.device)
    if hardware.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (spec.batch,), device=hardware.device)
    opt = torch.optim.Adam(model.parameters())

    def run() -> float:
        _sync(hardware.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with hardware.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(hardware.device)
        return time.perf_counter() - t0
    return run, spec.batch * steps


CONSUME = "model consumption (plain training loop)"


def _epoch_timer(loader, n: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        count = 0
        for images, _ in loader:
            count += len(images)
        assert count == n, (count, n)
        return time.perf_counter() - t0
    return run


@bench_app.command("pipeline")
def pipeline_cmd(
    models: str = typer.Option(PIPELINE_MODELS, "--models",
                               help="Comma list of name:image_size:batch (the input size decides the resize)."),
    images: int = typer.Option(256, help="Images to decode and augment per timed run."),
    workers: str = typer.Option("0,1,2", help="DataLoader worker counts to measure."),
    decode_threads: str = typer.Option("1,2,4", help="decode_images thread counts to measure."),
    augment: str = typer.Option("paper002", help="Augmentation(s) to measure, comma list."),
    source: str = typer.Option("auto", help="auto (real when $LEUK_DATA_ROOT is set), real or synthetic."),
    data_root: str = typer.Option(os.environ.get("LEUK_DATA_ROOT", ""), "--data-root",
                                  help="Folder holding all_taleqani/ (default $LEUK_DATA_ROOT)."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved)."),
    consume_steps: int = typer.Option(3, help="Training steps per timed run of the consumption reference."),
    device: str = typer.Option("auto", help="Device of the consumption reference."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON result and perf.jsonl."),
) -> dict:
    """Decode-once and per-item augmentation images/s with 0/1/2 workers vs the model's consumption."""
    from leukfed.common.dataset import SmearDataset, decode_images
    from leukfed.common.train import select_hardware
    from leukfed.models import resolve_data_config

    if source not in ("auto", "real", "synthetic"):
        raise LeukError("--source must be auto, real or synthetic")
    set_threads(threads)
    params = dict(models=models, images=images, workers=workers, decode_threads=decode_threads, augment=augment,
                  source=source, data_root=data_root, repeats=repeats, consume_steps=consume_steps,
                  device=device, threads=threads)
    hardware = select_hardware(device)
    worker_counts = [int(w) for w in parse_csv_list(workers)]
    thread_counts = [int(t) for t in parse_csv_list(decode_threads)]
    cases, rows, body = [], [], []
    with tempfile.TemporaryDirectory(prefix="leuk-bench-") as scratch:
        root, samples, described = pipeline_source(source, data_root or None, images, Path(scratch))
        n = len(samples)
        index = {name: i for i, name in enumerate(sorted({s.label for s in samples}))}
        labels = [index[s.label] for s in samples]
        for spec in (ModelSpec.parse(m) for m in parse_csv_list(models)):
            data_config = resolve_data_config(spec.name, spec.image_size or None)
            label = f"{spec.name}@{data_config.input_size[1]}px/b{spec.batch}"
            decode_cases = {f"decode threads={t}": (lambda t=t, dc=data_config: _timed(
                lambda: decode_images(root, samples, dc, workers=t))) for t in thread_counts}
            decoded, _ = decode_images(root, samples, data_config)
            loaders, augment_cases = [], {}
            for aug in parse_csv_list(augment):
                dataset = SmearDataset(decoded, labels, data_config, train=True, augment=aug)
                for w in worker_counts:
                    loader = per_item_loader(dataset, spec.batch, shuffle=True, num_workers=w)
                    loaders.append(loader)
                    augment_cases[f"per-item __getitem__ {aug} DataLoader workers={w}"] = _epoch_timer(loader, n)
                for w in (worker_counts if make_loader_takes_workers() else [0]):
                    loader = ours_loader(dataset, spec.batch, shuffle=True, num_workers=w)
                    loaders.append(loader)
                    augment_cases[f"make_loader (ours) {aug} workers={w}"] = _epoch_timer(loader, n)
            consume_run, consumed = consumption_timer(spec, hardware, len(index) or 1, consume_steps)
            times = interleaved({**decode_cases, **augment_cases, CONSUME: consume_run}, repeats, 1)
            augment_cases.clear()
            loaders.clear()
            gc.collect()  # the DataLoaders' persistent workers exit with their iterators
            consume_times = times.pop(CONSUME)
            consume = consumed / median(consume_times)
            ips = {name: n / median(t) for name, t in times.items()}
            # pipeline/consumption throughput, paired per repeat (both ran back to back)
            ratios = {name: median((n / a) / (consumed / c) for a, c in zip(t, consume_times))
                      for name, t in times.items()}
            # In-process (workers=0): every image is augmented, then trained on, by the same cores.
            serial = {name: 1.0 / (1.0 / v + 1.0 / consume) for name, v in ips.items() if "workers=0" in name}
            cases.append({"model": spec.name, "image_size": data_config.input_size[1], "batch": spec.batch,
                          "images": n, "seconds": times, "images_per_s": ips,
                          "consumption_images_per_s": consume, "consumption_seconds": consume_times,
                          "consumption_images_per_run": consumed, "ratio_pipeline_to_consumption": ratios,
                          "serial_workers0_images_per_s": serial})
            for name, v in ips.items():
                body.append([label, name, v, ratios[name]])
                rows += [row(f"{label}/{name}", "images_per_s", v, "img/s"),
                         row(f"{label}/{name}", "ratio_to_consumption", ratios[name], "x")]
            body.append([label, CONSUME, consume, 1.0])
            rows.append(row(f"{label}/consumption", "images_per_s", consume, "img/s"))
    result = {"source": described, "hardware": hardware.describe(), "cases": cases}
    typer.echo(f"pipeline over {described}; consumption on {hardware.describe()}")
    typer.echo(format_table(["model", "stage", "img/s (median)", "x consumption (paired)"], body))
    path = save_result("pipeline", params, result, rows, out)
    typer.echo(f"saved {path}")
    return result


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# 3. aggregation: our server path vs a numpy sum over the same bytes
# --------------------------------------------------------------------------------------------

def array_view(array):
    """Zero-copy numpy view of a Flower Array (now `leukfed.common.flower.wire.array_view`, which the server uses)."""
    from leukfed.common.flower.wire import array_view as view

    return view(array)


def make_replies(state: dict, updates: int, transfer_dtype: str = "float32", base_examples: int = 100):
    """`updates` reply Messages as sites send them (arrays + metrics), each a scaled copy of `state`."""
    import torch
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from leukfed.common.flower.wire import encode_state

    replies = []
    for i in range(updates):
        scale = 1.0 + 0.01 * (i + 1)
        update = {k: (v * scale if v.is_floating_point() else v.clone()) for k, v in state.items()}
        content = RecordDict({"arrays": encode_state(update, transfer_dtype),
                              "metrics": MetricRecord({"num-examples": base_examples + i, "train_loss": 0.5})})
        metadata = Metadata(run_id=1, message_id=f"m{i}", src_node_id=1000 + i, dst_node_id=0,
                            reply_to_message_id=f"q{i}", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        replies.append(Message(content, metadata=metadata))
        del update
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return replies


@bench_app.command("aggregation")
def aggregation_cmd(
    model: str = typer.Option("resnet50", help="Model whose state-dict shapes the updates have."),
    num_classes: int = typer.Option(1000, help="Head size (1000: resnet50's 25.6M parameters)."),
    updates: int = typer.Option(10, help="Number of site updates aggregated."),
    transfer_dtype: str = typer.Option("float32", help="Dtype the updates travel in: float32, float16, bfloat16."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved)."),
    materialised: bool = typer.Option(False, "--materialised/--no-materialised",
                                      help="Also time the guard's materialised path (what FedMedian, "
                                           "FedTrimmedAvg, Krum, FedAdam and FedYogi use; slow)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON result and perf.jsonl."),
) -> dict:
    """Aggregate N updates: Flower's aggregate_arrayrecords and our ReplyGuard+FedAvg vs a numpy sum."""
    import numpy as np
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from leukfed.common.flower.wire import encode_state, widen
    from leukfed.common.fedconfig import FedConfig
    from leukfed.models import create_model
    from leukfed.server.strategies import FusedMean, RoundLog, make_strategy

    params = dict(model=model, num_classes=num_classes, updates=updates, transfer_dtype=transfer_dtype,
                  repeats=repeats, materialised=materialised)
    state = create_model(model, num_classes, pretrained=False).state_dict()
    global_record = encode_state(state, "float32")
    reference = {k: v.numpy() for k, v in global_record.items()}
    replies = make_replies(state, updates, transfer_dtype)
    contents = [m.content for m in replies]
    float_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    update_bytes = sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    del state

    # The memory-bandwidth reference: the same float32 bytes as one array per update, summed in place.
    flats = [np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in
                             (array_view(a) for k, a in m.content["arrays"].items()
                              if reference[k.split("::")[0]].dtype.kind == "f")]) for m in replies]
    if transfer_dtype != "float32":
        flats = [f.astype(np.float32) for f in flats]
    acc = np.empty_like(flats[0])

    def numpy_sum() -> float:
        acc.fill(0.0)
        t0 = time.perf_counter()
        for x in flats:
            np.add(acc, x, out=acc)
        return time.perf_counter() - t0

    # Every case keeps its previous result alive until the next one exists, as Flower's round loop does
    # (`arrays = agg_arrays` after aggregate_train): the allocator then reuses the memory of the result
    # before last instead of page-faulting a fresh 100 MB each time (see the breakdown).
    held: dict[str, object] = {}

    def flower() -> float:
        def run():
            if transfer_dtype == "float32":
                held["flower"] = aggregate_arrayrecords(contents, "num-examples")
            else:  # half precision: Flower would sum in float16; widen first, as the guard does (timed)
                held["flower"] = aggregate_arrayrecords([_widened_content(c, widen) for c in contents], "num-examples")
        return _timed(run)

    def guarded(fused: bool, compiled: bool | None = None) -> Callable[[], float]:
        strategy = make_strategy(FedConfig(strategy="fedavg", min_sites=updates))
        strategy.fused_mean = fused
        strategy._fused = FusedMean(compiled=compiled)

        def run() -> float:
            fresh = [_copy_reply(m) for m in replies]   # the materialised path replaces content["arrays"]
            strategy.log = RoundLog(started=time.perf_counter())
            strategy.reference = reference
            t0 = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, fresh)
            elapsed = time.perf_counter() - t0
            assert arrays is not None and not strategy.log.rejected, strategy.log.rejected
            held[f"guard {fused}"] = arrays
            return elapsed
        return run

    ours = "reply_guard_fedavg (ours)"
    cases = {"numpy_sum_reference": numpy_sum, "flower_aggregate_arrayrecords": flower, ours: guarded(True)}
    if FusedMean().step is not None:   # the production path is numba's loop: also time the one without it
        cases["reply_guard_fedavg without numba (numpy/torch loop)"] = guarded(True, compiled=False)
    if materialised:
        cases["reply_guard materialised path (before; robust strategies)"] = guarded(False)
    times = interleaved(cases, repeats, warmup=1)
    med = {k: median(v) for k, v in times.items()}
    ratios = {k: paired_ratio(times, "numpy_sum_reference", k) for k in times}

    breakdown = _fused_breakdown(replies, reference)
    strategy = make_strategy(FedConfig(strategy="fedavg", min_sites=updates))
    strategy.log, strategy.reference = RoundLog(started=time.perf_counter()), reference
    ours_result, _ = strategy.aggregate_train(1, [_copy_reply(m) for m in replies])
    check = _max_abs_difference(ours_result,
                                aggregate_arrayrecords([_widened_content(c, widen) for c in contents], "num-examples"))
    gb = updates * update_bytes / 1e9
    result = {"model": model, "num_classes": num_classes, "float_params": float_params, "updates": updates,
              "transfer_dtype": transfer_dtype, "float32_bytes_per_update": update_bytes,
              "keys_per_update": len(reference), "seconds": times, "median_seconds": med,
              "ratio_reference_to_case": ratios,
              "effective_gb_per_s": {k: gb / v for k, v in med.items()},
              "ours_breakdown_seconds_for_all_updates": breakdown,
              "ours_vs_flower_max_abs_difference": check}
    body = [[k, med[k], ratios[k], gb / med[k]] for k in cases]
    typer.echo(f"aggregating {updates} x {model} ({float_params / 1e6:.1f}M float params, {transfer_dtype} transfer)")
    typer.echo(format_table(["case", "median s", "ref/ours (paired)", "GB/s (f32 bytes)"], body))
    typer.echo(format_table(["ours, step by step (all updates, best of 3 rounds)", "s"], list(breakdown.items())))
    typer.echo(f"ours vs Flower result: max |difference| {check:.3g}")
    rows = [row(k, "seconds", med[k], "s") for k in cases] + [row(k, "ratio_reference_to_case", ratios[k], "x") for k in cases]
    path = save_result("aggregation", params, result, rows, out)
    typer.echo(f"saved {path}")
    return result


def _fused_breakdown(replies: list, reference: dict) -> dict[str, float]:
    """Where the production path's time goes: the steps of ReplyGuard._aggregate_train_fused, each the
    best of 3 rounds (so that the shared machine's noise does not dominate a single step)."""
    import numpy as np
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from leukfed.server.strategies import FusedMean, _Update, _reply_weight

    def best(fn: Callable[[], object], n: int = 3) -> float:
        return min(_timed(fn) for _ in range(n))

    fused = FusedMean()
    steps: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], object]):
        t0 = time.perf_counter()
        value = fn()
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return value

    def read() -> list:
        updates = []
        for m in replies:
            update = _Update(m, m.metadata.src_node_id, _reply_weight(m, "num-examples"))
            assert fused.read(update, m.content["arrays"]) is None
            updates.append(update)
        return updates

    held = None
    for _ in range(4):   # the steps of one aggregation, in order; the first round builds the layout
        step("bytes_received (ArrayRecord.count_bytes)", lambda: [m.content["arrays"].count_bytes() for m in replies])
        step("global model's chunks + fresh result buffers (prepare)", lambda: fused.prepare(reference))
        updates = step("header checks + zero-copy views", read)
        step("one pass: norms, NaN/Inf, weighted sum", lambda ups=updates: fused.first_pass(ups))
        held = step("result ArrayRecord (BytesIO hand-over, no copy)", lambda ups=updates: fused.result(ups))
    del held
    return {
        **{name: min(times[1:]) for name, times in steps.items()},
        "FedAvg metric aggregation": best(lambda: aggregate_metricrecords([m.content for m in replies], "num-examples")),
        "for scale: numpy copy of the global model": best(
            lambda: [np.array(v, copy=True) for v in reference.values()]),
        "for scale: ArrayRecord(Array(ndarray)) of the model": best(
            lambda: ArrayRecord({k: _array(v) for k, v in reference.items()})),
    }


def _array(value):
    from flwr.app import Array
    return Array(value)


def _copy_reply(msg):
    from flwr.app import Message, RecordDict

    content = RecordDict({"arrays": msg.content["arrays"], "metrics": msg.content["metrics"]})
    return Message(content, metadata=msg.metadata)


def _widened_content(content, widen):
    from flwr.app import RecordDict
    return RecordDict({"arrays": widen(content["arrays"]), "metrics": content["metrics"]})


def _max_abs_difference(a, b) -> float:
    import numpy as np

    worst = 0.0
    for key in b.keys():
        x, y = a[key].numpy().astype(np.float64), b[key].numpy().astype(np.float64)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


# --------------------------------------------------------------------------------------------
# 4. transfer-bytes: encoded update size vs the model's float32 size
# --------------------------------------------------------------------------------------------

@bench_app.command("transfer-bytes")
def transfer_bytes_cmd(
    models: str = typer.Option("resnet18,dscnet", "--models", help="Comma list of model names."),
    num_classes: int = typer.Option(4, help="Classes of the head."),
    dtypes: str = typer.Option("float32,float16,bfloat16", help="Transfer dtypes."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON result and perf.jsonl."),
) -> dict:
    """Bytes of an encoded update (client/records.encode_state) vs the model's float32 size, and on the
    wire: packed into one Array (pack_record), with the Flower objects each message hop moves."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from leukfed.common.flower.wire import decode_state, encode_state, pack_record
    from leukfed.models import create_model

    params = dict(models=models, num_classes=num_classes, dtypes=dtypes)
    cases, rows, body = [], [], []
    for name in parse_csv_list(models):
        state = create_model(name, num_classes, pretrained=False).state_dict()
        float32_bytes = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())
        raw_floats = sum(v.numel() for v in state.values() if v.is_floating_point())
        for dtype in parse_csv_list(dtypes):
            t0 = time.perf_counter()
            record = encode_state(state, dtype)
            encode_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            decode_state(record)
            decode_s = time.perf_counter() - t0
            encoded = record.count_bytes()
            payload = sum(len(a.data) for a in record.values())
            ratio = encoded / float32_bytes
            t0 = time.perf_counter()
            packed = pack_record(record)
            pack_s = time.perf_counter() - t0
            wire = packed.count_bytes()
            # Counted on a trained-like state: a fresh model's zero/one BatchNorm buffers coincide and
            # Flower sends identical objects once, which would flatter the unpacked count.
            trained = encode_state(_perturbed(state), dtype)
            objects = {"unpacked": len(get_all_nested_objects(trained)),
                       "packed": len(get_all_nested_objects(pack_record(trained)))}
            cases.append({"model": name, "transfer_dtype": dtype, "keys": len(record), "float_params": raw_floats,
                          "model_float32_bytes": float32_bytes, "encoded_bytes": encoded,
                          "array_bytes_without_keys": payload, "ratio_to_float32": ratio,
                          "overhead_bytes_per_key": (encoded - _ideal_bytes(state, dtype)) / len(record),
                          "wire_bytes": wire, "wire_ratio_to_float32": wire / float32_bytes,
                          "flower_objects_unpacked": objects["unpacked"], "flower_objects_packed": objects["packed"],
                          "encode_seconds": encode_s, "decode_seconds": decode_s, "pack_seconds": pack_s})
            body.append([name, dtype, len(record), float32_bytes / 1e6, encoded / 1e6, ratio, wire / float32_bytes,
                         f"{objects['unpacked']} -> {objects['packed']}"])
            rows.append(row(f"{name}/{dtype}", "ratio_to_float32", ratio, "x"))
            rows.append(row(f"{name}/{dtype}", "encoded_bytes", encoded, "B"))
            rows.append(row(f"{name}/{dtype}", "wire_ratio_to_float32", wire / float32_bytes, "x"))
            rows.append(row(f"{name}/{dtype}", "flower_objects_packed", objects["packed"], "objects"))
    result = {"cases": cases}
    typer.echo(format_table(["model", "dtype", "keys", "float32 MB", "encoded MB", "ratio", "wire ratio",
                             "Flower objects (trained)"], body))
    path = save_result("transfer-bytes", params, result, rows, out)
    typer.echo(f"saved {path}")
    return result


def _perturbed(state: dict) -> dict:
    """The state with every float tensor moved a little and every counter stepped (seeded): distinct
    arrays, as after training."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1
            for k, v in state.items()}


def _ideal_bytes(state: dict, dtype: str) -> int:
    width = 4 if dtype == "float32" else 2
    return sum(v.numel() * (width if v.is_floating_point() else v.element_size()) for v in state.values())


# --------------------------------------------------------------------------------------------
# 5. simulation-scale: many virtual sites on Flower's simulation engine
# --------------------------------------------------------------------------------------------

def _proc_table() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (children, grandchildren, ...)."""
    parents = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


class TreeMemorySampler:
    """Samples the RSS (and PSS) sum of a process tree every `interval` s in a background thread."""

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.samples: list[dict] = []     # {"t": time.time(), "rss": bytes, "pss": bytes, "procs": n}
        self.peak_processes: list[str] = []
        self.max_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def sample(self) -> dict:
        pids = process_tree(self.root)
        rss = sum(_status_kb(p, "VmRSS") for p in pids) * 1024
        pss = sum(_pss_kb(p) for p in pids) * 1024
        threads = sum(_status_kb(p, "Threads") for p in pids)
        entry = {"t": time.time(), "rss": rss, "pss": pss, "procs": len(pids), "threads": threads}
        if not self.samples or rss > max(s["rss"] for s in self.samples):
            self.peak_processes = [f"{p} {_comm(p)}" for p in pids]
        self.max_threads = max(self.max_threads, threads)
        self.samples.append(entry)
        return entry

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_rss(self) -> int:
        return max((s["rss"] for s in self.samples), default=0)

    @property
    def peak_pss(self) -> int:
        return max((s["pss"] for s in self.samples), default=0)

    def at(self, when: float) -> dict | None:
        """The first sample taken at or after `when` (the memory just after that moment)."""
        later = [s for s in self.samples if s["t"] >= when]
        return later[0] if later else (self.samples[-1] if self.samples else None)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope dy/dx (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def summarize_rounds(history: list[dict], sampler: TreeMemorySampler | None) -> dict:
    """Per round: timings from history.json and the process-tree memory just after the round ended."""
    rounds = []
    for entry in history:
        sites = entry.get("sites", {}).values()
        train = [s.get("train", {}) for s in sites]
        mem = sampler.at(entry["time"]) if sampler and "time" in entry else None
        rounds.append({
            "round": entry["round"],
            "round_seconds": entry.get("round_seconds"),
            "train_phase_seconds": entry.get("train_phase_seconds"),
            "aggregation_seconds": entry.get("aggregation_seconds"),
            "evaluate_phase_seconds": entry.get("evaluate_phase_seconds"),
            "server_evaluate_seconds": entry.get("server_evaluate_seconds"),
            "sites_replied": entry.get("sites_replied"),
            "sum_site_train_seconds": sum(t.get("train_seconds", 0.0) for t in train),
            "sum_site_load_seconds": sum(t.get("load_seconds", 0.0) for t in train),
            "sum_site_client_seconds": sum(t.get("client_seconds", 0.0) for t in train),
            "rss_after_round_mb": mem["rss"] / 2**20 if mem else None,
            "pss_after_round_mb": mem["pss"] / 2**20 if mem else None,
        })
    xs = [r["round"] for r in rounds if r["rss_after_round_mb"] is not None]
    rss = [r["rss_after_round_mb"] for r in rounds if r["rss_after_round_mb"] is not None]
    pss = [r["pss_after_round_mb"] for r in rounds if r["pss_after_round_mb"] is not None]
    return {"rounds": rounds,
            "median_round_seconds": median(r["round_seconds"] for r in rounds if r["round_seconds"] is not None),
            "rss_slope_mb_per_round": slope(xs, rss),
            "rss_slope_mb_per_round_after_first": slope(xs[1:], rss[1:]),
            "pss_slope_mb_per_round": slope(xs, pss),
            "pss_slope_mb_per_round_after_first": slope(xs[1:], pss[1:])}


@bench_app.command("simulation-scale")
def simulation_scale_cmd(
    sites: int = typer.Option(50, help="Virtual sites."),
    model: str = typer.Option("smallcnn", help="Model."),
    rounds: int = typer.Option(4, help="Federated rounds."),
    image_size: int = typer.Option(32, help="Input size in px (tiny keeps it to minutes on 2 cores)."),
    per_class: int = typer.Option(1250, help="Generated images per class (4 classes); every site needs >= 5 "
                                  "validation images, else its metrics are suppressed and Flower refuses the "
                                  "round (see PERFORMANCE.md)."),
    batch_size: int = typer.Option(16, help="Local batch size."),
    cpus_per_site: float = typer.Option(1.0, help="CPUs per simulated site (Ray)."),
    interval: float = typer.Option(0.5, help="Seconds between memory samples of the process tree."),
    work: Optional[Path] = typer.Option(None, "--work", help="Keep the simulation folder here (default: a temp folder, deleted)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON result and perf.jsonl."),
) -> dict:
    """Time per round and whole-process-tree memory (incl. Ray workers) for many virtual sites."""
    from leukfed.server.state import read_history
    from leukfed.simulations.simulate import SimulateConfig, simulate

    params = dict(sites=sites, model=model, rounds=rounds, image_size=image_size, per_class=per_class,
                  batch_size=batch_size, cpus_per_site=cpus_per_site, interval=interval,
                  work=str(work) if work else None)
    scratch = None
    if work is None:
        scratch = tempfile.TemporaryDirectory(prefix="leuk-bench-sim-")
        work = Path(scratch.name)
    lines: list[str] = []
    try:
        cfg = SimulateConfig(out=str(work), sites=sites, model=model, rounds=rounds, image_size=image_size,
                             batch_size=batch_size, baselines=False, augment="flip", pretrained="none",
                             synthetic_per_class=per_class, cpus_per_site=cpus_per_site)
        started = time.perf_counter()
        with TreeMemorySampler(interval=interval) as sampler:
            simulate(cfg, log=lambda line: (lines.append(line), typer.echo(line, err=True)))
        wall = time.perf_counter() - started
        history = read_history(work / "federated-fedavg")
        summary = summarize_rounds(history, sampler)
    finally:
        if scratch is not None:
            scratch.cleanup()
    result = {"sites": sites, "model": model, "rounds": rounds, "image_size": image_size,
              "images": per_class * 4, "wall_seconds": wall, "peak_rss_mb": sampler.peak_rss / 2**20,
              "peak_pss_mb": sampler.peak_pss / 2**20, "max_processes": max(s["procs"] for s in sampler.samples),
              "max_threads": sampler.max_threads, "samples": len(sampler.samples),
              "processes_at_peak": sampler.peak_processes,
              "memory_timeline": [{"t": round(s["t"] - sampler.samples[0]["t"], 2), "rss_mb": round(s["rss"] / 2**20, 1),
                                   "pss_mb": round(s["pss"] / 2**20, 1), "procs": s["procs"]} for s in sampler.samples],
              **summary}
    body = [[r["round"], r["round_seconds"], r["train_phase_seconds"], r["aggregation_seconds"],
             r["evaluate_phase_seconds"], r["sum_site_load_seconds"], r["rss_after_round_mb"], r["pss_after_round_mb"]]
            for r in summary["rounds"]]
    typer.echo(f"{sites} sites x {model} @{image_size}px, {rounds} rounds: wall {wall:.0f}s, "
               f"peak RSS {result['peak_rss_mb']:.0f} MB (PSS {result['peak_pss_mb']:.0f} MB) over "
               f"{result['max_processes']} processes")
    typer.echo(format_table(["round", "round s", "train s", "aggr s", "eval s", "site load s", "RSS MB", "PSS MB"], body))
    typer.echo(f"memory slope: RSS {summary['rss_slope_mb_per_round']:+.1f} MB/round "
               f"({summary['rss_slope_mb_per_round_after_first']:+.1f} after round 1), "
               f"PSS {summary['pss_slope_mb_per_round']:+.1f} MB/round")
    rows = [row(f"{sites}sites/{model}", "median_round_seconds", summary["median_round_seconds"], "s"),
            row(f"{sites}sites/{model}", "peak_rss_mb", result["peak_rss_mb"], "MB"),
            row(f"{sites}sites/{model}", "peak_pss_mb", result["peak_pss_mb"], "MB"),
            row(f"{sites}sites/{model}", "rss_slope_mb_per_round", summary["rss_slope_mb_per_round"], "MB/round")]
    path = save_result("simulation-scale", params, result, rows, out)
    typer.echo(f"saved {path}")
    return result


# --------------------------------------------------------------------------------------------
# 6. overhead (stub) and all
# --------------------------------------------------------------------------------------------

@bench_app.command("overhead")
def overhead_cmd(
    model: str = typer.Option("resnet18", help="Model every site trains."),
    image_size: int = typer.Option(128, help="Input size in px."),
    images_per_site: int = typer.Option(256, help="Training images per site (all_taleqani under LEUK_DATA_ROOT, else generated)."),
    sites: int = typer.Option(3, help="Hospitals, each a real leuk-client on loopback."),
    rounds: int = typer.Option(3, help="Rounds (the medians use rounds 2+)."),
    evaluate_every: int = typer.Option(1, help="Sites score the global model every N rounds."),
    cold_start: bool = typer.Option(False, "--cold-start", help="A fresh ClientApp process per task (Flower's default)."),
    evaluate_separately: bool = typer.Option(False, "--evaluate-separately",
                                             help="Site evaluation in a message of its own (Flower's default)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON results and perf.jsonl."),
) -> None:
    """Federation overhead on loopback with TLS: (round - slowest site's training - server evaluation) / round."""
    from leukfed.simulations.overhead import measure

    params = dict(model=model, image_size=image_size, images_per_site=images_per_site, sites=sites, rounds=rounds,
                  evaluate_every=evaluate_every, cold_start=cold_start, evaluate_separately=evaluate_separately)
    result = measure(**params)
    case = f"{model}@{image_size}px x{sites} sites ({'cold' if cold_start else 'forked'})"
    rows = [row(case, "median_round_seconds", result["median_round_seconds"], "s"),
            row(case, "median_overhead_share", result["median_overhead_share"], "fraction"),
            row(case, "median_overhead_share_without_site_evaluation",
                result["median_overhead_share_without_site_evaluation"], "fraction")]
    path = save_result("overhead", params, result, rows, out)
    typer.echo(format_table(["round", "round s", "slowest train s", "client start+load s", "transfer+scheduling s", "aggregation s",
           "scoring in train s", "evaluation phase s", "overhead share"],
          [[r["round"], r["round_seconds"], r["slowest_site_train_seconds"], r["client_startup_and_load_seconds"],
            r["transfer_and_scheduling_seconds"], r["aggregation_seconds"], r["slowest_site_scoring_in_train_seconds"],
            r["evaluate_phase_seconds"], r["overhead_share"]] for r in result["rounds"]]))
    typer.echo(f"median overhead (rounds 2+): {100 * result['median_overhead_share']:.1f}% of the round "
               f"({100 * result['median_overhead_share_without_site_evaluation']:.1f}% without the sites' "
               f"evaluation phase); saved {path}")


@bench_app.command("all")
def all_cmd(
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for the JSON results and perf.jsonl."),
    simulation: bool = typer.Option(True, "--simulation/--no-simulation", help="Include simulation-scale (minutes)."),
) -> None:
    """Every measurement at its default setting (`--no-simulation` skips the slow simulation-scale and overhead)."""
    defaults = {
        "trainer": lambda: trainer_cmd(models=TRAINER_MODELS, repeats=3, warmup=1,
                                       device="auto", threads=0, num_classes=4, seed=0, out=out),
        "pipeline": lambda: pipeline_cmd(models=PIPELINE_MODELS, images=256, workers="0,1,2",
                                         decode_threads="1,2,4", augment="paper002", source="auto",
                                         data_root=os.environ.get("LEUK_DATA_ROOT", ""), repeats=3,
                                         consume_steps=3, device="auto", threads=0, out=out),
        "aggregation": lambda: aggregation_cmd(model="resnet50", num_classes=1000, updates=10,
                                               transfer_dtype="float32", repeats=3, materialised=False, out=out),
        "transfer-bytes": lambda: transfer_bytes_cmd(models="resnet18,dscnet", num_classes=4,
                                                     dtypes="float32,float16,bfloat16", out=out),
    }
    if simulation:
        defaults["simulation-scale"] = lambda: simulation_scale_cmd(
            sites=50, model="smallcnn", rounds=4, image_size=32, per_class=1250, batch_size=16,
            cpus_per_site=1.0, interval=0.5, work=None, out=out)
        defaults["overhead"] = lambda: overhead_cmd(model="resnet18", image_size=128, images_per_site=256, sites=3,
                                                    rounds=3, evaluate_every=1, cold_start=False,
                                                    evaluate_separately=False, out=out)
    for name, run in defaults.items():
        typer.echo(f"== {name}")
        run()


if __name__ == "__main__":  # `python -m leukfed.simulations.bench ...` before `leuk bench` is mounted
    from leukfed.common.cli_support import run_app

    run_app(bench_app)()
