"""The accuracy cost of DP-SGD on all_taleqani at epsilon about 1, 3 and 8, against no DP; resumable.

Usage (from the repository root):
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/privacy.py [--recipe NAME] [--only LABEL ...] [--list]
One long-format row per experiment goes to benchmarks/results/privacy.jsonl; experiments already
there are skipped. Within a recipe every run trains the same model for the same epochs from the
same seed on the same duplicate-aware split (seed 0), the DP runs with the noise that spends the
target epsilon (delta 1e-5) over all epochs, and each is scored on the test part after its last
epoch (no epoch selection, so DP and non-DP runs are treated alike).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from leukfed.common.cli_support import run_guarded
from leukfed.common.data import scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.dp_accounting import noise_for_epsilon
from leukfed.common.dp_model import dp_compatible
from leukfed.common.dp_settings import DPSettings
from leukfed.common.dp_training import private_train
from leukfed.common.machine import machine_info
from leukfed.common.splits import make_split
from leukfed.common.train import (evaluate, make_loss, make_optimizer, prepare_model, seed_everything,
                                  select_hardware, train_epoch)
from leukfed.models import create_model
from leukfed.simulations.bench.measure import append_jsonl, experiment_parser, pending_experiments, utc_now

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "privacy.jsonl"


@dataclass(frozen=True)
class Arm:
    """One run of a recipe: no DP, DP-SGD at a target epsilon, or clipping with ~no noise."""

    target_epsilon: float | None = None
    noise_multiplier: float | None = None   # a fixed noise instead of a target (clip-only)
    overrides: tuple[tuple[str, object], ...] = ()  # recipe fields this arm changes

    @property
    def private(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None


ARMS = {
    "nodp": Arm(),
    # The same model and epochs with Adam: the DP recipe's SGD rate may not suit plain training.
    "nodp-adam": Arm(overrides=(("optimizer", "adam"), ("lr", 1e-3))),
    # DP-SGD's clipping without its noise: separates the cost of the noise from that of clipping.
    "clip-only": Arm(noise_multiplier=1e-6),
    "eps8": Arm(8.0),
    "eps3": Arm(3.0),
    "eps1": Arm(1.0),
}


@dataclass(frozen=True)
class Recipe:
    """What every run shares; only the noise differs."""

    dataset: str = "all_taleqani"
    model: str = "smallcnn"
    image_size: int = 50
    epochs: int = 10
    batch_size: int = 64          # DP: the expected Poisson batch size
    lr: float = 1e-3
    dp_lr: float | None = None    # the DP runs' own rate (clipped gradients are smaller); None: lr
    optimizer: str = "adam"
    augment: str = "flip"
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    seed: int = 0


RECIPES = {
    # Paper 003's recipe (Adam, batch 64): Adam turns noise-dominated gradients into full-size steps.
    "smallcnn-50px-adam-b64-10ep": Recipe(),
    # A DP-SGD recipe: 20k parameters (less noise in all), large Poisson batches, SGD with momentum;
    # each side's rate picked on validation accuracy from {0.1, 0.5} in 4-epoch probes.
    "tinycnn-64px-sgd-b256-10ep": Recipe(model="tinycnn", image_size=64, epochs=10, batch_size=256, lr=0.1,
                                         dp_lr=0.5, optimizer="sgd"),
}
DEFAULT_RECIPE = "tinycnn-64px-sgd-b256-10ep"


def experiment_name(recipe_name: str, label: str) -> str:
    return f"taleqani-{recipe_name}-{label}"


def load_data(recipe: Recipe, data_root: Path):
    """Train, val and test datasets of the duplicate-aware split (seed 0) at the model's input."""
    manifest = scan_dataset(data_root / recipe.dataset)
    split = make_split(manifest, seed=0)
    model = create_model(recipe.model, len(manifest.class_names), image_size=recipe.image_size)
    data_config = model.leuk_info.data_config
    sets = {name: build_dataset(manifest, getattr(split, name), data_config, train=name == "train",
                                augment=recipe.augment) for name in ("train", "val", "test")}
    return manifest.class_names, sets


