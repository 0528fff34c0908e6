"""Every paper's model on one test set: centralized vs FedAvg over 4 sites (iid, Dirichlet 0.5) vs each
site alone, at equal compute, over seeds 0, 1, 2, with 95 % intervals; resumable, long format.

Usage (from the repository root):
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/papers.py                  # every cell not done yet
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/papers.py --only dscnet-iid dscnet-dirichlet0.5
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/papers.py --only dscnet    # both cells of a model
    python benchmarks/papers.py --list       # cells, settings, estimated time, done or not
    python benchmarks/papers.py --table      # the markdown table (claims vs measured; "not run" + command)
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/papers.py --size paper   # the papers' own sizes (GPU)
    python benchmarks/papers.py --table --size paper

A cell is one (model, partition) `leuk simulate --seeds 0,1,2` comparison (FedAvg only) on
`all_taleqani` (4 classes): every seed scores every method on the same test images (split.json from
seed 0), and each seed draws its own partition, initialisation and data order. Rows go to
benchmarks/results/papers.jsonl (one per finished cell); each cell's folder (report.md, per-seed runs)
to benchmarks/runs/papers/<cell>/. An interrupted cell resumes with the methods and seeds it had finished:
from its folder, and from benchmarks/results/papers-seeds.jsonl (one row per finished seed: its scores
without models, committed with the results), so that a cell longer than one sitting (vgg16-iid, ~3 h)
finishes over several, on other machines too, seed by seed.
A cell that benchmarks/federated.py already ran with the same training settings (its rows in
benchmarks/results/federated.jsonl; the Lite0 cells are its 3-seed headline) is taken from there, not
trained again (`--list` says "done (federated.py)"; the table names the command).

Equal compute: centralized trains rounds x local_epochs epochs on the pooled training images, FedAvg
runs `rounds` rounds of `local_epochs` epochs at each site, and each site alone trains the same
rounds x local_epochs epochs on its own images (together they make the same sample passes).

Baselines are trained in the iid cells only. Centralized training does not depend on the partition:
it uses the pooled training side of split.json (the same in both cells: made from seed 0 over the same
data), the per-seed seed and the same settings, so the Dirichlet cell's centralized model would be the
iid cell's again. The Dirichlet cells therefore run FedAvg alone (baselines=False), and the table
pairs each Dirichlet FedAvg seed with the iid cell's centralized model of the same seed (paired t
across seeds) after checking that the two cells' split.json and seeds are identical. What this skips:
each site alone under the Dirichlet partition (skewed sites, a weaker baseline than the iid sites);
"best site alone" in the table is the iid cell's.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from federated import CONVERGED, LITE0, config_for, run_and_record, shown_path  # noqa: E402

from leukfed.common.cli_support import run_guarded  # noqa: E402
from leukfed.common.machine import machine_info  # noqa: E402
from leukfed.common.stats import across_seeds, paired_t  # noqa: E402
from leukfed.simulations.bench.measure import (append_jsonl, experiment_parser, pending_experiments,  # noqa: E402
                                               recorded_experiments, utc_now)
from leukfed.simulations.config import FIELD_DEFAULTS, SimulateConfig  # noqa: E402
from leukfed.simulations.seeds import Log, SimulateOnce  # noqa: E402

RESULTS = HERE / "results" / "papers.jsonl"
SEED_RESULTS = HERE / "results" / "papers-seeds.jsonl"   # a cell's finished seeds: resume on any machine
FEDERATED_RESULTS = HERE / "results" / "federated.jsonl"   # rows of benchmarks/federated.py a cell can reuse
RUNS = HERE / "runs" / "papers"
DATASET = "all_taleqani"
SEEDS = "0,1,2"
PARTITIONS = {"iid": "iid", "dirichlet0.5": "dirichlet:0.5"}


@dataclass(frozen=True)
class Paper:
    paper: str                 # the seed paper (/work/shared/seeds/README.md), or "ref"
    model: str                 # `leuk models` name
    label: str                 # what the row calls it
    claim: str                 # the paper's own headline number, as the paper states it
    settings: dict             # the SimulateConfig settings of the model (both partitions)
    minutes: tuple[int, int]   # estimated wall minutes of the (iid, Dirichlet) cell on an idle 2-core CPU
    paper_px: int | None = None   # the paper's input size where the CPU grid's differs (`--size paper`, GPU)


# Settings sized for the 2-core CPU (no GPU). Speeds on an idle machine at batch 32, measured for
# Lite0 (96 px ~60 img/s; a federated round of 4 sites x 485 images ~32 s) and smallcnn (~450 img/s,
# federated.jsonl), and scaled for the others from a 1-thread probe of all of them side by side
# (training img/s relative to Lite0 96 px: smallcnn 50 px ~13x, dscnet 96 px 1.5x, resnet50 64 px
# 0.66x, efficientnet_b0_attn 96 px ~3x (its lower backbone is frozen), inception_v3 75 px 1.15x,
# vgg16 48 px 0.15x). Train split = 1938 images, test = 415. Per seed, an iid cell trains 3 x E
# epochs of 1938 images (FedAvg + centralized + 4 sites alone, E = rounds x local epochs) plus
# ~3 s a federated round and ~1.5 min of start-up, scoring and bootstrap; a Dirichlet cell FedAvg only.
# Estimates: minutes per cell of 3 seeds, (iid, Dirichlet); a shared machine takes 2-3x as long.
# Total ~9 h iid + ~3.6 h Dirichlet = ~12.6 h on an idle machine.
SCRATCH = dict(pretrained="none", optimizer="adam", augment="flip", batch_size=32, lr=1e-3, local_epochs=1)
MODELS: dict[str, Paper] = {p.model: p for p in (
    # Run order: cheapest first, so that the table fills up early; the table itself is in paper order.
    # smallcnn: federated.py's converged recipe (60 x 1 at batch 64; paper 003 trains 30 epochs, ours had
    # not plateaued at 60). Measured 2026-12-06: iid 30 min (~10 min/seed), Dirichlet 12 min.
    Paper("003", "smallcnn", "modified CNN, grayscale + median blur (scratch)", "97.6 %",
          dict(CONVERGED, pretrained="none", seeds=SEEDS, evaluate_every=10), (30, 12)),
    # efficientnet_lite0 at 96 px with the offline ImageNet package: federated.py's LITE0 recipe
    # (10 x 1, lr 5e-4); measured ~16.5 min/seed iid (FedAvg 320-410 s, centralized 262 s, sites 270 s).
    Paper("ref", "efficientnet_lite0", "EfficientNet-Lite0, ImageNet (offline package): pretrained "
          "reference", "— (no paper)", dict(LITE0, seeds=SEEDS), (50, 21), paper_px=224),
    # efficientnet_b0_attn from scratch (no offline B0 weights): the paper's recipe freezes the backbone
    # below its top layers, so from scratch 2.3 M of its 5.7 M parameters stay at their random
    # initialisation (random features) and only the top ~3.4 M train. ~180 img/s, 20 x 1:
    # iid ~13 min/seed, Dirichlet ~6 min/seed.
    Paper("002", "efficientnet_b0_attn", "EfficientNet-B0 + self-attention (scratch; frozen lower "
          "backbone stays random)", "94.06 % val (inconsistent: its confusion matrix gives 56 %)",
          dict(SCRATCH, model="efficientnet_b0_attn", image_size=96, rounds=20, seeds=SEEDS, evaluate_every=4),
          (40, 17), paper_px=224),
    # inception_v3 from scratch at its minimum input, 75 px. ~70 img/s, 10 x 1: iid ~16 min/seed,
    # Dirichlet ~6 min/seed.
    Paper("001", "inception_v3", "Inception-v3 (scratch; the paper fine-tunes ImageNet weights)",
          "< 94 % (no accuracy given; sens. 84 %, spec. 76 %)",
          dict(SCRATCH, model="inception_v3", image_size=75, rounds=10, seeds=SEEDS, evaluate_every=2), (48, 18),
          paper_px=299),
    # dscnet at 96 px: CE loss (SimulateConfig has no loss setting and simulate's baselines use CE; with
    # one-hot targets the paper's KL-divergence equals CE, so the gradients are the same), BatchNorm
    # recalibration over 50 batches after every local epoch (benchmarks/dscnet_stability.py).
    # 15 x 1 (paper 20; our centralized run reached 99.5 % at 15). ~60 img/s with the recalibration:
    # iid ~26 min/seed, Dirichlet ~10 min/seed.
    Paper("004", "dscnet", "DSCNet (scratch; paper 224 px)", "99.85 %",
          dict(SCRATCH, model="dscnet", image_size=96, rounds=15, bn_recalibration=50, seeds=SEEDS,
               evaluate_every=3), (79, 29), paper_px=224),
    # resnet50 from scratch at the paper's 64 px (no offline ResNet weights). ~40 img/s, 10 x 1:
    # iid ~26 min/seed, Dirichlet ~10 min/seed.
    Paper("000", "resnet50", "ResNet-50 (scratch; paper 64 px)", "99.42 %",
          dict(SCRATCH, model="resnet50", image_size=64, rounds=10, seeds=SEEDS, evaluate_every=2), (79, 29)),
    # vgg16 from scratch (no offline weights; the paper fine-tunes ImageNet weights at 224 px): 134 M
    # parameters (the 7x7 fully-connected layer dominates at any input size), no BatchNorm, so lr 1e-4.
    # ~9 img/s at 48 px, 6 x 1: iid 55-58 min/seed (2026-12-07: FedAvg 25-29 min, rounds 2.9-6.1 min;
    # centralized 13 min; the 4 sites alone 15-16 min), Dirichlet (FedAvg only) 21-30 min/seed.
    # Each site's update is 0.54 GB
    # and a training site peaks at ~4.8 GB at 32 px (weights, Adam's moments, gradients, the records in and
    # out); before each task freed the last one's records, the actor grew to 13 GB and Ray killed the sites
    # (2026-12-06). One site trains at a time with both cores (cpus_per_site=2), beside the ServerApp's
    # ~6 GB. Run the vgg16 cells alone.
    Paper("001", "vgg16", "VGG16 (scratch; the paper fine-tunes ImageNet weights at 224 px)", "94 %",
          dict(SCRATCH, model="vgg16", image_size=48, lr=1e-4, rounds=6, seeds=SEEDS, evaluate_every=2,
               cpus_per_site=2),
          (170, 80), paper_px=224),
)}
TABLE_ORDER = ("resnet50", "vgg16", "inception_v3", "efficientnet_b0_attn", "smallcnn", "dscnet",
               "efficientnet_lite0")


def cell_name(model: str, partition: str, size: str = "cpu") -> str:
    return f"{model}-{partition}" if size == "cpu" else f"{model}-{partition}-{MODELS[model].paper_px}px"


def cell_spec(model: str, partition: str, size: str = "cpu") -> dict:
    """The federated.py-style experiment spec of one cell; at the paper's size the 4 sites share one GPU."""
    settings = {k: v for k, v in MODELS[model].settings.items() if k != "seed"}
    if size == "paper":
        settings |= dict(image_size=MODELS[model].paper_px, gpus_per_site=0.25)
    return dict(dataset=DATASET, sites=4, partition=PARTITIONS[partition], strategies=("fedavg",),
                baselines=partition == "iid", seed=0, **settings)


