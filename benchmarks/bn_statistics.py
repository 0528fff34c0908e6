"""How much of a grid model's score is its BatchNorm statistics: each saved model scored as trained and again
with its running statistics recomputed over its own training images ("precise BN").

The paper grid (benchmarks/papers.py) keeps every method's final model. Training in train mode normalises
by each batch's own statistics; scoring uses the running statistics, a momentum average over past batches
(stale when Adam moves the weights fast: DSCNet's swings, benchmarks/dscnet_stability.py) or, for FedAvg,
the sites' statistics averaged, each computed under the site's own weights and not under the averaged
ones. Here the weights stay as trained; only the statistics are recomputed over up to N augmented training
batches with those weights (torch's `swa_utils.update_bn`, `recalibrate_batchnorm`): a site alone over its
own images; centralized and a federated model over all the sites' training images (what a federation gets
by a statistics round: each site computes them under the global weights and the server averages them, as
it averages the running statistics now). Every model is scored on the split's validation images (where a
choice is made) and its test images (the grid's 415). Long-format rows in results/bn_statistics.csv;
finished (cell, seed, method) rows are not redone.

    python benchmarks/bn_statistics.py --cells resnet50-iid inception_v3-iid    # the images the cells trained on
    python benchmarks/bn_statistics.py --summary
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from papers import ALL_CELLS, DATASET  # noqa: E402

from leukfed.common.cli_support import run_guarded  # noqa: E402
from leukfed.common.data import scan_dataset  # noqa: E402
from leukfed.common.dataset import build_dataset, make_loader  # noqa: E402
from leukfed.common.runs import load_run  # noqa: E402
from leukfed.common.splits import load_split  # noqa: E402
from leukfed.common.stats import paired_t  # noqa: E402
from leukfed.common.train import evaluate, recalibrate_batchnorm, select_hardware  # noqa: E402
from leukfed.simulations.bench.measure import append_csv, utc_now  # noqa: E402

RESULTS = HERE / "results" / "bn_statistics.csv"
RUNS = HERE / "runs" / "papers"
FIELDS = ("cell", "seed", "method", "statistics", "side", "accuracy", "batches", "command", "finished")
SIDES = ("val", "test")
DEFAULT_CELLS = ("resnet50-iid", "inception_v3-iid", "efficientnet_b0_attn-iid", "inception_v3-iid-keep-optimizer",
                 "inception_v3-iid-fedavgm", "resnet50-dirichlet0.5", "inception_v3-dirichlet0.5",
                 "efficientnet_b0_attn-dirichlet0.5", "dscnet-iid")


def training_images(seed_dir: Path, method: str, train: list[str]) -> list[str]:
    """A site alone's own training images; every other method trained on all the sites' (the split's)."""
    if method.startswith("local-site-"):
        sites = json.loads((seed_dir / "partition.json").read_text())["sites"]
        return list(sites[int(method.removeprefix("local-site-"))]["train"])
    return train


@lru_cache(maxsize=None)
def manifest_of(seed_dir: Path):
    """The images the seed trained on (its partition names the folder)."""
    return scan_dataset(json.loads((seed_dir / "partition.json").read_text())["data"])


def accuracy(model, manifest, paths: list[str], data_config, hardware) -> float:
    loader = make_loader(build_dataset(manifest, paths, data_config, train=False), 64, shuffle=False)
    return evaluate(model, loader, hardware, manifest.class_names)["accuracy"]


def rescore(seed_dir: Path, method: str, batches: int, hardware) -> list[dict]:
    """The method's model on val and test, with its saved statistics and with recomputed ones."""
    manifest = manifest_of(seed_dir)
    config = json.loads((seed_dir / "results.json").read_text())["config"]
    split = load_split(seed_dir / "split.json", manifest)
    model, _ = load_run(seed_dir / "runs" / method, hardware.device)
    data_config = model.leuk_info.data_config
    sides = {side: list(getattr(split, side)) for side in SIDES}
    rows = [dict(statistics="saved", side=side, accuracy=accuracy(model, manifest, paths, data_config, hardware))
            for side, paths in sides.items()]
    train = build_dataset(manifest, training_images(seed_dir, method, list(split.train)), data_config, train=True,
                          augment=config["augment"])
    used = recalibrate_batchnorm(model, make_loader(train, config["batch_size"], shuffle=True, seed=0), hardware,
                                 batches)
    rows += [dict(statistics="recomputed", side=side, accuracy=accuracy(model, manifest, paths, data_config, hardware))
             for side, paths in sides.items()]
    return [dict(row, batches=used) for row in rows]


def finished(path: Path) -> set[tuple[str, int, str]]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(r["cell"], int(r["seed"]), r["method"]) for r in csv.DictReader(f)}