def train_once(recipe: Recipe, class_names, sets, arm: Arm) -> dict:
    """One run: no DP, or DP-SGD with the noise that spends the arm's epsilon over all epochs."""
    seed_everything(recipe.seed)
    hardware = select_hardware("cpu")
    model = create_model(recipe.model, len(class_names), image_size=recipe.image_size)
    # The no-DP baseline uses the DP architecture too, so only the noise and clipping differ.
    model = prepare_model(dp_compatible(model), hardware)
    loss_fn = make_loss("ce", len(class_names))
    lr = recipe.dp_lr if arm.private and recipe.dp_lr else recipe.lr
    optimizer = make_optimizer(model, recipe.optimizer, lr)
    loader = make_loader(sets["train"], recipe.batch_size, shuffle=True, seed=recipe.seed)
    privacy: dict = {}
    start = time.perf_counter()
    if not arm.private:
        for _ in range(recipe.epochs):
            train_epoch(model, loader, optimizer, loss_fn, hardware)
    else:
        # As make_private samples: rate batch/N, len(loader) Poisson batches a pass.
        sample_rate = recipe.batch_size / len(sets["train"])
        steps = recipe.epochs * len(loader)
        noise = arm.noise_multiplier or noise_for_epsilon(arm.target_epsilon, recipe.delta, sample_rate, steps)
        settings = DPSettings(noise, recipe.max_grad_norm, recipe.delta)
        result = private_train(model, optimizer, loader, loss_fn, hardware, settings, epochs=recipe.epochs)
        model.load_state_dict(result.state)
        privacy = {"target_epsilon": arm.target_epsilon, **result.metrics()}
        if arm.target_epsilon is None:  # clip-only: ~1e13, no meaningful guarantee
            privacy["dp_epsilon"] = privacy["dp_round_epsilon"] = None
    train_seconds = time.perf_counter() - start
    scores = {part: evaluate(model, make_loader(sets[part], 256, shuffle=False), hardware, class_names)
              for part in ("val", "test")}
    return {"lr": lr, "train_seconds": round(train_seconds, 1), "epsilon": privacy.get("dp_epsilon"),
            "privacy": privacy,
            "test_accuracy": scores["test"]["accuracy"], "test_macro_f1": scores["test"]["macro_f1"],
            "test_balanced_accuracy": scores["test"]["balanced_accuracy"],
            "val_accuracy": scores["val"]["accuracy"], "val_macro_f1": scores["val"]["macro_f1"],
            "test_images": scores["test"]["num_samples"], "train_images": len(sets["train"])}


def main() -> None:
    parser = experiment_parser(__doc__, choices=list(ARMS))
    parser.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE, help="shared training recipe")
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    if args.list:
        print("\n".join(experiment_name(name, label) for name in RECIPES for label in ARMS))
        return
    root = os.environ.get("LEUK_DATA_ROOT")
    if not root:
        sys.exit("error: set LEUK_DATA_ROOT to the folder holding all_taleqani/")
    labels = {experiment_name(args.recipe, label): label for label in ARMS}
    asked = [experiment_name(args.recipe, label) for label in args.only or []]
    todo = [labels[name] for name in pending_experiments(labels, asked, RESULTS)]
    if not todo:
        print("all experiments are already in", RESULTS)
        return
    class_names, sets = load_data(recipe, Path(root))
    for label in todo:
        name = experiment_name(args.recipe, label)
        print(f"== {name}", flush=True)
        started, load_before = time.time(), os.getloadavg()[0]
        arm = ARMS[label]
        arm_recipe = replace(recipe, **dict(arm.overrides))
        row = {"experiment": name, "dp": arm.private, "recipe_name": args.recipe, "recipe": asdict(arm_recipe),
               "split": {"group_by": "auto (duplicate-aware)", "seed": 0},
               **train_once(arm_recipe, class_names, sets, arm),
               "wall_seconds": round(time.time() - started, 1),
               # Other jobs may share the CPU: the 1-minute load average puts wall times in context.
               "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "command": f"python benchmarks/privacy.py --recipe {args.recipe} --only {shlex.quote(label)}",
               "machine": machine_info(), "finished": utc_now()}
        append_jsonl(RESULTS, [row])
        print(json.dumps({k: row[k] for k in ("experiment", "epsilon", "test_accuracy", "test_macro_f1",
                                              "wall_seconds")}), flush=True)


if __name__ == "__main__":
    run_guarded(main)