def size_models(size: str, order: tuple[str, ...] = TABLE_ORDER) -> list[str]:
    """The models of a grid size: every model on the CPU; at the paper's size those whose paper used a
    larger input (ResNet-50 at 64 px and smallcnn at 50 px already run at theirs)."""
    return [m for m in order if size == "cpu" or MODELS[m].paper_px]


# The CPU grid (sizes 2 cores finish) and the papers' own input sizes (`--size paper`: needs a GPU).
GRID: dict[str, dict[str, dict]] = {size: {cell_name(m, p, size): cell_spec(m, p, size)
                                           for m in size_models(size, tuple(MODELS)) for p in PARTITIONS}
                                    for size in ("cpu", "paper")}
CELLS, PAPER_CELLS = GRID["cpu"], GRID["paper"]

# What closes FedAvg's gap on iid sites: the iid cell's FedAvg again with one change (FedAvg only, paired
# by seed with the iid cell's centralized and plain FedAvg models: same split.json, seeds and partitions).
FEDAVGM_MOMENTUM, FEDAVGM_LR = 0.5, 1.0
REMEDIES = {
    # Flower's sites are stateless: every round each site builds a fresh Adam, whose first steps after
    # a restart move every weight by about the learning rate whatever its gradient's size. A site alone
    # trained with Adam restarted every epoch fell from 90.8 to 47.2 % (inception_v3, seed 2, site 0;
    # benchmarks/optimizer_restart.py: 0.7 to 43.6 points over that seed's 4 sites).
    "keep-optimizer": ("each site keeps its Adam state between rounds (`--local-optimizer-state`)",
                       dict(local_optimizer_state=True)),
    # The rest of the iid gap is the step count: per round the sites' averaged update moves the model
    # about as far as one site's epoch, where centralized training takes four sites' worth of steps. With
    # server momentum the model moves along a running sum of past updates (Hsu et al. 2019). Momentum and
    # server rate chosen on smallcnn-iid seed 0 by the sites' own validation accuracy after 60 rounds (the
    # split's val side, never its test side; FedAvg 84.8 %): momentum 0.5 rate 1 88.7, 0.7/1 88.0, 0.9/0.5
    # 87.7, 0.9/1 85.1 (58.8 at round 20), 0.9/0.2 81.9 (`python benchmarks/server_momentum.py --summary`).
    "fedavgm": ("FedAvgM: the server steps along a momentum of the averaged updates (`--strategy fedavgm "
                f"--server-momentum {FEDAVGM_MOMENTUM:g} --fedavgm-lr {FEDAVGM_LR:g}`)",
                dict(strategies=("fedavgm",), server_momentum=FEDAVGM_MOMENTUM, fedavgm_lr=FEDAVGM_LR)),
}
# The two are independent (one on the sites, one on the server): both at once.
REMEDIES["keep-optimizer-fedavgm"] = ("both: each site keeps its Adam and the server uses FedAvgM (`--local-optimizer-state "
                                      f"--strategy fedavgm --server-momentum {FEDAVGM_MOMENTUM:g} --fedavgm-lr {FEDAVGM_LR:g}`)",
                                      {**REMEDIES["keep-optimizer"][1], **REMEDIES["fedavgm"][1]})