def read(path: Path) -> dict[tuple[str, str, str, str], dict[int, float]]:
    """(cell, method, statistics, side) -> {seed: accuracy}, the last row of each."""
    table: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for r in csv.DictReader(path.open()) if path.exists() else []:
        table.setdefault((r["cell"], r["method"], r["statistics"], r["side"]), {})[int(r["seed"])] = float(r["accuracy"])
    return table


def mean_text(values: dict[int, float]) -> str:
    return f"{100 * np.mean(list(values.values())):.1f}"


def difference_text(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    stats = paired_t([a[s] for s in seeds], [b[s] for s in seeds])
    if stats["diff"] is None:
        return ""
    ci = stats["ci"]
    interval = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci and None not in ci else ""
    return f"{100 * stats['diff']:+.1f}{interval}"


def summary(path: Path) -> str:
    """Per cell and method: accuracy with saved and recomputed statistics (mean over seeds), the paired
    difference, and each seed's test accuracy."""
    table = read(path)
    lines = ["| cell | method | seeds | val: saved → recomputed | test: saved → recomputed | test: recomputed − saved "
             "[95 % CI] | test per seed (saved → recomputed) |", "|---|---|---|---|---|---|---|"]
    for cell, method in sorted({(c, m) for c, m, _, _ in table}, key=lambda k: (list(ALL_CELLS).index(k[0]), k[1])):
        saved, recomputed = table.get((cell, method, "saved", "test"), {}), table.get((cell, method, "recomputed", "test"), {})
        val = f"{mean_text(table[cell, method, 'saved', 'val'])} → {mean_text(table[cell, method, 'recomputed', 'val'])}"
        each = ", ".join(f"{100 * saved[s]:.1f} → {100 * recomputed[s]:.1f}" for s in sorted(saved))
        lines.append(f"| {cell} | {method} | {len(saved)} | {val} | {mean_text(saved)} → {mean_text(recomputed)} | "
                     f"{difference_text(recomputed, saved)} | {each} |")
    lines += ["", f"Accuracy (%) on the {DATASET} split's validation and test images; mean over the seeds; interval: "
              "paired t over seeds (none with one seed). Weights as trained; recomputed: BatchNorm statistics over up "
              "to `--batches` (default 50) augmented batches of the method's own training images.", "",
              *federated_gap(table)]
    return "\n".join(lines)


def federated_gap(table: dict[tuple[str, str, str, str], dict[int, float]]) -> list[str]:
    """Per cell with both: the federated model minus centralized on test, with each one's statistics."""
    lines = ["| cell | federated − centralized, saved statistics | with recomputed statistics |", "|---|---|---|"]
    for cell, method in sorted({(c, m) for c, m, _, _ in table if m.startswith("federated-")}):
        if (cell, "centralized", "saved", "test") not in table:
            continue
        gaps = [difference_text(table[cell, method, stats, "test"], table[cell, "centralized", stats, "test"])
                for stats in ("saved", "recomputed")]
        lines.append(f"| {cell} ({method}) | {gaps[0]} | {gaps[1]} |")
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=list(ALL_CELLS), default=list(DEFAULT_CELLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=50, help="training batches the statistics are recomputed over")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where benchmarks/papers.py kept the cells' models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--summary", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.results))
        return
    torch.set_num_threads(args.threads)
    hardware = select_hardware("cpu")
    done = finished(args.results)
    command = "python benchmarks/bn_statistics.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for cell in args.cells:
        for seed in args.seeds:
            seed_dir = args.runs / cell / f"seed-{seed}"
            methods = sorted(p.name for p in (seed_dir / "runs").glob("*") if (p / "model.safetensors").exists())
            if not methods:
                print(f"{cell} seed {seed}: no saved models under {seed_dir}/runs (run benchmarks/papers.py --only {cell})")
            for method in methods:
                if (cell, seed, method) in done:
                    continue
                started = time.time()
                rows = rescore(seed_dir, method, args.batches, hardware)
                test = {r["statistics"]: r["accuracy"] for r in rows if r["side"] == "test"}
                print(f"{cell} seed {seed} {method}: test {100 * test['saved']:.1f} → {100 * test['recomputed']:.1f} "
                      f"({time.time() - started:.0f} s)", flush=True)
                append_csv(args.results, FIELDS, [dict(r, cell=cell, seed=seed, method=method, accuracy=f"{r['accuracy']:.6f}",
                                                       command=command.strip(), finished=utc_now()) for r in rows])
    print(summary(args.results))


if __name__ == "__main__":
    run_guarded(main)
