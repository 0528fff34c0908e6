"""`leuk simulate`: federated vs centralized vs local-only on one machine, same test set, equal compute."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable


from leukfed.common.atomic import atomic_write_json
from leukfed.common.centralized import split_digest
from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.metrics import metrics_with_patients
from leukfed.common.partition import partition_samples
from leukfed.common.runs import MODEL_FILE, export_model, model_description
from leukfed.common.splits import Split, load_split, make_split, save_split
from leukfed.common.stats import Predictions, compare, load_predictions, save_predictions
from leukfed.common.train import (make_loss, make_optimizer, predict, prepare_model, recalibrate_batchnorm,
                                  seed_everything, select_hardware, train_epoch)
from leukfed.simulations.config import SimulateConfig
from leukfed.simulations.faults import parse_faults

Log = Callable[[str], None]


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
    """Decodes each evaluation set once and scores any model on all of them, keeping every prediction."""

    def __init__(self, prep: Prepared, data_config, batch_size: int) -> None:
        self.class_names = prep.manifest.class_names
        self.hardware = select_hardware("auto")
        sets = {"global-test": list(prep.split.test)}
        sets.update({f"site-{i}-test": s["test"] for i, s in enumerate(prep.sites) if s["test"]})
        self.loaders = {}
        for name, paths in sets.items():
            dataset = build_dataset(prep.manifest, paths, data_config, train=False)
            self.loaders[name] = (make_loader(dataset, batch_size * 2, shuffle=False), paths, dataset.groups)

    def predict(self, model) -> dict[str, Predictions]:
        model = prepare_model(model, self.hardware)
        out = {}
        for name, (loader, paths, groups) in self.loaders.items():
            proba, labels = predict(model, loader, self.hardware)
            out[name] = Predictions(proba, labels, tuple(self.class_names), tuple(paths), tuple(groups))
        return out


def score(predictions: dict[str, Predictions]) -> dict[str, dict]:
    return {name: metrics_with_patients(p.labels, p.proba, p.class_names, p.patients)
            for name, p in predictions.items()}


def train_baseline(cfg: SimulateConfig, prep: Prepared, paths: list[str], epochs: int, seed: int, kind: str):
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
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    loss_fn = make_loss("ce", len(class_names))
    history = []
    for epoch in range(1, epochs + 1):
        stats = train_epoch(model, loader, optimizer, loss_fn, hardware)
        recalibrate_batchnorm(model, loader, hardware, cfg.bn_recalibration)
        history.append({"epoch": epoch, **stats.as_metrics()})
    description = model_description(
        model, class_names, config=dataclasses.asdict(cfg), manifest_digest=prep.manifest.digest(),
        split_digest=split_digest(prep.split), kind=kind,
        extra={"hardware": hardware.describe(), "num_train": len(dataset), "seed": seed})
    return model.cpu(), history, epochs * len(dataset), description


def fed_config(cfg: SimulateConfig, prep: Prepared, out: Path, strategy: str) -> FedConfig:
    """The federated run: every run setting the simulation shares with leuk-server, and the study's own."""
    run_names = {f.name for f in fields(FedConfig)}
    shared = {f.name: getattr(cfg, f.name) for f in fields(SimulateConfig) if f.name in run_names}
    return FedConfig(
        **shared, class_names=",".join(prep.manifest.class_names), strategy=strategy, min_sites=cfg.sites,
        state_dir=str((out / f"federated-{strategy}").resolve()), eval_data=str(prep.root.resolve()),
        eval_split=str((out / "split.json").resolve()), round_timeout=3600.0,
        min_metric_examples=1)  # virtual sites: every score of the study is released


def simulation_sites(out: Path) -> dict[str, str]:
    """The simulation ClientApp's settings: which images each virtual site holds, and the virtual sites'
    policy (they take part in any run the study makes, even of 2 sites)."""
    from leukfed.client.policy import SitePolicy
    from leukfed.common.atomic import atomic_write_text
    from leukfed.simulations.client_app import PARTITION_KEY, POLICY_KEY

    policy = out / "site-policy.toml"
    atomic_write_text(policy, SitePolicy(min_sites=1, min_metric_examples=0).to_toml())
    return {PARTITION_KEY: str((out / "partition.json").resolve()), POLICY_KEY: str(policy.resolve())}