# ResNet-50's sites alone scored 19.8-88.4 % after 95-98 % training accuracy, and the very weights score 91-98 %
# once their BatchNorm statistics are recomputed (benchmarks/bn_statistics.py): DSCNet's stale statistics
# (benchmarks/dscnet_stability.py). DSCNet's fix for the BatchNorm models trained without it; it changes the
# centralized model and the sites alone too, so this cell trains them again.
REMEDIES["bn-recalibration"] = ("BatchNorm statistics recomputed over 50 training batches after every local epoch, "
                                "in every method (`--bn-recalibration 50`, DSCNet's setting)",
                                dict(bn_recalibration=50, baselines=True))
# FedAvg's running statistics are the sites' averaged, each computed under the site's own weights: Inception-v3's
# FedAvg scores 82.7 % with them and 94.0 % with statistics recomputed under the averaged weights
# (benchmarks/bn_statistics.py). The statistics round does that in the federation, after the last round.
REMEDIES["bn-statistics-round"] = ("a statistics round after the last round: the sites recompute BatchNorm statistics "
                                   "under the final weights, the server averages them (`--bn-statistics-round 50`)",
                                   dict(bn_statistics_round=50))
REMEDY_MODELS = ("smallcnn", "inception_v3", "dscnet", "resnet50")   # from scratch, FedAvg behind
BATCHNORM_MODELS = ("resnet50", "inception_v3")   # BatchNorm, trained without --bn-recalibration
MODELS_OF_REMEDY = {"bn-recalibration": BATCHNORM_MODELS, "bn-statistics-round": BATCHNORM_MODELS}


