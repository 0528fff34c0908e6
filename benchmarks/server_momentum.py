"""Choosing FedAvgM's server momentum and rate by the sites' own validation accuracy, never the test set.

Trains a paper grid cell's FedAvg again as FedAvgM (`--strategy fedavgm`) for each (momentum, rate) asked,
on one seed's partition, and records the sites' accuracy on their validation images (the split's val
side, which each site scores the global model on every `evaluate_every` rounds). papers.py's `fedavgm`
remedy cells then run the choice on the test images. Momentum 0, rate 1 is FedAvg itself. Appends
long-format rows (cell, seed, momentum, rate, round, metric, value) to results/server_momentum.csv and
resumes.

    LEUK_DATA_ROOT=../shared/datasets python benchmarks/server_momentum.py          # smallcnn-iid, seed 0
    python benchmarks/server_momentum.py --summary                                  # each choice's last round
"""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from papers import CELLS, cell_study_parser, config_for, data_root  # noqa: E402

from leukfed.common.cli_support import run_guarded  # noqa: E402
from leukfed.simulations.bench.measure import append_csv, utc_now  # noqa: E402

RESULTS = HERE / "results" / "server_momentum.csv"
RUNS = HERE / "runs" / "server_momentum"
FIELDS = ("cell", "seed", "momentum", "rate", "round", "metric", "value", "command", "finished")
CHOICES = ("0:1", "0.5:1", "0.7:1", "0.9:1", "0.9:0.5", "0.9:0.2")   # momentum:rate; 0:1 is FedAvg


def parse_choice(text: str) -> tuple[float, float]:
    try:
        momentum, rate = (float(x) for x in text.split(":"))
    except ValueError:
        sys.exit(f"error: a choice is MOMENTUM:RATE, e.g. 0.5:1, not {text!r}")
    return momentum, rate


def site_validation(cell: str, root: Path, seed: int, momentum: float, rate: float) -> list[tuple[int, float]]:
    """(round, the sites' validation accuracy) of the cell's FedAvgM run at this momentum and rate."""
    from leukfed.simulations.simulate import simulate_once

    out = RUNS / cell / f"seed-{seed}-momentum{momentum:g}-rate{rate:g}"
    cfg = dataclasses.replace(config_for(cell, root, CELLS, RUNS), out=str(out), strategies=("fedavgm",),
                              baselines=False, seeds="", seed=seed, server_momentum=momentum, fedavgm_lr=rate)
    simulate_once(cfg, lambda line: None)
    history = json.loads((out / "federated-fedavgm" / "history.json").read_text())
    return [(row["round"], row["evaluate"]["eval_accuracy"]) for row in history
            if isinstance(row.get("evaluate"), dict) and "eval_accuracy" in row["evaluate"]]


def done(path: Path) -> set[tuple[str, int, float, float]]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(r["cell"], int(r["seed"]), float(r["momentum"]), float(r["rate"])) for r in csv.DictReader(f)}


def summary(path: Path) -> str:
    """Per cell and seed, each choice's validation accuracy in its last round, best first."""
    rows = [r for r in csv.DictReader(path.open())] if path.exists() else []
    lines = []
    for cell, seed in sorted({(r["cell"], r["seed"]) for r in rows}):
        last: dict[tuple[float, float], tuple[int, float]] = {}
        for r in rows:
            if (r["cell"], r["seed"]) == (cell, seed) and r["metric"] == "site_val_accuracy":
                key, entry = (float(r["momentum"]), float(r["rate"])), (int(r["round"]), float(r["value"]))
                last[key] = max(last.get(key, entry), entry)
        ranked = sorted(last.items(), key=lambda item: -item[1][1])
        lines.append(f"{cell} seed {seed}, sites' validation accuracy at the last round: " + ", ".join(
            f"momentum {m:g} rate {r:g}{' (FedAvg)' if (m, r) == (0, 1) else ''} {100 * acc:.1f}"
            for (m, r), (_, acc) in ranked))
    return "\n".join(lines) or "no rows yet"


def main(argv: list[str] | None = None) -> None:
    parser = cell_study_parser(__doc__, "smallcnn-iid", 0, RESULTS,
                               "print each choice's last-round accuracy and exit")
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), help="MOMENTUM:RATE pairs")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.results))
        return
    root = data_root()
    finished = done(args.results)
    command = "python benchmarks/server_momentum.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for momentum, rate in map(parse_choice, args.choices):
        if (args.cell, args.seed, momentum, rate) in finished:
            continue
        started = time.time()
        curve = site_validation(args.cell, root, args.seed, momentum, rate)
        print(f"{args.cell} seed {args.seed} momentum {momentum:g} rate {rate:g}: sites' validation accuracy "
              + ", ".join(f"r{r} {100 * a:.1f}" for r, a in curve) + f" ({time.time() - started:.0f} s)", flush=True)
        append_csv(args.results, FIELDS, [{"cell": args.cell, "seed": args.seed, "momentum": momentum, "rate": rate,
                                           "round": r, "metric": "site_val_accuracy", "value": f"{a:.6f}",
                                           "command": command.strip(), "finished": utc_now()} for r, a in curve])
    print(summary(args.results))


if __name__ == "__main__":
    run_guarded(main)