def run_federated(cfg: SimulateConfig, prep: Prepared, out: Path, strategy: str, log: Log):
    from leukfed.common.runs import load_run
    from leukfed.server.state import read_history
    from leukfed.simulations.engine import SimulationResources, run_simulation

    fed = fed_config(cfg, prep, out, strategy)
    resources = SimulationResources(cfg.sites, cfg.cpus_per_site, cfg.gpus_per_site)

    def on_line(line: str) -> None:
        log(f"  [{strategy}] {line}")
        stop_on_site_failure(strategy, line)

    run_simulation(fed, resources, out / f"flower-{strategy}", on_line=on_line, sites=simulation_sites(out))
    history = read_history(Path(fed.state_dir))
    refuse_site_failures(strategy, history)
    model, description = load_run(fed.state_dir)
    passes = sum(site["train"].get("examples_processed", 0) for row in history for site in row["sites"].values())
    return model, history, int(passes), description


FAILED_SITE_LINE = re.compile(r"^\s+(?P<site>.+?) failed in (?P<phase>train|evaluate): (?P<reason>.*)$")


def site_failure_error(strategy: str, where: str, reason: str) -> LeukError:
    """A virtual site that failed a round (out of memory, most often) leaves the comparison short of equal
    compute: one line naming the failure, never a result that looks whole."""
    hint = (" Each virtual site held too much memory: --cpus-per-site 2 halves the sites that train at once "
            "(one at a time on 2 cores)." if "OutOfMemory" in reason else "")
    return LeukError(f"federated-{strategy}: {where}: {reason[:160]}; the run is not kept as a result.{hint}")


def stop_on_site_failure(strategy: str, line: str) -> None:
    """The ServerApp logged a failed site: stop the simulation now rather than finish it short of sites."""
    found = FAILED_SITE_LINE.match(line)
    if found:
        raise site_failure_error(strategy, f"{found['site']} failed in {found['phase']}", found["reason"])


def missing_sites(row: dict) -> bool:
    """A round in which a sampled site failed or never replied."""
    return bool(row.get("failures")) or row.get("sites_replied", 0) < row.get("sites_sampled", 0)


def refuse_site_failures(strategy: str, history: list[dict]) -> None:
    """The same refusal from a finished run's history: a failure whose log line was not seen, or a site that
    never replied within the round's timeout."""
    failed = [(row["round"], entry) for row in history for entry in row.get("failures", [])]
    if failed:
        round_, first = failed[0]
        reason = (str(first.get("reason") or "").strip().splitlines() or ["no reason given"])[-1]
        raise site_failure_error(strategy, f"{len(failed)} site failure(s), the first in round {round_} "
                                 f"({first.get('site', '?')}, {first.get('phase', '?')})", reason)
    short = next((row for row in history if missing_sites(row)), None)
    if short:
        raise site_failure_error(strategy, f"round {short['round']}", f"{short['sites_replied']} of "
                                 f"{short['sites_sampled']} sampled sites replied")


def _method_file(out: Path, name: str) -> Path:
    return out / "methods" / f"{name}.json"


def run_dir(out: Path, name: str) -> Path:
    """Where a method's final model is kept, loadable by `leuk evaluate --model`."""
    return out / "runs" / name


def predictions_file(out: Path, name: str, test_set: str = "global-test") -> Path:
    return out / "predictions" / name / f"{test_set}.npz"


def _cached(out: Path, name: str, digest: str) -> dict | None:
    """Resume: a method already finished under the same config (and data) is not trained again."""
    path = _method_file(out, name)
    if path.exists() and (run_dir(out, name) / MODEL_FILE).exists() and predictions_file(out, name).exists():
        saved = json.loads(path.read_text())
        failed = any(map(missing_sites, saved.get("history", [])))   # trained before the refusal
        if saved.get("config_digest") == digest and not failed:
            return saved
    return None