def remedy_models(remedy: str) -> tuple[str, ...]:
    return MODELS_OF_REMEDY.get(remedy, REMEDY_MODELS)


def remedy_cell(model: str, remedy: str) -> str:
    return f"{cell_name(model, 'iid')}-{remedy}"


REMEDY_CELLS = {remedy_cell(m, r): {**cell_spec(m, "iid"), "baselines": False, **settings}
                for r, (_, settings) in REMEDIES.items() for m in remedy_models(r)}
ALL_CELLS = {**CELLS, **PAPER_CELLS, **REMEDY_CELLS}


def command(name: str) -> str:
    return "python benchmarks/papers.py --only " + shlex.quote(name)


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def split_sha256(out: Path) -> str | None:
    """Digest of the cell's split.json: two cells pair seed by seed only on the same test images."""
    return file_sha256(out / "split.json")


# -- the table ----------------------------------------------------------------------------------

def latest_rows(path: Path) -> dict[str, dict]:
    """The last row of every experiment in a results file."""
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["experiment"]] = row
    return rows


def recorded_seeds(path: Path) -> dict[str, dict[int, dict]]:
    """Per cell, the last recorded row of each of its finished seeds."""
    found: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip():
            row = json.loads(line)
            found.setdefault(row["experiment"], {})[row["seed"]] = row
    return found


def training_settings(config: dict) -> dict:
    """What a comparison's models depend on, comparable between the benchmark scripts' rows: every
    setting but where it ran, which extra strategies and baselines it trained, and its statistics."""
    skipped = {"out", "data", "strategies", "baselines", "bootstrap", "tracking"}
    # FIELD_DEFAULTS: settings added after the row ran
    return {k: v for k, v in {**FIELD_DEFAULTS, **config}.items() if k not in skipped} | {"dataset": Path(config["data"]).name}


def covers(row_config: dict, cell_config: dict) -> bool:
    """A row of another benchmark measured this cell: the same training settings, at least the cell's
    strategies, and baselines when the cell trains them."""
    return (training_settings(row_config) == training_settings(cell_config)
            and set(cell_config["strategies"]) <= set(row_config["strategies"])
            and (row_config["baselines"] or not cell_config["baselines"]))


def measured_elsewhere(path: Path) -> dict[str, dict]:
    """Cells that benchmarks/federated.py already ran with identical settings (the Lite0 headline over 3
    seeds is the Lite0 cells): its rows, named after the cell, so that nothing is trained twice."""
    found = {}
    rows = latest_rows(path).values()
    for name in CELLS:
        cell_config = dataclasses.asdict(config_for(name, Path("/data"), CELLS, RUNS))
        for row in rows:
            if covers(row["config"], cell_config):
                found[name] = {**row, "experiment": name, "measured_by": row["command"]}
    return found


