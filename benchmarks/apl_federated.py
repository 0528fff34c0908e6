"""APL vs other AML per patient, federated: the chosen recipe's head trained by FedAvg over 4 hospitals
(partitioned by patient) vs centralized and vs each hospital alone, on the temporal split's 21 test patients.

    python benchmarks/apl_features.py --variants lite0-160      # once: cache frozen features (.npz)
    python benchmarks/apl_federated.py --seeds 0,1,2
    python benchmarks/apl_federated.py --table

The methods federated and pooled-sgd are an IN-PROCESS FedAvg of a patient head on frozen ImageNet
EfficientNet-Lite0 features (one process, sites are lists of patients): NOT the Flower pipeline (no
clients, no network, no secure aggregation, no differential privacy), and the backbone is frozen, so only
the head is federated. The algorithm's pieces (moments, initial head, step size, histograms, calibration)
are common/patient_federated.py, which `leuk-server --task patients` runs over real sites; the method
flower-fedavg measures that product path on the same protocol (below).

Protocol (for each partition seed s; everything below is seeded by s):
* test: the temporal split's latest 21 patients; training: the 61 earlier ones (as benchmarks/apl.py).
* sites: the 61 training patients dealt to 4 sites by common.partition.partition_samples(..., "patient"):
  whole patients per site, each diagnosis spread evenly over the sites, cell totals balanced.
* federated: like fit_ensemble's inner 5-fold CV, but each site deals ITS OWN patients into 5 folds
  (stratified by diagnosis within the site, random start). For each fold f, one FedAvg federation
  trains on every site's non-f patients: standardisation from the sites' summed cell counts, sums and
  sums of squares; class weights from the sites' summed patient counts per diagnosis; the server's
  seeded initial head sent to all; R rounds x E local epochs (continue_training: plain SGD on
  minibatches of 256 cells, step size cosine-decayed over the rounds, the same class-balanced
  L2-penalised loss as train_head); the server averages the head's
  parameters weighted by each site's NUMBER OF TRAINING PATIENTS (the loss weighs patients, not cells,
  so this weighting follows the pooled loss). Each site then scores its own fold-f patients with that
  fold's global head: out-of-fold logits that never leave the site. Each site sends only a histogram
  of APL / non-APL counts per logit bin (50 bins on [-10, 10], outer bins open); the server sums them
  and chooses the threshold (lower edge of the bin where >= 90 % of APL validation patients lie above)
  and the temperature (fit_temperature on the bin centres, weighted by counts). The 5 fold global heads,
  averaged in logit, are the model (fit_ensemble's "folds" ensemble).
* centralized: fit_ensemble on the pooled 61 patients exactly as benchmarks/apl.py's temporal protocol
  (recipe seed = s; s = 0 reproduces apl.csv's temporal row).
* site-k: fit_ensemble on site k's patients alone (inner folds = min(5, its smaller diagnosis count)).
* pooled-sgd (control): the federated code with ONE site holding all 61 patients, same R x E: what
  the local optimiser and budget cost without any federation.
* flower-fedavg: the PRODUCT path, `leuk-server --task patients` (server/patient_federation.py) over each
  site's `leuk-client --tasks cells,patients` ClientApp (client/patient_tasks.py), same partition: each
  site gets its own data folder under --work (its patients' images hard-linked from apl_aml, since leukfed
  refuses symlinks leading out of a data folder, and a patients.csv of just their rows). The product's
  ServerApp `main` runs in this process against the product ClientApp of the 4 sites, every message and
  reply through Flower's protobuf form (common/flower/inprocess.py's QueuedGrid, the mechanism of
  tests/test_patient_federation.py): no TLS, no separate processes, otherwise the deployed code. Settings:
  recipe lite0-meanprob, --rounds R --local-epochs E --lr 0.1 --batch-size 256 --seed s, --site-val-fraction
  0.25 and --min-metric-examples 4 (run and site policies). With 3-4 APL among a site's 15-16 patients,
  every fraction from 1/6 to 1/2 keeps exactly one APL patient per site for calibration; 0.25 (deploy/
  GUIDE.md's value) keeps 1 APL + 3 AML per site: 16 validation patients (4 APL), 45 training ones (9
  APL). 4 is the strictest floor under which all four sites still release their histogram. Each site's
  feature cache is this benchmark's .npz (the same extract_features of the same images; the site checks
  paths and sha256), so the sites do not extract features again; the test patients' features ARE
  extracted by the scoring, which is the product's: evaluate_patient_run on a folder of the 21 test
  patients, i.e. `leuk evaluate --model WORK/seed-s/state/patient-model --data WORK/seed-s/data/test
  --bootstrap 2000`. Differences from `federated`, by design of the product: ONE head from ONE
  federation (no fold ensemble), trained on 45 patients, not 4/5 of 61 per fold head; threshold and
  temperature from the histograms of 16 held-out site validation patients (4 APL), not of 61 out-of-fold
  ones; val_auc is that binned histogram's AUC. seconds: the whole method (site trees, federation,
  scoring with test-feature extraction); federation_seconds: the federation alone.

R = 100, E = 2 and the step size 0.1 were chosen on the TRAINING objective only (61 patients, seed-0
partition): they bring the 4-site FedAvg's weighted, penalised training loss to 0.265 against 0.261 for
train_head's L-BFGS optimum (0.782 at the start). Local Adam was tried and rejected: restarted every
round, the average of the sites' Adam steps settles near 0.29 whatever the step size or rounds.

Metrics on the 21 test patients: patient AUC with a stratified patient bootstrap 95 % CI, sensitivity
and specificity at the validation-chosen threshold, and per method the paired difference of AUC
minus centralized's (same seed), CI and p from common.stats.paired_bootstrap (the same resampled
patients score both). Long-format rows go to benchmarks/results/apl_federated.csv; (method, seed)
pairs already there are skipped (R, E and the other settings are in the command column only; centralized
is refitted, deterministically, as the paired reference of a method still to run).
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from leukfed.common.atomic import atomic_write_text
from leukfed.common.cli_support import run_guarded
from leukfed.common.metrics import binary_auc
from leukfed.common.partition import partition_samples
from leukfed.common.patient_federated import (Moments, federable_recipe, histogram_calibration, logit_histogram,
                                              moments, round_lr)
from leukfed.common.patient_federated import initial_head as federated_initial_head
from leukfed.common.patient_heads import PatientHead, continue_training, head_scores
from leukfed.common.patient_model import PatientRecipe, ensemble_logits, fit_ensemble
from leukfed.common.patient_protocol import patient_bootstrap_ci, sensitivity_specificity, sigmoid, temporal_split
from leukfed.common.stats import across_seeds, paired_bootstrap
from leukfed.simulations.bench.measure import append_csv, recorded_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apl import RECIPES, Cohort  # noqa: E402
from apl_features import cache_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "apl_federated.csv"
FIELDS = ["timestamp", "method", "seed", "metric", "value", "ci_low", "ci_high", "n_patients", "n_positive",
          "seconds", "command"]
RESAMPLES = 2000
Site = tuple[list[np.ndarray], np.ndarray]  # a site's bags and labels (1 = APL)


# ---- FedAvg of a head ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FedSettings:
    rounds: int = 100
    epochs: int = 2          # local epochs per round
    lr: float = 0.1          # local SGD step size in round 0, cosine-decayed over the rounds
    batch: int = 256         # cells per minibatch (meanprob) or patients (meanpool)
    folds: int = 5           # site-local validation folds (the federated inner CV)
    bins: int = 50           # logit histogram sent by each site
    low: float = -10.0
    high: float = 10.0


def _summed_moments(sites: Sequence[Site]) -> Moments:
    per_site = [moments(bags, y) for bags, y in sites]
    return sum(per_site[1:], per_site[0])


def initial_head(kind: str, sites: Sequence[Site], seed: int) -> PatientHead:
    """The server's seeded initial head, with the federation's standardisation."""
    if kind == "attention":
        raise SystemExit("the federated benchmark covers the linear heads (meanprob, meanpool): the attention "
                         "head's PCA projection would need a federated PCA")
    return federated_initial_head(kind, _summed_moments(sites), seed)


def fedavg(init: PatientHead, sites: Sequence[Site], *, rounds: int, epochs: int, weight_decay: float,
           lr: float = 0.1, batch: int = 256, seed: int = 0) -> PatientHead:
    """R rounds of FedAvg from `init`: each site continues the global head for `epochs` of SGD on its
    patients (step size round_lr, shuffling seed `seed + 1000 r + site`), the server averages the
    parameters weighted by the sites' numbers of patients (buffers, the standardisation, are shared)."""
    share = np.array([len(y) for _, y in sites], dtype=np.float64)
    share /= share.sum()
    counts = sum(np.bincount(y, minlength=2) for _, y in sites)  # the federation's patients per diagnosis
    head = copy.deepcopy(init)
    names = [name for name, _ in head.named_parameters()]
    for r in range(rounds):
        updates = [dict(continue_training(head, bags, y, epochs=epochs, weight_decay=weight_decay,
                                          lr=round_lr(lr, r, rounds),
                                          batch=batch, seed=seed + 1000 * r + k,
                                          class_counts=tuple(counts)).named_parameters())
                   for k, (bags, y) in enumerate(sites)]
        average = {n: sum(float(w) * u[n].detach() for w, u in zip(share, updates)) for n in names}
        head.load_state_dict(average, strict=False)
    return head.eval()


