"""What a fresh optimizer every round costs: one site alone, its Adam kept vs restarted every epoch.

FedAvg on Flower's stateless sites builds each site's optimizer anew every round (unless
`--local-optimizer-state`); a site alone keeps one optimizer for all its epochs. This trains a paper
grid cell's sites alone both ways (the cell's model, settings, split and the seed's partition, the
grid's rounds x local epochs epochs) and scores each on the cell's test images. Appends long-format
rows (cell, seed, site, optimizer, metric, value) to results/optimizer_restart.csv and resumes.

    LEUK_DATA_ROOT=../shared/datasets python benchmarks/optimizer_restart.py                 # inception_v3-iid, seed 2, sites 0-3
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/optimizer_restart.py --cell smallcnn-iid --seed 0 --sites 0
    python benchmarks/optimizer_restart.py --summary                                         # paired differences
"""
from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from papers import CELLS, cell_study_parser, config_for, data_root  # noqa: E402

from leukfed.common.centralized import TrainConfig, build_model  # noqa: E402
from leukfed.common.cli_support import run_guarded  # noqa: E402
from leukfed.common.data import scan_dataset  # noqa: E402
from leukfed.common.dataset import build_dataset, make_loader  # noqa: E402
from leukfed.common.splits import make_split, save_split  # noqa: E402
from leukfed.common.stats import paired_t  # noqa: E402
from leukfed.common.train import (evaluate, make_loss, make_optimizer, prepare_model, seed_everything,  # noqa: E402
                                  select_hardware, train_epoch)
from leukfed.simulations.bench.measure import append_csv, utc_now  # noqa: E402
from leukfed.simulations.config import SimulateConfig  # noqa: E402
from leukfed.simulations.simulate import prepare_data  # noqa: E402

RESULTS = HERE / "results" / "optimizer_restart.csv"
RUNS = HERE / "runs" / "optimizer_restart"
FIELDS = ("cell", "seed", "site", "optimizer", "metric", "value", "command", "finished")
MODES = ("kept", "restarted")


def site_images(cfg: SimulateConfig, seed: int) -> tuple[list[str], list[str], object]:
    """The seed's site shares and the cell's test images, as `leuk simulate --seeds` made them (the split
    from the cell's seed, each seed its own partition)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = scan_dataset(cfg.data)
    split_path = out / "split.json"
    save_split(make_split(manifest, seed=cfg.seed), split_path)
    one = dataclasses.replace(cfg, seeds="", seed=seed, out=str(out / f"seed-{seed}"), split=str(split_path))
    prep = prepare_data(one, Path(one.out), lambda line: None)
    return [s["train"] for s in prep.sites], list(prep.split.test), manifest


def train_alone(cfg: SimulateConfig, manifest, train: list[str], test: list[str], seed: int, mode: str) -> float:
    """The grid's baseline recipe (simulations/simulate.py train_baseline); `restarted` builds the
    optimizer anew before every epoch, as every FedAvg round does. Test accuracy."""
    seed_everything(seed)
    names = manifest.class_names
    model = build_model(TrainConfig(model=cfg.model, image_size=cfg.image_size or None, pretrained=cfg.pretrained),
                        len(names))
    hardware = select_hardware("auto")
    model = prepare_model(model, hardware)
    data_config = model.leuk_info.data_config
    loader = make_loader(build_dataset(manifest, train, data_config, train=True, augment=cfg.augment),
                         cfg.batch_size, shuffle=True, seed=seed)
    loss_fn = make_loss("ce", len(names))
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    for _ in range(cfg.rounds * cfg.local_epochs):
        if mode == "restarted":
            optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
        train_epoch(model, loader, optimizer, loss_fn, hardware)
    test_loader = make_loader(build_dataset(manifest, test, data_config, train=False), cfg.batch_size * 2,
                              shuffle=False)
    return evaluate(model, test_loader, hardware, names)["accuracy"]


def done(path: Path) -> set[tuple[str, int, int, str]]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(r["cell"], int(r["seed"]), int(r["site"]), r["optimizer"]) for r in csv.DictReader(f)}


def summary(path: Path) -> str:
    """Per cell and seed: each site's accuracy both ways and the paired difference across sites."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    lines = []
    for cell, seed in sorted({(r["cell"], r["seed"]) for r in rows}):
        acc = {(int(r["site"]), r["optimizer"]): float(r["value"]) for r in rows
               if (r["cell"], r["seed"]) == (cell, seed) and r["metric"] == "test_accuracy"}
        sites = sorted(s for s, m in acc if m == "kept" and (s, "restarted") in acc)
        kept, restarted = [acc[s, "kept"] for s in sites], [acc[s, "restarted"] for s in sites]
        each = ", ".join(f"site {s} {100 * k:.1f} vs {100 * r:.1f}" for s, k, r in zip(sites, kept, restarted))
        stats = paired_t(restarted, kept) if len(sites) > 1 else {}
        ci = stats.get("ci") or (None, None)
        lines.append(f"{cell} seed {seed}: kept vs restarted: {each}"
                     + (f"; restarted − kept {100 * stats['diff']:+.1f} points [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] "
                        f"(paired t over {len(sites)} sites)" if stats.get("diff") is not None and None not in ci else ""))
    return "\n".join(lines) or "no rows yet"


def main(argv: list[str] | None = None) -> None:
    parser = cell_study_parser(__doc__, "inception_v3-iid", 2, RESULTS, "print the paired differences and exit")
    parser.add_argument("--sites", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as a simulated site)")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.results))
        return
    root = data_root()
    torch.set_num_threads(args.threads)
    cfg = config_for(args.cell, root, CELLS, RUNS)
    sites, test, manifest = site_images(cfg, args.seed)
    finished = done(args.results)
    command = "python benchmarks/optimizer_restart.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for site in args.sites:
        for mode in MODES:
            if (args.cell, args.seed, site, mode) in finished:
                continue
            started = time.time()
            accuracy = train_alone(cfg, manifest, sites[site], test, args.seed, mode)
            print(f"{args.cell} seed {args.seed} site {site} optimizer {mode}: test accuracy {accuracy:.4f} "
                  f"({time.time() - started:.0f} s)", flush=True)
            append_csv(args.results, FIELDS, [{"cell": args.cell, "seed": args.seed, "site": site, "optimizer": mode,
                                               "metric": "test_accuracy", "value": f"{accuracy:.6f}",
                                               "command": command.strip(), "finished": utc_now()}])
    print(summary(args.results))


if __name__ == "__main__":
    run_guarded(main)