def _finish(out: Path, name: str, digest: str, scorer: Scorer, trained, seconds: float) -> dict:
    """Score a freshly trained model, keep its predictions and its run directory, then its record."""
    model, history, passes, description = trained
    predictions = scorer.predict(model)
    for test_set, pred in predictions.items():
        save_predictions(predictions_file(out, name, test_set), pred)
    scores = score(predictions)
    export_model(run_dir(out, name), model, {**description, "method": name}, scores["global-test"])
    record = {"name": name, "config_digest": digest, "history": history, "sample_passes": passes,
              "seconds": seconds, "scores": scores, "run_dir": str(run_dir(out, name))}
    atomic_write_json(_method_file(out, name), record)
    return record


def simulate(cfg: SimulateConfig, log: Log = print) -> dict:
    """Run the whole comparison, once or once per seed of `cfg.seeds`; writes results.json, report.md
    (and plots) to cfg.out."""
    seeds = cfg.seed_list()
    if len(seeds) > 1:
        from leukfed.simulations.seeds import simulate_seeds

        return simulate_seeds(cfg, seeds, simulate_once, log)
    return simulate_once(dataclasses.replace(cfg, seed=seeds[0]) if seeds else cfg, log)


def simulate_once(cfg: SimulateConfig, log: Log = print) -> dict:
    """One seed: every method trained (or resumed), scored, compared with bootstrap intervals."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    prep = prepare_data(cfg, out, log)
    from leukfed.models import resolve_data_config

    scorer = Scorer(prep, resolve_data_config(cfg.model, cfg.image_size or None), cfg.batch_size)
    digest = f"{cfg.digest()}-{split_digest(prep.split)[:16]}"
    epochs = cfg.rounds * cfg.local_epochs
    plan: list[tuple[str, Callable]] = [
        (f"federated-{s}", lambda s=s: run_federated(cfg, prep, out, s, log)) for s in cfg.strategies]
    if cfg.baselines:
        plan.append(("centralized", lambda: train_baseline(cfg, prep, list(prep.split.train), epochs, cfg.seed,
                                                                  "centralized")))
        plan += [(f"local-site-{i}", lambda i=i: train_baseline(cfg, prep, prep.sites[i]["train"], epochs,
                                                                     cfg.seed + 1 + i, "local-only"))
                 for i in range(cfg.sites)]
    methods = {}
    for name, run in plan:
        cached = _cached(out, name, digest)
        if cached is None:
            log(f"{name}: training")
            t0 = time.time()
            trained = run()
            cached = _finish(out, name, digest, scorer, trained, time.time() - t0)
        log(f"{name}: test accuracy {cached['scores']['global-test']['accuracy']:.4f}")
        methods[name] = cached
    results = _results(cfg, prep, methods, time.time() - started)
    if cfg.bootstrap:
        log(f"bootstrap: {cfg.bootstrap} resamples of the test set per method")
        add_intervals(results, {name: load_predictions(predictions_file(out, name)) for name in methods}, cfg.bootstrap)
    atomic_write_json(out / "results.json", results)
    from leukfed.simulations.report import write_report

    write_report(out, results)
    return results


def add_intervals(results: dict, predictions: dict[str, Predictions], resamples: int, seed: int = 0) -> None:
    """final_ci / patient_ci per method, and paired_vs_centralized (and its patient twin) for the others.
    Every method is scored on the same resamples of the test set."""
    found = compare(predictions, "centralized", resamples, seed)
    renamed = {"image": "final_ci", "patient": "patient_ci", "paired_image": "paired_vs_centralized",
               "paired_patient": "patient_paired_vs_centralized"}
    for name, method in results["methods"].items():
        method.update({field: found[name][key] for key, field in renamed.items() if found[name].get(key) is not None})
        method["bootstrap"] = {k: v for k, v in found[name].items() if k not in renamed}


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
                           "sample_passes": m["sample_passes"], "seconds": m["seconds"], "history": m["history"],
                           "run_dir": m["run_dir"]}
                    for name, m in methods.items()},
        "seconds": seconds,
    }