def grid_rows(results: Path, elsewhere: Path | None) -> dict[str, dict]:
    """The cells' rows: the grid's own, else another benchmark's with the same settings."""
    return {**(measured_elsewhere(elsewhere) if elsewhere else {}), **latest_rows(results)}


def accuracy(method: dict) -> dict | None:
    return method.get("across_seeds", {}).get("accuracy")


def best_site_alone(methods: dict) -> dict | None:
    """Per seed the best of the sites alone (chosen on the test set: an optimistic upper bound for a
    site on its own), then mean and 95 % CI across the seeds."""
    sites = [accuracy(m)["values"] for name, m in methods.items() if name.startswith("local-site-") and accuracy(m)]
    if not sites:
        return None
    per_seed = [max((v for v in values if v is not None), default=None) for values in zip(*sites)]
    return across_seeds(per_seed)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def interval(stats: dict | None) -> str:
    """`mean [low, high]` in %, or the mean alone where the interval is undefined (one seed)."""
    if not stats or stats.get("mean") is None:
        return "–"
    ci = stats.get("ci")
    return pct(stats["mean"]) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci and None not in ci else "")


def difference(paired: dict | None) -> str:
    if not paired or paired.get("diff") is None:
        return ""
    ci = paired.get("ci")
    text = f"Δ {100 * paired['diff']:+.1f}"
    if ci and None not in ci:
        text += f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    return text + (f", p={paired['p']:.2g}" if paired.get("p") is not None else "")


def not_run(name: str, seeds_done: int = 0) -> str:
    state = f"{seeds_done} of 3 seeds done" if seeds_done else "not run"
    return f"{state}: `{command(name)}`"


def seeds_so_far(name: str, seeds: dict[int, dict], pick: Callable[[dict], float | None]) -> str:
    """A cell short of seeds: each recorded seed's test accuracy so far (no interval yet), and the command
    that finishes it; `pick` reads one seed's figure from its methods."""
    if not seeds:
        return not_run(name)
    figures = ", ".join(f"seed {seed}: {pct(pick(row['results']['methods']))}" for seed, row in sorted(seeds.items()))
    return f"{figures} ({len(seeds)} of 3 seeds; the rest: `{command(name)}`)"


def final_accuracy(method: dict | None) -> float | None:
    return method["final"]["accuracy"] if method else None


def best_site_of_seed(methods: dict) -> float | None:
    return max((final_accuracy(m) for name, m in methods.items() if name.startswith("local-site-")), default=None)


def input_px(model: str, size: str = "cpu") -> int:
    from leukfed.models import resolve_data_config

    return resolve_data_config(model, cell_spec(model, "iid", size).get("image_size") or None).input_size[1]


def settings_text(model: str, size: str = "cpu") -> str:
    s = MODELS[model].settings
    return (f"{input_px(model, size)} px, {s['rounds']}×{s['local_epochs']} ep, batch {s['batch_size']}, lr {s['lr']:g}"
            + (f", BN recal. {s['bn_recalibration']}" if s.get("bn_recalibration") else ""))


def federated_cell(row: dict | None, name: str, iid_row: dict | None, seeds: dict[int, dict] | None = None) -> str:
    """FedAvg's accuracy and its difference to the iid cell's centralized model, paired by seed when the
    two cells scored the same test images (split.json) with the same seeds."""
    if row is None:
        return seeds_so_far(name, seeds or {}, lambda methods: final_accuracy(methods.get("federated-fedavg")))
    own = "centralized" in row["methods"]   # trained in the same comparison: same test images and seeds
    found = paired_to(row, row if own else iid_row, "centralized")
    return interval(accuracy(federated(row))) + (f"<br>{found}" if found else "")


def federated(row: dict) -> dict:
    """The row's federated model: FedAvg's, or the one strategy a remedy cell trains instead."""
    methods = row["methods"]
    named = [name for name in methods if name.startswith("federated-")]
    return methods.get("federated-fedavg") or (methods[named[0]] if len(named) == 1 else {})


def paired_to(row: dict, other: dict | None, method: str) -> str:
    """The row's federated model minus `other`'s `method` (paired by seed), when both scored the same images
    and seeds."""
    mine = accuracy(federated(row))
    if mine is None or other is None or method not in other["methods"]:
        return ""
    if other.get("split_sha256") != row.get("split_sha256") or other.get("seeds") != row.get("seeds"):
        return "(not paired: split or seeds differ from the iid cell's)"
    return difference(paired_t(mine["values"], accuracy(other["methods"][method])["values"]))


