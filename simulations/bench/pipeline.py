"""`leuk bench pipeline`: decode and augmentation images/s next to what the model trains on per second."""
from __future__ import annotations

import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import typer

from leukfed.common.cli_support import parse_csv_list
from leukfed.common.errors import LeukError
from leukfed.simulations.bench.measure import (ModelSpec, format_table, interleaved, median, out_option, report,
                                               row, set_threads, sync, timed)
from leukfed.simulations.bench.trainer import per_item_loader

PIPELINE_MODELS = "resnet18:128:32,tinycnn:32:32"
CONSUME = "model consumption (plain training loop)"


def pipeline_source(source: str, data_root: str | None, images: int, scratch: Path):
    """(root, samples, description): real JPEGs from <data_root>/all_taleqani, else generated ones."""
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
        sync(hardware.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with hardware.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(hardware.device)
        return time.perf_counter() - t0
    return run, spec.batch * steps


def epoch_timer(loader, n: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        count = 0
        for images, _ in loader:
            count += len(images)
        assert count == n, (count, n)
        return time.perf_counter() - t0
    return run


def augment_timers(decoded, labels, data_config, augments: list[str], worker_counts: list[int], batch: int,
                   n: int) -> tuple[dict[str, Callable[[], float]], list]:
    """Per augmentation: the per-item DataLoader with each worker count, and our make_loader; the loaders
    come back too (the caller drops them after timing, which stops their workers)."""
    from leukfed.common.dataset import SmearDataset, make_loader

    loaders, timers = [], {}
    for aug in augments:
        dataset = SmearDataset(decoded, labels, data_config, train=True, augment=aug)
        for w in worker_counts:
            loaders.append(per_item_loader(dataset, batch, shuffle=True, num_workers=w))
            timers[f"per-item __getitem__ {aug} DataLoader workers={w}"] = epoch_timer(loaders[-1], n)
        loaders.append(make_loader(dataset, batch, shuffle=True))   # in-process: the name keeps workers=0
        timers[f"make_loader (ours) {aug} workers=0"] = epoch_timer(loaders[-1], n)
    return timers, loaders


def pipeline_case(spec: ModelSpec, root: Path, samples: list, labels: list[int], num_classes: int, hardware,
                  params: dict) -> dict:
    """One model's input size: decode, augmentation and consumption interleaved; images/s and ratios."""
    from leukfed.common.dataset import decode_images
    from leukfed.models import resolve_data_config

    n = len(samples)
    data_config = resolve_data_config(spec.name, spec.image_size or None)
    decode_cases = {f"decode threads={t}": (lambda t=t: timed(lambda: decode_images(root, samples, data_config,
                                                                                     workers=t)))
                    for t in params["thread_counts"]}
    decoded, _ = decode_images(root, samples, data_config)
    augment_cases, loaders = augment_timers(decoded, labels, data_config, params["augments"],
                                            params["worker_counts"], spec.batch, n)
    consume_run, consumed = consumption_timer(spec, hardware, num_classes, params["consume_steps"])
    times = interleaved({**decode_cases, **augment_cases, CONSUME: consume_run}, params["repeats"], 1)
    augment_cases.clear()
    loaders.clear()
    gc.collect()  # the DataLoaders' persistent workers exit with their iterators
    consume_times = times.pop(CONSUME)
    consume = consumed / median(consume_times)
    ips = {name: n / median(t) for name, t in times.items()}
    # pipeline/consumption throughput, paired per repeat (both ran back to back)
    ratios = {name: median((n / a) / (consumed / c) for a, c in zip(t, consume_times)) for name, t in times.items()}
    # In-process (workers=0): every image is augmented, then trained on, by the same cores.
    serial = {name: 1.0 / (1.0 / v + 1.0 / consume) for name, v in ips.items() if "workers=0" in name}
    return {"model": spec.name, "image_size": data_config.input_size[1], "batch": spec.batch,
            "images": n, "seconds": times, "images_per_s": ips,
            "consumption_images_per_s": consume, "consumption_seconds": consume_times,
            "consumption_images_per_run": consumed, "ratio_pipeline_to_consumption": ratios,
            "serial_workers0_images_per_s": serial}


def pipeline_cmd(
    models: str = typer.Option(PIPELINE_MODELS, "--models",
                               help="Comma list of name:image_size:batch (the input size decides the resize)."),
    images: int = typer.Option(256, help="Images to decode and augment per timed run."),
    workers: str = typer.Option("0,1,2", help="DataLoader worker counts to measure."),
    decode_threads: str = typer.Option("1,2,4", help="decode_images thread counts to measure."),
    augment: str = typer.Option("paper002", help="Augmentation(s) to measure, comma list."),
    source: str = typer.Option("auto", help="auto (real when $LEUK_DATA_ROOT is set), real or synthetic."),
    data_root: str = typer.Option("", "--data-root", envvar="LEUK_DATA_ROOT", show_envvar=False,
                                  help="Folder holding all_taleqani/ (default $LEUK_DATA_ROOT)."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved)."),
    consume_steps: int = typer.Option(3, help="Training steps per timed run of the consumption reference."),
    device: str = typer.Option("auto", help="Device of the consumption reference."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
    out: Path = out_option(),
) -> dict:
    """Decode-once and per-item augmentation images/s with 0/1/2 workers vs the model's consumption."""
    from leukfed.common.train import select_hardware

    if source not in ("auto", "real", "synthetic"):
        raise LeukError("--source must be auto, real or synthetic")
    set_threads(threads)
    params = dict(models=models, images=images, workers=workers, decode_threads=decode_threads, augment=augment,
                  source=source, data_root=data_root, repeats=repeats, consume_steps=consume_steps,
                  device=device, threads=threads)
    hardware = select_hardware(device)
    settings = dict(worker_counts=[int(w) for w in parse_csv_list(workers)], augments=parse_csv_list(augment),
                    thread_counts=[int(t) for t in parse_csv_list(decode_threads)], repeats=repeats,
                    consume_steps=consume_steps)
    cases, rows, body = [], [], []
    with tempfile.TemporaryDirectory(prefix="leuk-bench-") as scratch:
        root, samples, described = pipeline_source(source, data_root or None, images, Path(scratch))
        index = {name: i for i, name in enumerate(sorted({s.label for s in samples}))}
        labels = [index[s.label] for s in samples]
        for spec in (ModelSpec.parse(m) for m in parse_csv_list(models)):
            case = pipeline_case(spec, root, samples, labels, len(index) or 1, hardware, settings)
            cases.append(case)
            label = f"{spec.name}@{case['image_size']}px/b{spec.batch}"
            for name, v in case["images_per_s"].items():
                ratio = case["ratio_pipeline_to_consumption"][name]
                body.append([label, name, v, ratio])
                rows += [row(f"{label}/{name}", "images_per_s", v, "img/s"),
                         row(f"{label}/{name}", "ratio_to_consumption", ratio, "x")]
            body.append([label, CONSUME, case["consumption_images_per_s"], 1.0])
            rows.append(row(f"{label}/consumption", "images_per_s", case["consumption_images_per_s"], "img/s"))
    result = {"source": described, "hardware": hardware.describe(), "cases": cases}
    typer.echo(f"pipeline over {described}; consumption on {hardware.describe()}")
    typer.echo(format_table(["model", "stage", "img/s (median)", "x consumption (paired)"], body))
    return report("pipeline", params, result, rows, out)
