"""Why DSCNet's validation accuracy swings from epoch to epoch: BatchNorm statistics vs learning rate.

Each variant trains DSCNet with the product's training core (`leukfed.common.train`) on a fixed
subsample of `all_taleqani` and, after every epoch, scores the same validation images three ways:
- eval:        the model as `leuk train` scores it (BatchNorm running statistics);
- train_bn:    BatchNorm with the statistics of each (shuffled, mixed-class) validation batch;
- recal_bn:    running statistics recomputed over the clean training images with the epoch's weights;
- recal_aug_bn: the same over augmented training images (what training itself normalises with).
If recal_bn stays high where eval swings, the swings come from the running statistics, not the
weights; recal_aug_bn separates "stale (momentum)" from "augmented vs clean images".

Appends long-format rows (variant, seed, epoch, metric, value) to results/dscnet_stability.csv and
resumes: finished (variant, seed) pairs are skipped, an unfinished one is rerun.

    LEUK_DATA_ROOT=/work/shared/datasets python benchmarks/dscnet_stability.py --variants bn-lr1e-3 gn-lr1e-3
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leukfed.common.cli_support import run_guarded
from leukfed.common.data import scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.splits import make_split
from leukfed.common.train import (evaluate, make_loss, make_optimizer, prepare_model, recalibrate_batchnorm,
                                  seed_everything, select_hardware, train_epoch)
from leukfed.models.dscnet import DSCNet
from leukfed.models.registry import resolve_data_config
from leukfed.simulations.bench.measure import append_csv

RESULTS = Path(__file__).parent / "results" / "dscnet_stability.csv"
FIELDS = ("variant", "seed", "epoch", "metric", "value", "train_images", "val_images", "image_size",
          "wall_s", "finished", "command")


@dataclass(frozen=True)
class Variant:
    norm: str = "batch"
    lr: float = 1e-3
    schedule: str = "constant"   # constant | warmup-cosine (1 epoch linear warm-up, cosine to 0)
    bn_momentum: float = 0.1
    recalibrate: int = 0         # the product's --bn-recalibration N after every epoch


VARIANTS = {
    "bn-lr1e-3": Variant(),
    "bn-lr3e-4": Variant(lr=3e-4),
    "bn-lr1e-3-warmcos": Variant(schedule="warmup-cosine"),
    "bn-lr1e-3-mom0.01": Variant(bn_momentum=0.01),
    "bn-lr1e-3-mom0.5": Variant(bn_momentum=0.5),
    "bn-lr1e-3-recal50": Variant(recalibrate=50),
    "gn-lr1e-3": Variant(norm="group"),
    "gn-lr3e-4": Variant(norm="group", lr=3e-4),
}


def subsample(paths: list[str], labels: list[int], n: int, seed: int) -> list[str]:
    """A fixed class-stratified subsample of n paths (all of them when n >= len)."""
    if n >= len(paths):
        return list(paths)
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        keep += list(rng.choice(idx, size=round(n * len(idx) / len(paths)), replace=False))
    return [paths[i] for i in sorted(keep)]


@torch.no_grad()
def accuracy_with_batch_stats(model: nn.Module, loader, hardware) -> float:
    """Validation accuracy with BatchNorm normalising by each batch's own statistics (dropout off)."""
    probe = copy.deepcopy(model).eval()
    for m in probe.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    correct = seen = 0
    for images, target in loader:
        logits = probe(images.to(hardware.device))
        correct += int((logits.argmax(1).cpu() == target).sum())
        seen += len(target)
    return correct / seen


def recalibrated_model(model: nn.Module, loader, hardware) -> nn.Module:
    """A copy whose BatchNorm running statistics are the exact average over the loader's images."""
    probe = copy.deepcopy(model)
    recalibrate_batchnorm(probe, loader, hardware, max_batches=len(loader))
    return probe.eval()


def lr_factor(schedule: str, step: int, steps_per_epoch: int, total: int) -> float:
    if schedule == "constant":
        return 1.0
    warm = steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))


def done_runs(path: Path, epochs: int) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {(r["variant"], int(r["seed"])) for r in rows if r["metric"] == "val_acc_eval" and int(r["epoch"]) == epochs}


