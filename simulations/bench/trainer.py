"""`leuk bench trainer`: our train_epoch + make_loader vs a minimal PyTorch loop over the same data."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import typer

from leukfed.common.cli_support import parse_csv_list
from leukfed.simulations.bench.flops import gpu_peak_tflops, matmul_peak_flops, train_step_flops
from leukfed.simulations.bench.measure import (ModelSpec, format_table, interleaved, median, out_option,
                                               paired_ratio, report, row, set_threads, sync)

TRAINER_MODELS = "resnet18:128:32:3,tinycnn:32:32:20,dscnet:64:32:3"
OURS, PER_ITEM, REFERENCE = "ours", "train_epoch+per_item_DataLoader", "reference"


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


def best_per_call_us(fn: Callable[[], None], inner: int) -> float:
    """Microseconds per call of `fn`: the best of 5 runs of `inner` calls (noise mostly drops out)."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times) * 1e6


def per_step_overheads(dataset, batch: int, num_classes: int, steps: int, normalize, images,
                       reps: int = 200) -> dict[str, float]:
    """Microseconds per step of the parts where our loop differs from the plain one: the bookkeeping
    `train_epoch` does after each step (with host sync, and the on-device variant), and fetching one
    batch from our loader vs slicing + normalising it directly."""
    import torch

    from leukfed.common.dataset import make_loader

    logits = torch.randn(batch, num_classes)
    target = torch.randint(0, num_classes, (batch,))
    loss = torch.nn.functional.cross_entropy(logits, target)
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

    loader = make_loader(dataset, batch, shuffle=True, seed=0, drop_last=True)

    def loader_epoch() -> None:
        for _ in loader:
            pass
    perm = torch.randperm(len(images))

    def sliced_epoch() -> None:
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            (images[idx].float() - normalize.mean) / normalize.std
    return {"bookkeeping_train_epoch_us": best_per_call_us(synced, reps),
            "bookkeeping_on_device_us": best_per_call_us(on_device, reps),
            "loader_batch_us": best_per_call_us(loader_epoch, 3) / steps,
            "plain_slice_normalise_batch_us": best_per_call_us(sliced_epoch, 3) / steps}


