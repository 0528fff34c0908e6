"""`leuk simulate`: federated vs centralized vs local-only on one machine, same test set, equal compute."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from leukfed.common.atomic import atomic_write_json
from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.faults import parse_faults
from leukfed.common.fedconfig import STRATEGIES, FedConfig
from leukfed.common.partition import partition_samples
from leukfed.common.splits import Split, load_split, make_split, save_split
from leukfed.common.train import (evaluate, make_loss, make_optimizer, prepare_model, seed_everything,
                                  select_hardware, train_epoch)

Log = Callable[[str], None]


@dataclass(frozen=True)
class SimulateConfig:
    """Everything one `leuk simulate` comparison depends on."""

    out: str
    data: str = ""                      # empty: a generated smear-like dataset (no download)
    sites: int = 3
    partition: str = "iid"
    model: str = "tinycnn"
    strategies: tuple[str, ...] = ("fedavg",)
    rounds: int = 5
    local_epochs: int = 1
    image_size: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    augment: str = "flip"
    pretrained: str = "auto"
    seed: int = 0
    split: str = ""
    baselines: bool = True
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    synthetic_per_class: int = 60
    faults: str = ""                    # e.g. "0:signflip,2:nan": misbehaving virtual sites
    evaluate_every: int = 1             # sites score the global model every N rounds (and after the last)
    transfer_dtype: str = "float32"     # float16 / bfloat16 halve the bytes of every update
    secure_aggregation: bool = False
    dp_noise_multiplier: float = 0.0    # > 0: the virtual sites train with DP-SGD
    dp_max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise LeukError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        if self.sites < 2:
            raise LeukError("a simulation needs at least 2 sites")
        if self.rounds < 1 or self.local_epochs < 1:
            raise LeukError("rounds and local epochs must be >= 1")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Prepared:
    """The data side of a comparison: dataset, global split and per-site shares."""

    root: Path
    manifest: Manifest
    split: Split
    sites: list[dict[str, list[str]]]   # per site: train / val / test paths


def prepare_data(cfg: SimulateConfig, out: Path, log: Log) -> Prepared:
    """Split once (global test never trained on), then give each site its share of every side."""
    root = Path(cfg.data) if cfg.data else _synthetic_data(out / "data", cfg, log)
    manifest = scan_dataset(root)
    split = load_split(cfg.split, manifest) if cfg.split else make_split(manifest, seed=cfg.seed)
    save_split(split, out / "split.json")
    pooled = list(split.train) + list(split.val) + list(split.test)
    parts = partition_samples(manifest, pooled, cfg.sites, cfg.partition, cfg.seed)
    faults = parse_faults(cfg.faults, cfg.sites)
    sides = {"train": set(split.train), "val": set(split.val), "test": set(split.test)}
    sites = [{side: [p for p in part if p in members] for side, members in sides.items()} for part in parts]
    for i, site in enumerate(sites):
        if not site["train"]:
            raise LeukError(f"site {i} received no training images under partition {cfg.partition!r}")
    atomic_write_json(out / "partition.json", {
        "data": str(root.resolve()), "spec": cfg.partition, "seed": cfg.seed,
        "class_names": list(manifest.class_names), "manifest_digest": manifest.digest(),
        "sites": [{"name": f"site-{i}", "fault": faults.get(i, ""), **s} for i, s in enumerate(sites)]})
    _plot_partition(out, manifest, sites)
    return Prepared(root, manifest, split, sites)


def _synthetic_data(folder: Path, cfg: SimulateConfig, log: Log) -> Path:
    from leukfed.common.synthetic import make_synthetic_dataset

    if not folder.exists():
        log(f"no --data given: generating a smear-like dataset in {folder}")
        make_synthetic_dataset(folder, per_class=cfg.synthetic_per_class, seed=cfg.seed)
    return folder


def _class_counts(manifest: Manifest, paths) -> dict[str, int]:
    by_path = manifest.by_path()
    counts = {c: 0 for c in manifest.class_names}
    for p in paths:
        counts[by_path[p].label] += 1
    return counts


def _plot_partition(out: Path, manifest: Manifest, sites) -> None:
    from leukfed.common.plots import plot_label_distribution

    counts = [_class_counts(manifest, s["train"]) for s in sites]
    plot_label_distribution(counts, manifest.class_names, out / "label_distribution.png",
                            site_names=[f"site-{i}" for i in range(len(sites))],
                            title="training images per site and class")


class Scorer:
    """Decodes each evaluation set once and scores any model on all of them."""

    def __init__(self, prep: Prepared, data_config, batch_size: int) -> None:
        self.class_names = prep.manifest.class_names
        self.hardware = select_hardware("auto")
        sets = {"global-test": list(prep.split.test)}
        sets.update({f"site-{i}-test": s["test"] for i, s in enumerate(prep.sites) if s["test"]})
        self.loaders = {}
        for name, paths in sets.items():
            dataset = build_dataset(prep.manifest, paths, data_config, train=False)
            self.loaders[name] = (make_loader(dataset, batch_size * 2, shuffle=False), dataset.groups)

    def score(self, model) -> dict[str, dict]:
        model = prepare_model(model, self.hardware)
        return {name: evaluate(model, loader, self.hardware, self.class_names, patients=groups)
                for name, (loader, groups) in self.loaders.items()}


def train_baseline(cfg: SimulateConfig, prep: Prepared, paths: list[str], epochs: int, seed: int):
    """Centralized or local-only training with the federated run's model and hyper-parameters."""
    from leukfed.common.centralized import TrainConfig, build_model

    seed_everything(seed)
    class_names = prep.manifest.class_names
    model = build_model(TrainConfig(model=cfg.model, image_size=cfg.image_size or None,
                                    pretrained=cfg.pretrained), len(class_names))
    hardware = select_hardware("auto")
    model = prepare_model(model, hardware)
    dataset = build_dataset(prep.manifest, paths, model.leuk_info.data_config, train=True, augment=cfg.augment)
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=seed)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    loss_fn = make_loss("ce", len(class_names))
    history = []
    for epoch in range(1, epochs + 1):
        stats = train_epoch(model, loader, optimizer, loss_fn, hardware)
        history.append({"epoch": epoch, **stats.as_metrics()})
    return model.cpu(), history, epochs * len(dataset)