def render_table(path: Path = RESULTS, elsewhere: Path | None = FEDERATED_RESULTS,
                 seed_results: Path = SEED_RESULTS, size: str = "cpu") -> str:
    rows = grid_rows(path, elsewhere)
    recorded = recorded_seeds(seed_results)
    lines = ["| paper | model | settings | paper's claim | centralized | FedAvg 4 sites iid | "
             "FedAvg 4 sites Dirichlet 0.5 | best site alone (iid) |",
             "|---|---|---|---|---|---|---|---|"]
    overridden = []
    for model in size_models(size):
        paper = MODELS[model]
        iid_name, dir_name = cell_name(model, "iid", size), cell_name(model, "dirichlet0.5", size)
        iid, dirichlet = rows.get(iid_name), rows.get(dir_name)
        overridden += [f"{r['experiment']} ({', '.join(f'{k}={v}' for k, v in r['overrides'].items())})"
                       for r in (iid, dirichlet) if r and r.get("overrides")]
        centralized = accuracy(iid["methods"]["centralized"]) if iid and "centralized" in iid["methods"] else None
        cells = [paper.paper, f"`{model}`: {paper.label}", settings_text(model, size), paper.claim,
                 interval(centralized) if centralized else seeds_so_far(
                     iid_name, recorded.get(iid_name, {}), lambda methods: final_accuracy(methods.get("centralized"))),
                 federated_cell(iid, iid_name, iid, recorded.get(iid_name)),
                 federated_cell(dirichlet, dir_name, iid, recorded.get(dir_name)),
                 interval(best_site_alone(iid["methods"])) if iid else seeds_so_far(
                     iid_name, recorded.get(iid_name, {}), best_site_of_seed)]
        lines.append("| " + " | ".join(cells) + " |")
    tested = sorted({r.get("test_images") for r in rows.values() if r.get("test_images")})
    lines += ["", f"Test accuracy (%) on the same {DATASET} test images (4 classes, "
              f"{'/'.join(map(str, tested)) or 415} images) for every "
              "method and seed: mean over seeds 0, 1, 2 [95 % t-interval across seeds]; Δ: FedAvg minus "
              "centralized, paired by seed (paired t), in points. Equal compute: centralized and each site "
              "alone train rounds × local epochs epochs, FedAvg the same sample passes in total. Centralized "
              "and the sites alone are trained in the iid cell; the Dirichlet column is paired with the iid "
              "cell's centralized (same split.json and seeds: checked). Best site alone: per seed the best of "
              "the 4 iid sites on the test set (optimistic). A cell short of seeds shows each recorded seed's "
              "accuracy (no interval yet) and the command that finishes it. Run cells with "
              "`LEUK_DATA_ROOT=../shared/datasets`."]
    borrowed = [f"{name} from `{row['measured_by']}`" for name, row in rows.items() if row.get("measured_by")]
    if borrowed:
        lines += ["", "Measured by benchmarks/federated.py with the same settings (its own centralized model pairs "
                  "with its FedAvg; not trained twice): " + "; ".join(sorted(borrowed)) + "."]
    if overridden:
        lines += ["", "Settings overridden (not the grid's): " + "; ".join(overridden) + "."]
    return "\n".join(lines)


def render_remedies(path: Path = RESULTS, seed_results: Path = SEED_RESULTS) -> str:
    """What closed FedAvg's gap: each remedy cell's FedAvg against the iid cell's centralized and plain FedAvg."""
    rows = latest_rows(path)
    done = {name: len(seeds) for name, seeds in recorded_seeds(seed_results).items()}
    lines = ["| model | change | centralized | FedAvg iid | FedAvg iid with the change | change − FedAvg |",
             "|---|---|---|---|---|---|"]
    for remedy, (label, _) in REMEDIES.items():
        for model in remedy_models(remedy):
            iid_name, name = cell_name(model, "iid"), remedy_cell(model, remedy)
            iid, row = rows.get(iid_name), rows.get(name)
            if iid is None:
                continue   # nothing to compare with yet
            gain = "" if row is None else paired_to(row, iid, "federated-fedavg")
            lines.append("| " + " | ".join([
                f"`{model}`", label, interval(accuracy(iid["methods"]["centralized"])),
                federated_cell(iid, iid_name, iid).replace("Δ", "Δ vs centralized"),
                federated_cell(row, name, iid, done.get(name, 0)).replace("Δ", "Δ vs centralized"), gain]) + " |")
    lines += ["", f"Test accuracy (%) on the grid's {DATASET} test images, mean over seeds 0, 1, 2 [95 % "
              "t-interval]; every Δ paired by seed, in points. The change's cell trains one federated model (FedAvg, "
              "or the strategy the change names; a change to every method's training trains the centralized model "
              "and the sites alone again too), with the iid cell's settings, split, seeds and partitions; its "
              "own command is `python "
              "benchmarks/papers.py --only <model>-iid-<change>`."]
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------------