def reference_timer(model, hardware, images, labels, normalize, batch: int, steps: int, generator) -> Callable[[], float]:
    """The plain loop: data already on the device, batch-wise normalisation, no per-step host sync."""
    import torch
    import torch.nn.functional as F

    device = hardware.device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dev_images, dev_labels = images.to(device), labels.to(device)
    mean, std = normalize.mean.to(device), normalize.std.to(device)

    def run() -> float:
        model.train()
        perm = torch.randperm(len(images), generator=generator).to(device)
        total = torch.zeros((), device=device)
        sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            x = (dev_images[idx].float() - mean) / std
            if hardware.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with hardware.autocast():
                loss = F.cross_entropy(model(x).float(), dev_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        sync(device)
        float(total)
        return time.perf_counter() - t0
    return run


def train_epoch_timer(model, hardware, loader, loss_fn, images: int) -> Callable[[], float]:
    """One `train_epoch` over `loader` (the production training step)."""
    import torch

    from leukfed.common.train import train_epoch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def run() -> float:
        sync(hardware.device)
        t0 = time.perf_counter()
        stats = train_epoch(model, loader, optimizer, loss_fn, hardware)
        sync(hardware.device)
        assert stats.num_examples == images
        return time.perf_counter() - t0
    return run


def trainer_case(spec: ModelSpec, hardware, num_classes: int, repeats: int, warmup: int, seed: int) -> dict:
    """One model: the reference, ours and ours over the per-item DataLoader, interleaved."""
    import torch

    from leukfed.common.dataset import SmearDataset, make_loader
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
    loss_fn = make_loss("ce", num_classes)
    normalize = Normalize(data_config)

    def dataset():
        return SmearDataset(images, labels.numpy(), data_config, train=False)

    def ours_with(loader_fn) -> Callable[[], float]:
        loader = loader_fn(dataset(), spec.batch, shuffle=True, seed=seed, drop_last=True)
        return train_epoch_timer(prepare_model(copy.deepcopy(base), hardware), hardware, loader, loss_fn, n)

    cases = {REFERENCE: reference_timer(prepare_model(copy.deepcopy(base), hardware), hardware, images, labels,
                                        normalize, spec.batch, steps, g),
             OURS: ours_with(make_loader), PER_ITEM: ours_with(per_item_loader)}
    times = interleaved(cases, repeats, warmup)
    ips = {name: n / median(t) for name, t in times.items()}
    flops_per_image = train_step_flops(base, data_config.input_size, num_classes)
    overheads = per_step_overheads(dataset(), spec.batch, num_classes, steps, normalize, images)
    step_us = median(times[REFERENCE]) / steps * 1e6
    overheads["reference_step_us"] = step_us
    overheads["our_extra_per_step_fraction"] = (
        overheads["bookkeeping_train_epoch_us"] + overheads["loader_batch_us"]
        - overheads["plain_slice_normalise_batch_us"]) / step_us
    return {
        "model": spec.name, "image_size": height, "batch": spec.batch, "steps": steps, "images_per_run": n,
        "params": sum(p.numel() for p in base.parameters()),
        "seconds": times, "images_per_s": ips,
        # throughput ratio ours/reference = time(reference)/time(ours), paired per repeat
        "ratio_to_reference": {name: paired_ratio(times, REFERENCE, name) for name in times},
        "ratio_of_medians_to_reference": {name: ips[name] / ips[REFERENCE] for name in ips},
        "ratio_ours_to_reference": paired_ratio(times, REFERENCE, OURS),
        "ratio_per_item_dataloader_to_reference": paired_ratio(times, REFERENCE, PER_ITEM),
        "train_flops_per_image": flops_per_image,
        "per_step_overheads": overheads,
        "achieved_tflops": {k: v * flops_per_image / 1e12 for k, v in ips.items()},
    }


def peak_fractions(cases: list[dict], peak_measured: float, peak_table: float | None) -> tuple[list, list]:
    """Each variant's share of the measured and datasheet peaks (added to its case): table body and rows."""
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
    return rows, body


def trainer_cmd(
    models: str = typer.Option(TRAINER_MODELS, "--models",
                               help="Comma list of name:image_size:batch[:steps] (steps: batches per timed run)."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved); medians are reported."),
    warmup: int = typer.Option(1, help="Untimed runs of every case first."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (as `leuk train`)."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
    num_classes: int = typer.Option(4, help="Classes of the head."),
    seed: int = typer.Option(0, help="Seed of the random in-memory images."),
    out: Path = out_option(),
) -> dict:
    """Images/s of our train_epoch + make_loader over an in-memory SmearDataset vs a plain PyTorch loop."""
    import torch

    from leukfed.common.train import select_hardware

    set_threads(threads)
    params = dict(models=models, repeats=repeats, warmup=warmup, device=device, threads=threads,
                  num_classes=num_classes, seed=seed)
    hardware = select_hardware(device)
    cases = [trainer_case(ModelSpec.parse(m), hardware, num_classes, repeats, warmup, seed)
             for m in parse_csv_list(models)]
    peak_measured = matmul_peak_flops(hardware.device)
    gpu_name = torch.cuda.get_device_name(hardware.device) if hardware.device.type == "cuda" else None
    peak_table = gpu_peak_tflops(gpu_name)
    rows, body = peak_fractions(cases, peak_measured, peak_table)
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
        [[f"{c['model']}@{c['image_size']}px", *(c["per_step_overheads"][k] for k in (
            "reference_step_us", "bookkeeping_train_epoch_us", "bookkeeping_on_device_us", "loader_batch_us",
            "plain_slice_normalise_batch_us", "our_extra_per_step_fraction"))] for c in cases]))
    return report("trainer", params, result, rows, out)