def fed_config(cfg: SimulateConfig, prep: Prepared, out: Path, strategy: str) -> FedConfig:
    return FedConfig(
        model=cfg.model, class_names=",".join(prep.manifest.class_names), image_size=cfg.image_size,
        pretrained=cfg.pretrained, rounds=cfg.rounds, strategy=strategy, local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer, augment=cfg.augment,
        min_sites=cfg.sites, seed=cfg.seed, state_dir=str((out / f"federated-{strategy}").resolve()),
        eval_data=str(prep.root.resolve()), eval_split=str((out / "split.json").resolve()),
        partition_file=str((out / "partition.json").resolve()), round_timeout=3600.0,
        evaluate_every=cfg.evaluate_every, transfer_dtype=cfg.transfer_dtype, secure_aggregation=cfg.secure_aggregation,
        dp_noise_multiplier=cfg.dp_noise_multiplier, dp_max_grad_norm=cfg.dp_max_grad_norm)


def run_federated(cfg: SimulateConfig, prep: Prepared, out: Path, strategy: str, log: Log):
    from leukfed.common.runs import load_run
    from leukfed.server.state import read_history
    from leukfed.simulations.engine import SimulationResources, run_simulation

    fed = fed_config(cfg, prep, out, strategy)
    resources = SimulationResources(cfg.sites, cfg.cpus_per_site, cfg.gpus_per_site)
    run_simulation(fed, resources, out / f"flower-{strategy}", on_line=lambda line: log(f"  [{strategy}] {line}"))
    model, _ = load_run(fed.state_dir)
    history = read_history(Path(fed.state_dir))
    passes = sum(site["train"].get("examples_processed", 0) for row in history for site in row["sites"].values())
    return model, history, int(passes)


def _method_file(out: Path, name: str) -> Path:
    return out / "methods" / f"{name}.json"


def _cached(out: Path, name: str, digest: str) -> dict | None:
    """Resume: a method already finished under the same config is not trained again."""
    path = _method_file(out, name)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config_digest") == digest:
            return saved
    return None


def simulate(cfg: SimulateConfig, log: Log = print) -> dict:
    """Run the whole comparison; writes results.json, report.md and plots to cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prep = prepare_data(cfg, out, log)
    from leukfed.models import resolve_data_config

    scorer = Scorer(prep, resolve_data_config(cfg.model, cfg.image_size or None), cfg.batch_size)
    digest = cfg.digest()
    epochs = cfg.rounds * cfg.local_epochs
    plan: list[tuple[str, Callable]] = [
        (f"federated-{s}", lambda s=s: run_federated(cfg, prep, out, s, log)) for s in cfg.strategies]
    if cfg.baselines:
        plan.append(("centralized", lambda: train_baseline(cfg, prep, list(prep.split.train), epochs, cfg.seed)))
        plan += [(f"local-site-{i}", lambda i=i: train_baseline(cfg, prep, prep.sites[i]["train"], epochs, cfg.seed + 1 + i))
                 for i in range(cfg.sites)]
    methods = {}
    for name, run in plan:
        cached = _cached(out, name, digest)
        if cached is None:
            log(f"{name}: training")
            t0 = time.time()
            model, history, passes = run()
            cached = {"name": name, "config_digest": digest, "history": history, "sample_passes": passes,
                      "seconds": time.time() - t0, "scores": scorer.score(model)}
            atomic_write_json(_method_file(out, name), cached)
        log(f"{name}: test accuracy {cached['scores']['global-test']['accuracy']:.4f}")
        methods[name] = cached
    results = _results(cfg, prep, methods, time.time() - started)
    atomic_write_json(out / "results.json", results)
    from leukfed.simulations.report import write_report

    write_report(out, results)
    return results


def _results(cfg: SimulateConfig, prep: Prepared, methods: dict, seconds: float) -> dict:
    return {
        "config": dataclasses.asdict(cfg),
        "data": {"root": str(prep.root), "layout": prep.manifest.layout, "class_names": list(prep.manifest.class_names),
                 "num_images": len(prep.manifest.samples), "has_patients": prep.manifest.has_patients(),
                 "split": {k: len(getattr(prep.split, k)) for k in ("train", "val", "test")}},
        "partition": [{"site": f"site-{i}", **{side: _class_counts(prep.manifest, s[side]) for side in ("train", "val", "test")}}
                      for i, s in enumerate(prep.sites)],
        "methods": {name: {"final": m["scores"]["global-test"], "cross_site": {k: v["accuracy"] for k, v in m["scores"].items()},
                           "cross_site_patient_auc": {k: v.get("patient_level", {}).get("auc") for k, v in m["scores"].items()},
                           "sample_passes": m["sample_passes"], "seconds": m["seconds"], "history": m["history"]}
                    for name, m in methods.items()},
        "seconds": seconds,
    }