def seed_settings(cfg: SimulateConfig) -> dict:
    """What one seed's models depend on, wherever it ran (its split is compared by content), as JSON
    reads it back (tuples as lists)."""
    settings = {k: v for k, v in training_settings(dataclasses.asdict(cfg)).items() if k not in ("split", "seeds")}
    return json.loads(json.dumps(settings))


def same_settings(recorded: dict, settings: dict) -> bool:
    """A recorded seed trained with `settings`; a setting added after it was recorded counts as its default."""
    defaults = json.loads(json.dumps(FIELD_DEFAULTS))
    return {**{k: defaults[k] for k in settings if k in defaults}, **recorded} == settings


def short_of_compute(results: dict) -> str | None:
    """Which federated method of a recorded seed trained fewer sample passes than its sites' training images
    x rounds x local epochs (a site that failed or missed rounds). A training loader drops a last batch of one
    image, so such a site trains one image less an epoch. DP-SGD's Poisson batches vary: not checked."""
    config, sites = results["config"], results["partition"]
    if config.get("dp_noise_multiplier"):
        return None
    batch = config["batch_size"]
    per_epoch = sum(n - (n > 1 and n % batch == 1) for n in (sum(site["train"].values()) for site in sites))
    expected = config["rounds"] * config["local_epochs"] * per_epoch
    for name, method in results["methods"].items():
        passes = method.get("sample_passes", expected)
        if name.startswith("federated-") and passes < expected:
            return f"{name} trained {passes} of {expected} sample passes"
    return None


def short_cells(seed_results: Path) -> list[str]:
    """Cells with a recorded seed short of its sample passes: they run again (that seed only)."""
    return [name for name, seeds in recorded_seeds(seed_results).items()
            if name in ALL_CELLS and any(short_of_compute(row["results"]) for row in seeds.values())]


def without_history(results: dict) -> dict:
    """One seed's results.json less the methods' round-by-round history (nothing across seeds reads it)."""
    return {**results, "methods": {name: {k: v for k, v in method.items() if k != "history"}
                                   for name, method in results["methods"].items()}}


def seed_recorder(name: str, seed_results: Path) -> SimulateOnce:
    """`simulate_once` that first looks for the seed in `seed_results` (same settings, same split.json
    content) and records each seed it trains there, so that a cell resumes seed by seed anywhere."""
    from leukfed.simulations.simulate import simulate_once

    def once(cfg: SimulateConfig, log: Log) -> dict:
        settings, split = seed_settings(cfg), file_sha256(Path(cfg.split))
        row = recorded_seeds(seed_results).get(name, {}).get(cfg.seed)
        if row and same_settings(row["settings"], settings) and row["split_sha256"] == split:
            short = short_of_compute(row["results"])
            if not short:
                log(f"seed {cfg.seed}: recorded in {shown_path(seed_results)} ({row['finished']}); not trained again")
                return row["results"]
            log(f"seed {cfg.seed}: recorded, but {short}: trained again")
            for kept in (Path(cfg.out) / "methods").glob("federated-*.json"):
                kept.unlink()       # its federated runs, short as recorded, are not taken from the runs folder either
        results = simulate_once(cfg, log)
        append_jsonl(seed_results, [{"experiment": name, "seed": cfg.seed, "settings": settings, "split_sha256": split,
                                     "results": without_history(results), "command": command(name),
                                     "machine": machine_info(), "finished": utc_now()}])
        return results
    return once