def drop_rows(path: Path, variant: str, seed: int) -> None:
    """Remove the rows of an unfinished run before it is rerun (written atomically)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if not (r["variant"] == variant and int(r["seed"]) == seed)]
    if len(kept) == len(rows):
        return  # nothing to drop: leave the file to other processes appending to it
    rows = kept
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run(name: str, seed: int, args, manifest, split, command: str) -> None:
    variant = VARIANTS[name]
    seed_everything(seed)
    hardware = select_hardware("cpu")
    data_config = resolve_data_config("dscnet", args.image_size)
    label_of = {s.path: s.label for s in manifest.samples}
    train_paths = subsample(list(split.train), [label_of[p] for p in split.train], args.train_images, 0)
    val_paths = subsample(list(split.val), [label_of[p] for p in split.val], args.val_images, 0)
    train_set = build_dataset(manifest, train_paths, data_config, train=True, augment="paper002")
    stats_set = build_dataset(manifest, train_paths, data_config, train=False)
    val_set = build_dataset(manifest, val_paths, data_config, train=False)
    train_loader = make_loader(train_set, args.batch_size, shuffle=True, seed=seed)
    stats_loader = make_loader(stats_set, 64, shuffle=False)
    val_loader = make_loader(val_set, 64, shuffle=False)
    # Unshuffled batches hold one class each (paths sort by class): batch statistics need mixed batches.
    mixed_val_loader = make_loader(val_set, 64, shuffle=True, seed=0)
    augmented_loader = make_loader(train_set, 64, shuffle=True, seed=seed + 1)

    model = DSCNet(len(manifest.class_names), norm=variant.norm)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = variant.bn_momentum
    model = prepare_model(model, hardware)
    loss_fn = make_loss("kl", len(manifest.class_names))
    optimizer = make_optimizer(model, "adam", variant.lr)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(variant.schedule, s, steps, steps * args.epochs))
    step_scheduler = (lambda _n: scheduler.step()) if variant.schedule != "constant" else None
    drop_rows(RESULTS, name, seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        stats = train_epoch(model, train_loader, optimizer, loss_fn, hardware, on_step=step_scheduler)
        recalibrate_batchnorm(model, train_loader, hardware, variant.recalibrate)
        val = evaluate(model, val_loader, hardware, manifest.class_names, loss_fn=loss_fn)
        metrics = {"train_loss": stats.loss, "train_acc": stats.accuracy, "val_loss_eval": val["loss"],
                   "val_acc_eval": val["accuracy"]}
        if variant.norm == "batch":
            metrics["val_acc_train_bn"] = accuracy_with_batch_stats(model, mixed_val_loader, hardware)
            for key, loader in (("val_acc_recal_bn", stats_loader), ("val_acc_recal_aug_bn", augmented_loader)):
                recal = recalibrated_model(model, loader, hardware)
                metrics[key] = evaluate(recal, val_loader, hardware, manifest.class_names)["accuracy"]
        wall = round(time.perf_counter() - start, 1)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        append_csv(RESULTS, FIELDS, [{"variant": name, "seed": seed, "epoch": epoch, "metric": k, "value": round(v, 5),
                               "train_images": len(train_set), "val_images": len(val_set),
                               "image_size": args.image_size, "wall_s": wall, "finished": stamp,
                               "command": command} for k, v in metrics.items()])
        print(f"{name} seed {seed} epoch {epoch}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
              + f" ({wall}s)", flush=True)


def table(path: Path = RESULTS, last: int = 3) -> str:
    """Markdown: per run, each validation score's min / max / final over the epochs and the std of
    the last `last` epochs."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    runs: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        series = runs.setdefault((r["variant"], int(r["seed"])), {}).setdefault(r["metric"], [])
        series.append(float(r["value"]))
    header = "| variant | seed | epochs | scored as | val acc per epoch | min | max | final | std last %d |" % last
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for (variant, seed), metrics in sorted(runs.items()):
        for metric in ("val_acc_eval", "val_acc_recal_bn", "val_acc_recal_aug_bn", "val_acc_train_bn"):
            values = metrics.get(metric)
            if not values:
                continue
            per_epoch = " ".join(f"{v:.2f}" for v in values)
            lines.append(f"| {variant} | {seed} | {len(values)} | {metric.removeprefix('val_acc_')} | {per_epoch} "
                         f"| {min(values):.3f} | {max(values):.3f} | {values[-1]:.3f} "
                         f"| {float(np.std(values[-last:])):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--val-images", type=int, default=415)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when variants run side by side)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the CSV and exit")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/dscnet_stability.py " + " ".join(sys.argv[1:])
    manifest = scan_dataset(Path(os.environ.get("LEUK_DATA_ROOT", "../shared/datasets")) / "all_taleqani")
    split = make_split(manifest, val_fraction=0.15, test_fraction=0.15, seed=0, group_by="auto")
    finished = done_runs(RESULTS, args.epochs)
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed) in finished:
                print(f"{name} seed {seed}: done, skipped")
                continue
            run(name, seed, args, manifest, split, command)


if __name__ == "__main__":
    run_guarded(main)