def site_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A site's own fold per patient: each diagnosis shuffled and dealt round-robin from a random start
    (a site may have fewer patients of a diagnosis than folds; the federation's folds still get some)."""
    fold = np.empty(len(y), dtype=np.int64)
    offset = int(rng.integers(k))
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return fold


# ---- the methods -------------------------------------------------------------------------------------

@dataclass
class Fitted:
    """A trained patient model: heads averaged in logit, temperature, probability threshold, validation AUC."""

    heads: list[PatientHead]
    temperature: float
    threshold: float
    val_auc: float | None

    def test(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated APL probability per patient (flagged when >= threshold)."""
        logits, _ = ensemble_logits(self.heads, bags)
        return sigmoid(logits / self.temperature)


def fit_federated(recipe: PatientRecipe, sites: Sequence[Site], fed: FedSettings, seed: int) -> Fitted:
    """Site-local folds, one FedAvg federation per fold, out-of-fold logits kept at the sites, histograms
    summed at the server for threshold and temperature; the fold heads are the ensemble."""
    rng = np.random.default_rng(seed)
    folds = [site_folds(y, fed.folds, rng) for _, y in sites]
    oof = [np.zeros(len(y)) for _, y in sites]
    heads = []
    for f in range(fed.folds):
        train = [([bags[i] for i in np.flatnonzero(fold != f)], y[fold != f])
                 for (bags, y), fold in zip(sites, folds)]
        train = [s for s in train if len(s[1])]
        init = initial_head(recipe.head, train, seed * 100 + f)
        head = fedavg(init, train, rounds=fed.rounds, epochs=fed.epochs, weight_decay=recipe.weight_decay,
                      lr=fed.lr, batch=fed.batch, seed=seed * 100_000 + f * 10_000)
        for (bags, _), fold, scores in zip(sites, folds, oof):
            val = np.flatnonzero(fold == f)
            if len(val):
                scores[val] = head_scores(head, [bags[i] for i in val])[0]
        heads.append(head)
    histograms = [logit_histogram(s, y, fed.bins, fed.low, fed.high) for s, (_, y) in zip(oof, sites)]
    threshold, temperature = histogram_calibration(histograms, fed.low, fed.high, recipe.target_sensitivity)
    # diagnostic only (the benchmark sees every site): AUC of the out-of-fold logits a site never shares
    val_auc = binary_auc(np.concatenate([y for _, y in sites]), np.concatenate(oof))
    return Fitted(heads, temperature, float(sigmoid(threshold / temperature)), val_auc)


def fit_pooled(recipe: PatientRecipe, bags: Sequence[np.ndarray], y: np.ndarray) -> Fitted:
    """fit_ensemble as benchmarks/apl.py runs it (its probability threshold turned into a logit one)."""
    heads, temperature, threshold, validation = fit_ensemble(recipe, bags, y)
    return Fitted(heads, temperature, threshold, validation["auc"])


def partition_sites(cohort: Cohort, train: Sequence[str], sites: int, seed: int) -> list[list[str]]:
    """leukfed's patient partition of the training patients' cells, read back as patients per site."""
    paths = [cohort.manifest.samples[i].path for p in train for i in cohort.index[p]]
    parts = partition_samples(cohort.manifest, paths, sites, "patient", seed)
    index = cohort.manifest.by_path()
    order = {p: i for i, p in enumerate(cohort.patients)}
    return [sorted({index[path].patient for path in part}, key=order.__getitem__) for part in parts]


# ---- the product path: leuk-server --task patients over leuk-client's ClientApp ------------------------

PRODUCT_RECIPES = {"lite0-160-meanprob": "lite0-meanprob"}   # this benchmark's recipe -> the product's name
RUN_ID = 7                                                   # the in-process federation's Flower run id


@dataclass(frozen=True)
class FlowerSettings:
    site_val_fraction: float = 0.25   # 1 APL + 3 AML of each site's 15-16 patients kept for calibration
    min_metric_examples: int = 4      # every site then holds exactly 4 validation patients: all release
    work: Path = Path("/tmp/leukfed-apl-flower")   # site trees, state and export, per seed (replaced)


def site_tree(source: Path, patients: Sequence[str], folder: Path) -> Path:
    """A hospital's own data folder: its patients' folders (hard links to `source`'s images, copies across
    file systems; leukfed refuses symlinks leading out of a data folder) and a patients.csv of their rows."""
    with (source / "patients.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], {r["patient"]: r for r in reader}
    missing = [p for p in patients if p not in rows]
    if missing:
        raise SystemExit(f"{source / 'patients.csv'} has no row for {', '.join(missing)}")
    for patient in patients:
        for image in sorted(p for p in (source / patient).rglob("*") if p.is_file()):
            target = folder / image.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image, target)
            except OSError:
                shutil.copyfile(image, target)
    lines = [",".join(fields)] + [",".join(rows[p][k] for k in fields) for p in patients]
    atomic_write_text(folder / "patients.csv", "\n".join(lines) + "\n")
    return folder


def run_product_federation(site_folders: dict[str, Path], state: Path, fed: FedSettings, flower: FlowerSettings,
                           recipe: str, seed: int, feature_cache: Path | None) -> list[str]:
    """The product ServerApp's main against the product ClientApp of each site, in this process, every
    message through protobuf (common/flower/inprocess.py's QueuedGrid, as tests/test_patient_federation.py
    runs it); `feature_cache`: a leukfed feature cache of these images put in each site's image cache (the
    site then skips extracting its features). Returns the coordinator's log lines."""
    from unittest import mock

    from flwr.app import Context, RecordDict

    from leukfed.client.client_app import app
    from leukfed.client.policy import SitePolicy
    from leukfed.common.fedconfig import FedConfig
    from leukfed.common.patient_site import FEATURES_FILE
    from leukfed.server import patient_federation, server_app

    from leukfed.common.flower.inprocess import QueuedGrid, run_client_app, set_task_identity

    nodes = {3000 + 41 * k: name for k, name in enumerate(site_folders)}
    config = FedConfig(task="patients", patient_recipe=recipe, state_dir=str(state), rounds=fed.rounds,
                       local_epochs=fed.epochs, lr=fed.lr, batch_size=fed.batch, seed=seed, min_sites=len(nodes),
                       min_metric_examples=flower.min_metric_examples,
                       round_timeout=600, registered_sites=",".join(f"{n}={node}" for node, n in nodes.items()))
    run_config = config.to_run_config()
    contexts = {}
    for node, name in nodes.items():
        home = state.parent / f"site-{name}"
        policy = home / "policy.toml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(policy, SitePolicy(min_metric_examples=flower.min_metric_examples, tasks="cells,patients",
                                             patient_val_fraction=flower.site_val_fraction,   # the site's own split,
                                             patient_split_seed=seed).to_toml())               # as recorded
        if feature_cache is not None:
            product = federable_recipe(recipe)
            cached = home / "image-cache" / FEATURES_FILE.format(backbone=product.backbone, size=product.image_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(feature_cache.resolve(), cached)   # read only: a mismatch is extracted and replaces it
        node_config = {"data-path": str(site_folders[name]), "site-name": name, "site-policy": str(policy),
                       "audit-log": str(home / "audit.jsonl"), "image-cache": str(home / "image-cache")}
        contexts[node] = Context(RUN_ID, node, node_config, RecordDict(), run_config)
    grid = QueuedGrid({n: (lambda m, n=n: run_client_app(app, m, contexts[n])) for n in nodes}, run_id=RUN_ID)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if not line.startswith("round ") or line.startswith((f"round {fed.rounds}/", "round 1/")):
            print(f"  [leukfed] {line}", flush=True)

    flwr_log, level = logging.getLogger("flwr"), logging.getLogger("flwr").level
    flwr_log.setLevel(logging.WARNING)   # not Flower's report of every round
    try:
        set_task_identity(RUN_ID)   # what Flower's runtime sets before it runs the apps
        with mock.patch.object(server_app, "log", log), mock.patch.object(patient_federation, "log", log):
            server_app.main(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    finally:
        flwr_log.setLevel(level)
    return lines


def flower_fedavg(cohort: Cohort, recipe_name: str, parts: Sequence[Sequence[str]], test: Sequence[str],
                  fed: FedSettings, flower: FlowerSettings, seed: int) -> tuple[dict, np.ndarray]:
    """Site trees of the partition, one product federation (`--task patients`), then `leuk evaluate
    --model STATE/patient-model --data TEST --bootstrap 2000` (evaluate_patient_run) on the test patients;
    the metrics as `evaluate` records them and the probabilities in `test` order."""
    from leukfed.common.patient_model import evaluate_patient_run, load_patient_model

    work = flower.work / f"seed-{seed}"
    if work.exists():
        shutil.rmtree(work)
    source = Path(cohort.manifest.root)
    sites = {f"site-{k}": site_tree(source, part, work / "data" / f"site-{k}") for k, part in enumerate(parts)}
    test_folder = site_tree(source, test, work / "data" / "test")
    state = work / "state"
    start = time.perf_counter()
    run_product_federation(sites, state, fed, flower, PRODUCT_RECIPES[recipe_name], seed,
                           cache_path(cohort.cache, RECIPES[recipe_name][0]))
    federation_seconds = time.perf_counter() - start
    scored = evaluate_patient_run(state / "patient-model", test_folder, bootstrap=RESAMPLES)
    print(f"  leuk evaluate --model {state / 'patient-model'} --data {test_folder} --bootstrap {RESAMPLES}: "
          f"AUC {scored['auc']:.4f}, CI {scored['ci'].get('auc')}", flush=True)
    by_patient = {r["patient"]: r["probability"] for r in scored["patients"]}
    prob = np.array([by_patient[p] for p in test])
    model = load_patient_model(state / "patient-model")
    described = model.description
    label = {r["patient"]: r["label"] for r in scored["patients"]}
    y = np.array([int(label[p] == described["positive"]) for p in test])
    low, high = patient_bootstrap_ci(y, prob, resamples=RESAMPLES)
    metrics = {"auc": (binary_auc(y, prob), low, high),
               "sensitivity_at_val_threshold": (scored["sensitivity"], None, None),
               "specificity_at_val_threshold": (scored["specificity"], None, None),
               "threshold_prob": (model.threshold, None, None), "temperature": (model.temperature, None, None),
               "val_auc": (described["validation"]["auc"], None, None),
               "val_patients": (float(described["validation"]["num_patients"]), None, None),
               "train_patients": (float(described["federation"]["train_patients"]), None, None),
               "federation_seconds": (federation_seconds, None, None)}
    return metrics, prob


# ---- running and recording ---------------------------------------------------------------------------

def evaluate(fitted: Fitted, test_bags: Sequence[np.ndarray], y: np.ndarray) -> tuple[dict, np.ndarray]:
    prob = fitted.test(test_bags)
    auc = binary_auc(y, prob)
    low, high = patient_bootstrap_ci(y, prob, resamples=RESAMPLES)
    sens, spec = sensitivity_specificity(y, prob, fitted.threshold)
    metrics = {"auc": (auc, low, high), "sensitivity_at_val_threshold": (sens, None, None),
               "specificity_at_val_threshold": (spec, None, None),
               "threshold_prob": (fitted.threshold, None, None),
               "temperature": (fitted.temperature, None, None), "val_auc": (fitted.val_auc, None, None)}
    return metrics, prob


def paired_auc(y: np.ndarray, prob: np.ndarray, reference: np.ndarray) -> tuple[float, float, float, float]:
    """AUC(prob) - AUC(reference) on the same patients, its paired bootstrap CI and p."""
    two = lambda p: np.stack([1 - p, p], 1)  # noqa: E731
    out = paired_bootstrap(y, two(prob), two(reference), ("AML", "APL"), n_resamples=RESAMPLES, seed=0)["auc"]
    return out["diff"], out["ci"][0], out["ci"][1], out["p"]


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def run_seed(cohort: Cohort, name: str, seed: int, fed: FedSettings, num_sites: int, command: str,
             done: set[tuple[str, str]], flower: FlowerSettings = FlowerSettings()) -> None:
    variant, views, recipe = RECIPES[name]
    if views:
        raise SystemExit(f"{name} trains on augmented views: not covered here")
    recipe = replace(recipe, seed=seed)
    bags = cohort.bags(variant, recipe)
    position = {p: i for i, p in enumerate(cohort.patients)}
    split = temporal_split(cohort.patients, cohort.labels.tolist())
    test = [position[p] for p in split.test]
    test_bags, y_test = [bags[i] for i in test], cohort.labels[test]
    parts = partition_sites(cohort, split.train, num_sites, seed)
    sites = [([bags[position[p]] for p in part], cohort.labels[[position[p] for p in part]]) for part in parts]
    for k, (_, y) in enumerate(sites):
        print(f"seed {seed} site-{k}: {len(y)} patients, {int(y.sum())} APL, "
              f"{sum(len(b) for b in sites[k][0])} cells", flush=True)
    train_idx = [position[p] for p in split.train]
    pooled = ([bags[i] for i in train_idx], cohort.labels[train_idx])

    def centralized() -> Fitted:
        return fit_pooled(recipe, *pooled)

    def site_alone(k: int) -> Fitted:
        folds = int(min(5, *np.bincount(sites[k][1], minlength=2)))
        return fit_pooled(replace(recipe, inner_folds=folds), *sites[k])

    def scored(fit) -> tuple[dict, np.ndarray]:
        return evaluate(fit(), test_bags, y_test)

    methods = {"centralized": lambda: scored(centralized),
               "federated": lambda: scored(lambda: fit_federated(recipe, sites, fed, seed)),
               "pooled-sgd": lambda: scored(lambda: fit_federated(recipe, [pooled], fed, seed))}
    methods |= {f"site-{k}": (lambda k=k: scored(lambda: site_alone(k))) for k in range(num_sites)}
    if name in PRODUCT_RECIPES:
        methods["flower-fedavg"] = lambda: flower_fedavg(cohort, name, parts, split.test, fed, flower, seed)
    else:
        print(f"flower-fedavg: recipe {name} has no product recipe (known: {', '.join(PRODUCT_RECIPES)}): skipped")
    if all((m, str(seed)) in done for m in methods):
        print(f"seed {seed}: every method already in {CSV_PATH.name}")
        return
    reference: np.ndarray | None = None
    for method, run in methods.items():
        if (method, str(seed)) in done and method != "centralized":
            print(f"{method} seed {seed}: already in {CSV_PATH.name}")
            continue
        start = time.perf_counter()
        metrics, prob = run()
        seconds = round(time.perf_counter() - start, 1)
        if method == "centralized":
            reference = prob
            if (method, str(seed)) in done:
                continue  # refitted (deterministic) only as the paired reference
        else:
            assert reference is not None
            diff, low, high, p = paired_auc(y_test, prob, reference)
            metrics["auc_minus_centralized"] = (diff, low, high)
            metrics["auc_minus_centralized_p"] = (p, None, None)
        if method.startswith("site-"):
            metrics["train_patients"] = (float(len(sites[int(method[5:])][1])), None, None)
            metrics["train_apl"] = (float(sites[int(method[5:])][1].sum()), None, None)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        append_csv(CSV_PATH, FIELDS, [{"timestamp": stamp, "method": method, "seed": seed, "metric": m, "value": _fmt(v),
                      "ci_low": _fmt(lo), "ci_high": _fmt(hi), "n_patients": len(y_test),
                      "n_positive": int(y_test.sum()), "seconds": seconds, "command": command}
                     for m, (v, lo, hi) in metrics.items()])
        auc, low, high = metrics["auc"]
        extra = (f"  dAUC {metrics['auc_minus_centralized'][0]:+.3f} [{metrics['auc_minus_centralized'][1]:+.3f}, "
                 f"{metrics['auc_minus_centralized'][2]:+.3f}]" if "auc_minus_centralized" in metrics else "")
        print(f"{method:12s} seed {seed}  AUC {auc:.3f} [{low:.3f}, {high:.3f}]  sens "
              f"{metrics['sensitivity_at_val_threshold'][0]:.2f} spec {metrics['specificity_at_val_threshold'][0]:.2f}"
              f"{extra}  ({seconds:.0f} s)", flush=True)


# ---- the table ---------------------------------------------------------------------------------------------

def markdown_table() -> str:
    """Per method and seed, then per method over seeds (the site rows pooled over the 4 sites)."""
    rows: dict[str, dict[str, dict[str, dict]]] = {}
    with CSV_PATH.open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["method"], {}).setdefault(r["seed"], {})[r["metric"]] = r

    def num(m: dict, key: str) -> float | None:
        return float(m[key]["value"]) if key in m and m[key]["value"] else None

    def ci(m: dict, key: str, signed: bool = False) -> str:
        if key not in m:
            return ""
        v = m[key]
        f = "{:+.3f}" if signed else "{:.3f}"
        return f"{f.format(float(v['value']))} [{f.format(float(v['ci_low']))}, {f.format(float(v['ci_high']))}]"

    out = ["| method | seed | test AUC [95 % CI] | sens / spec | AUC - centralized [paired 95 % CI] (p) | "
           "val AUC | seconds |", "|---|---|---|---|---|---|---|"]
    for method, by in rows.items():
        for seed, m in sorted(by.items()):
            p = num(m, "auc_minus_centralized_p")
            diff = f"{ci(m, 'auc_minus_centralized', True)} ({p:.2f})" if p is not None else ""
            out.append(f"| {method} | {seed} | {ci(m, 'auc')} | {num(m, 'sensitivity_at_val_threshold'):.2f} / "
                       f"{num(m, 'specificity_at_val_threshold'):.2f} | {diff} | {num(m, 'val_auc'):.3f} | "
                       f"{m['auc']['seconds']} |")
    out += ["", "| method | seeds | test AUC mean ± sd | sens mean | spec mean | AUC - centralized mean ± sd |",
            "|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for method, by in rows.items():
        groups.setdefault("site alone (4 sites)" if method.startswith("site-") else method, []).extend(by.values())
    for group, ms in groups.items():
        def stat(key: str, signed: bool = False) -> str:
            s = across_seeds([num(m, key) for m in ms])
            if s["mean"] is None:
                return ""
            f = "{:+.3f}" if signed else "{:.3f}"
            return f.format(s["mean"]) + (f" ± {s['sd']:.3f}" if s["sd"] is not None else "")
        out.append(f"| {group} | {len(ms)} | {stat('auc')} | {stat('sensitivity_at_val_threshold').split(' ')[0]} | "
                   f"{stat('specificity_at_val_threshold').split(' ')[0]} | {stat('auc_minus_centralized', True)} |")
    if "flower-fedavg" in rows:
        out += ["", "flower-fedavg: the product's `leuk-server --task patients` over 4 ClientApps (one head; "
                "threshold and temperature from 16 site validation patients, val AUC binned); federated: the "
                "in-process FedAvg (5 fold heads, calibrated on 61 out-of-fold patients)."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEUK_DATA_ROOT", "../shared/datasets")) / "apl_aml")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LEUK_FEATURE_CACHE", "/tmp/leukfed-apl-features")))
    parser.add_argument("--recipe", default="lite0-160-meanprob")
    parser.add_argument("--seeds", default="0,1,2", help="partition seeds (also the recipe, fold and init seeds)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=FedSettings.rounds)
    parser.add_argument("--epochs", type=int, default=FedSettings.epochs, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=FedSettings.lr)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--site-val-fraction", type=float, default=FlowerSettings.site_val_fraction,
                        help="flower-fedavg: each site's share of patients kept for calibration")
    parser.add_argument("--min-metric-examples", type=int, default=FlowerSettings.min_metric_examples,
                        help="flower-fedavg: the run's and the sites' floor for releasing a histogram")
    parser.add_argument("--work", type=Path, default=FlowerSettings.work,
                        help="flower-fedavg: site trees, server state and patient-model (per seed, replaced)")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of apl_federated.csv")
    args = parser.parse_args()
    if args.table:
        print(markdown_table())
        return
    torch.set_num_threads(args.threads)
    fed = FedSettings(rounds=args.rounds, epochs=args.epochs, lr=args.lr)
    cohort = Cohort(args.data, args.cache)
    command = "python benchmarks/apl_federated.py " + " ".join(sys.argv[1:])
    for seed in (int(s) for s in args.seeds.split(",")):
        run_seed(cohort, args.recipe, seed, fed, args.sites, command, recorded_keys(CSV_PATH, "method", "seed"),
                 FlowerSettings(args.site_val_fraction, args.min_metric_examples, args.work))


if __name__ == "__main__":
    run_guarded(main)