def run_cell(name: str, seed_results: Path) -> Callable[..., dict]:
    """The cell's `leuk simulate --seeds` comparison, its seeds resumed from `seed_results`."""
    from leukfed.simulations.seeds import simulate_seeds

    return lambda cfg, log: simulate_seeds(cfg, cfg.seed_list(), seed_recorder(name, seed_results), log)


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` settings of SimulateConfig, typed like the field's default (for smoke runs)."""
    defaults = FIELD_DEFAULTS
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            sys.exit(f"error: --override takes KEY=VALUE with KEY a simulate setting, not {item!r}")
        default = defaults[key]
        if isinstance(default, bool):
            found[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            found[key] = tuple(v for v in value.split(",") if v)
        else:
            found[key] = type(default)(value)
    return found


def selected(only: list[str] | None, size: str = "cpu") -> list[str] | None:
    """--only names: cells, or models (both of their cells at the grid size)."""
    if not only:
        return None
    return [cell for name in only
            for cell in ([cell_name(name, p, size) for p in PARTITIONS] if name in MODELS else [name])]


def cell_study_parser(description: str, cell: str, seed: int, results: Path, summary: str) -> argparse.ArgumentParser:
    """The options of a study on one grid cell's partition (optimizer_restart.py, server_momentum.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=[c for c in CELLS if c.endswith("-iid")], default=cell)
    parser.add_argument("--seed", type=int, default=seed, help=f"the grid seed whose partition is used (default: {seed})")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--summary", action="store_true", help=summary)
    return parser


def data_root() -> Path:
    """LEUK_DATA_ROOT, or one line and exit."""
    root = os.environ.get("LEUK_DATA_ROOT")
    if not root:
        sys.exit(f"error: set LEUK_DATA_ROOT to the folder holding {DATASET}/")
    return Path(root)


def gpu_present() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser(__doc__, choices=[*ALL_CELLS, *MODELS])
    parser.add_argument("--size", choices=("cpu", "paper"), default="cpu",
                        help="cpu: the sizes 2 CPU cores finish (default); paper: the papers' own input sizes "
                        "(224/299 px; needs a GPU)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results and exit")
    parser.add_argument("--remedies", action="store_true", help="print the table of what closed FedAvg's gap "
                        f"({', '.join(REMEDIES)}: cells <model>-iid-<change>) and exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of the cells' runs (default: %(default)s)")
    parser.add_argument("--seed-results", type=Path, default=SEED_RESULTS,
                        help="the cells' finished seeds, resumed from (default: %(default)s)")
    parser.add_argument("--elsewhere", type=Path, default=FEDERATED_RESULTS,
                        help="benchmarks/federated.py's results: cells it ran with the same settings are not run "
                        "again (default: %(default)s)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="change settings of every selected cell (smoke runs only; needs --results)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of centralized/local training "
                        "(0: torch's default; each federated site uses cpus_per_site)")
    args = parser.parse_args(argv)
    if args.table:
        print(render_table(args.results, args.elsewhere, args.seed_results, args.size))
        return
    if args.remedies:
        print(render_remedies(args.results, args.seed_results))
        return
    if args.list:
        done, elsewhere = recorded_experiments(args.results), measured_elsewhere(args.elsewhere)
        seeds_done, short = recorded_seeds(args.seed_results), short_cells(args.seed_results)
        for name, spec in {**GRID[args.size], **(REMEDY_CELLS if args.size == "cpu" else {})}.items():
            model = spec["model"]   # FedAvg-only cells (Dirichlet, remedies) cost what a Dirichlet cell does
            minutes = f"~{MODELS[model].minutes[not spec['baselines']]:3d} min" if args.size == "cpu" else "GPU"
            seeds = len(seeds_done.get(name, {}))
            state = ("done, a seed short" if name in short else "done" if name in done
                     else "done (federated.py)" if name in elsewhere else f"{seeds}/3 seeds" if seeds else "not run")
            print(f"{name:39} {state:19} {minutes:8}  {settings_text(model, args.size)}, pretrained {spec['pretrained']}")
        return
    overrides = parse_overrides(args.override)
    if overrides and (args.results == RESULTS or args.seed_results == SEED_RESULTS):
        sys.exit("error: --override writes rows that are not the grid's: give --results, --seed-results "
                 "(and --runs) elsewhere")
    root = data_root()
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    cells = {name: {**spec, **overrides} for name, spec in ALL_CELLS.items()}
    elsewhere = measured_elsewhere(args.elsewhere) if not overrides else {}
    asked = selected(args.only, args.size)
    pending = pending_experiments(cells if args.only else GRID[args.size], asked, args.results)
    runnable = asked or [*GRID[args.size], *(REMEDY_CELLS if args.size == "cpu" else {})]
    pending += [name for name in short_cells(args.seed_results) if name not in pending and name in runnable]
    if any(cells[name].get("gpus_per_site") for name in pending) and not gpu_present():
        sys.exit("error: cells at the papers' sizes need a GPU (224 px on 2 CPU cores would take days)")
    for name in pending:
        if name in elsewhere:
            print(f"== {name}: measured by `{elsewhere[name]['measured_by']}` with the same settings; not run again")
            continue
        cfg = config_for(name, root, cells, args.runs)
        run_and_record(name, cfg, args.results, command(name),
                       extra=lambda found, cfg=cfg, name=name: {
                           "model": cfg.model, "partition": cfg.partition, "seeds": found.get("seeds", [cfg.seed]),
                           "split_sha256": split_sha256(Path(cfg.out)),
                           "test_images": found["data"]["split"]["test"], "overrides": overrides},
                       run=run_cell(name, args.seed_results))


if __name__ == "__main__":
    run_guarded(main)
