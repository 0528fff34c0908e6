"""APL vs other AML per patient: recipes compared by repeated CV on the earlier patients, then the temporal split.

    python benchmarks/apl_features.py                       # once: cache frozen features (.npz)
    python benchmarks/apl.py --recipes lite0-160-meanpool --protocols cv,temporal

Appends long-format rows to benchmarks/results/apl.csv (one row per recipe, protocol and metric)
and skips (recipe, protocol) pairs already there. Recipes are chosen by the CV rows only: the CV
runs over the temporal split's TRAINING patients, so the latest patients never influence a choice.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from leukfed.common.cli_support import run_guarded
from leukfed.common.data import scan_dataset
from leukfed.common.metrics import binary_auc
from leukfed.common.patient_features import load_feature_cache
from leukfed.common.patient_model import PatientRecipe, bag_features, cell_type_of, ensemble_logits, fit_ensemble
from leukfed.common.patient_protocol import (PatientFold, expected_calibration_error, patient_bootstrap_ci,
                                             reliability_bins, repeated_cv, sigmoid, temporal_split)
from leukfed.simulations.bench.measure import append_csv, recorded_keys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apl_features import cache_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH, PREDICTIONS = RESULTS / "apl.csv", RESULTS / "apl-predictions.jsonl"
FIELDS = ["timestamp", "recipe", "protocol", "metric", "value", "ci_low", "ci_high", "n_patients", "n_positive",
          "folds", "seconds", "load", "command"]
R = PatientRecipe
# name -> (feature variant, training-only augmented variants, recipe)
RECIPES: dict[str, tuple[str, tuple[str, ...], PatientRecipe]] = {
    "lite0-160-meanprob": ("lite0-160", (), R(head="meanprob")),
    "lite0-160-meanpool": ("lite0-160", (), R(head="meanpool")),
    "lite0-96-meanpool": ("lite0-96", (), R(image_size=96, head="meanpool")),
    "lite2-160-meanpool": ("lite2-160", (), R(backbone="efficientnet_lite2", head="meanpool")),
    "lite2-96-meanpool": ("lite2-96", (), R(backbone="efficientnet_lite2", image_size=96, head="meanpool")),
    "lite0-160-meanpool-wd1": ("lite0-160", (), R(head="meanpool", weight_decay=1.0)),
    "lite0-160-meanpool-wd0.1": ("lite0-160", (), R(head="meanpool", weight_decay=0.1)),
    "lite0-160-meanpool-refit": ("lite0-160", (), R(head="meanpool", ensemble="refit")),
    "lite0-160-meanpool-blasts": ("lite0-160", (), R(head="meanpool", cells="blasts")),
    "lite0-160-meanprob-blasts": ("lite0-160", (), R(head="meanprob", cells="blasts")),
    "lite0-160-meanpool-types": ("lite0-160", (), R(head="meanpool", cell_type_features=True)),
    "lite0-160-attention": ("lite0-160", (), R(head="attention")),
    "lite0-160-attention-types": ("lite0-160", (), R(head="attention", cell_type_features=True)),
    "lite0-160-attention-blasts": ("lite0-160", (), R(head="attention", cells="blasts")),
    "lite0-160-meanpool-jitter": ("lite0-160", ("lite0-160-jitter1", "lite0-160-jitter2"), R(head="meanpool")),
    "lite0-160-attention-jitter": ("lite0-160", ("lite0-160-jitter1", "lite0-160-jitter2"), R(head="attention")),
    "lite0-160-meanprob-jitter": ("lite0-160", ("lite0-160-jitter1", "lite0-160-jitter2"), R(head="meanprob")),
    "lite0-96-meanprob": ("lite0-96", (), R(image_size=96, head="meanprob")),
    "lite2-160-meanprob": ("lite2-160", (), R(backbone="efficientnet_lite2", head="meanprob")),
}


class Cohort:
    """apl_aml's patients in id order with their cells' features (per cached variant) and cell types."""

    def __init__(self, data: Path, cache: Path) -> None:
        self.manifest = scan_dataset(data)
        self.cache = cache
        self.patients: list[str] = []
        self.index: dict[str, list[int]] = {}
        from leukfed.common.patient_model import patient_cells

        for patient, rows in patient_cells(self.manifest).items():
            self.patients.append(patient)
            self.index[patient] = [i for _, i, _ in rows]
        self.labels = np.array([int(self.manifest.samples[self.index[p][0]].label == "APL") for p in self.patients])
        self.types = [cell_type_of(s.path.split("/", 1)[1]) for s in self.manifest.samples]
        self.vocabulary = tuple(sorted(set(self.types)))
        self._features: dict[str, np.ndarray] = {}

    def features(self, variant: str) -> np.ndarray:
        if variant not in self._features:
            paths = [s.path for s in self.manifest.samples]
            shas = [s.sha256 for s in self.manifest.samples]
            self._features[variant] = load_feature_cache(cache_path(self.cache, variant), paths, shas)
        return self._features[variant]

    def bags(self, variant: str, recipe: PatientRecipe) -> list[np.ndarray]:
        feats = self.features(variant)
        return [bag_features(feats[self.index[p]], [self.types[i] for i in self.index[p]], recipe,
                             self.vocabulary)[0] for p in self.patients]


def run_fold(cohort: Cohort, name: str, fold: PatientFold) -> dict:
    """Fit on the fold's training patients (inner CV for temperature and threshold), score its test patients."""
    variant, views, recipe = RECIPES[name]
    position = {p: i for i, p in enumerate(cohort.patients)}
    train = np.array([position[p] for p in fold.train])
    test = np.array([position[p] for p in fold.test])
    bags = cohort.bags(variant, recipe)
    view_bags = [cohort.bags(v, recipe) for v in views]
    heads, temperature, threshold, validation = fit_ensemble(
        recipe, [bags[i] for i in train], cohort.labels[train], views=[[vb[i] for i in train] for vb in view_bags])
    logits, _ = ensemble_logits(heads, [bags[i] for i in test])
    return {"test": test, "logits": logits, "prob": sigmoid(logits / temperature), "threshold": threshold,
            "temperature": temperature, "validation": validation}


def summarise(cohort: Cohort, outcomes: list[dict], folds: list[PatientFold]) -> tuple[dict, dict]:
    """Metrics over the folds: AUC of the patients' mean test probability (over repeats) with a patient
    bootstrap CI, the mean fold AUC, sensitivity/specificity at each fold's validation threshold, ECE."""
    n = len(cohort.patients)
    prob_sum, count = np.zeros(n), np.zeros(n)
    flagged_sum = np.zeros(n)
    fold_aucs, raw_sum = [], np.zeros(n)
    for out in outcomes:
        prob_sum[out["test"]] += out["prob"]
        raw_sum[out["test"]] += sigmoid(out["logits"])
        flagged_sum[out["test"]] += out["prob"] >= out["threshold"]
        count[out["test"]] += 1
        auc = binary_auc(cohort.labels[out["test"]], out["logits"])
        if auc is not None:
            fold_aucs.append(auc)
    seen = count > 0
    y, prob = cohort.labels[seen], prob_sum[seen] / count[seen]
    flagged = flagged_sum[seen] / count[seen]  # fraction of repeats in which the patient was flagged
    auc = binary_auc(y, prob)
    low, high = patient_bootstrap_ci(y, prob)
    sens = float(flagged[y == 1].mean())
    spec = float(1 - flagged[y == 0].mean())
    metrics = {
        "auc": (auc, low, high),
        "fold_auc_mean": (float(np.mean(fold_aucs)), *_t_interval(fold_aucs)),
        "sensitivity_at_val_threshold": (sens, None, None),
        "specificity_at_val_threshold": (spec, None, None),
        "ece_calibrated": (expected_calibration_error(y, prob), None, None),
        "ece_uncalibrated": (expected_calibration_error(y, raw_sum[seen] / count[seen]), None, None),
        "val_auc_mean": (float(np.mean([o["validation"]["auc"] for o in outcomes])), None, None),
        "threshold_mean": (float(np.mean([o["threshold"] for o in outcomes])), None, None),
        "temperature_mean": (float(np.mean([o["temperature"] for o in outcomes])), None, None),
    }
    detail = {"patients": [p for p, s in zip(cohort.patients, seen) if s], "label": y.tolist(),
              "prob": prob.tolist(), "reliability": reliability_bins(y, prob, 5), "folds": len(folds)}
    return metrics, detail


def _t_interval(values: list[float]) -> tuple[float | None, float | None]:
    """95 % interval of the mean fold AUC (t, folds treated as independent: optimistic for repeats)."""
    if len(values) < 2:
        return None, None
    from statistics import stdev

    half = 2.0 * stdev(values) / np.sqrt(len(values))
    return float(np.mean(values) - half), float(np.mean(values) + half)


def protocol_folds(cohort: Cohort, protocol: str, repeats: int) -> list[PatientFold]:
    temporal = temporal_split(cohort.patients, cohort.labels.tolist())
    if protocol == "temporal":
        return [temporal]
    if protocol == "cv":  # on the temporal training patients only: selection never sees the latest patients
        position = {p: i for i, p in enumerate(cohort.patients)}
        y = [int(cohort.labels[position[p]]) for p in temporal.train]
        return repeated_cv(temporal.train, y, folds=5, repeats=repeats, seed=0)
    if protocol == "cv-all":
        return repeated_cv(cohort.patients, cohort.labels.tolist(), folds=5, repeats=repeats, seed=0)
    raise SystemExit(f"unknown protocol {protocol}")


def plot_reliability(name: str) -> Path:
    """Reliability diagram of a recipe's calibrated probabilities (CV and temporal) from apl-predictions.jsonl."""
    from leukfed.common.plots import plot_curves

    series: dict[str, list[tuple[float, float]]] = {"perfect": [(0.0, 0.0), (1.0, 1.0)]}
    for line in PREDICTIONS.read_text().splitlines():
        row = json.loads(line)
        if row["recipe"] == name:
            series[row["protocol"]] = [(b["mean_prob"], b["positive_rate"]) for b in row["reliability"] if b["count"]]
    out = RESULTS.parent.parent / "docs" / "figures" / f"apl-reliability-{name}.png"  # plots live under docs/
    return plot_curves(series, out, xlabel="predicted APL probability (5 bins)", ylabel="observed APL rate",
                       title=f"{name}: reliability (temperature-scaled)")


def markdown_table() -> str:
    """The RESULTS.md table: per recipe, CV (on the earlier patients) and temporal-split figures."""
    rows: dict[str, dict[str, dict[str, dict]]] = {}
    with CSV_PATH.open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["recipe"], {}).setdefault(r["protocol"], {})[r["metric"]] = r
    out = ["| recipe | CV AUC [95 % CI] | CV sens / spec | temporal AUC [95 % CI] | temporal sens / spec | "
           "temporal ECE (raw -> scaled) | CV folds | CV seconds |", "|---|---|---|---|---|---|---|---|"]

    def auc(m: dict) -> str:
        a = m["auc"]
        return f"{float(a['value']):.3f} [{float(a['ci_low']):.3f}, {float(a['ci_high']):.3f}]"

    def ss(m: dict) -> str:
        return (f"{float(m['sensitivity_at_val_threshold']['value']):.2f} / "
                f"{float(m['specificity_at_val_threshold']['value']):.2f}")

    for name, by in rows.items():
        cv, tp = by.get("cv"), by.get("temporal")
        ece = (f"{float(tp['ece_uncalibrated']['value']):.3f} -> {float(tp['ece_calibrated']['value']):.3f}"
               if tp else "")
        out.append(f"| {name} | {auc(cv) if cv else ''} | {ss(cv) if cv else ''} | {auc(tp) if tp else ''} | "
                   f"{ss(tp) if tp else ''} | {ece} | {cv['auc']['folds'] if cv else ''} | "
                   f"{cv['auc']['seconds'] if cv else ''} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEUK_DATA_ROOT", "../shared/datasets")) / "apl_aml")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LEUK_FEATURE_CACHE", "/tmp/leukfed-apl-features")))
    parser.add_argument("--recipes", default="lite0-160-meanpool")
    parser.add_argument("--protocols", default="cv,temporal")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table", action="store_true", help="only print the markdown table of apl.csv")
    parser.add_argument("--reliability", metavar="RECIPE", help="only plot this recipe's reliability diagram")
    args = parser.parse_args()
    if args.table:
        print(markdown_table())
        return
    if args.reliability:
        print(plot_reliability(args.reliability))
        return
    torch.set_num_threads(2)
    cohort = Cohort(args.data, args.cache)
    done = recorded_keys(CSV_PATH, "recipe", "protocol")
    command = "python benchmarks/apl.py " + " ".join(sys.argv[1:])
    for name in args.recipes.split(","):
        for protocol in args.protocols.split(","):
            if (name, protocol) in done:
                print(f"{name} {protocol}: already in {CSV_PATH.name}")
                continue
            folds = protocol_folds(cohort, protocol, args.repeats)
            start = time.perf_counter()
            outcomes = [run_fold(cohort, name, fold) for fold in folds]
            metrics, detail = summarise(cohort, outcomes, folds)
            seconds = round(time.perf_counter() - start, 1)
            y = np.array(detail["label"])
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            load = f"{os.getloadavg()[0]:.1f}"
            append_csv(CSV_PATH, FIELDS, [{"timestamp": stamp, "recipe": name, "protocol": protocol, "metric": m,
                          "value": _fmt(v), "ci_low": _fmt(lo), "ci_high": _fmt(hi), "n_patients": len(y),
                          "n_positive": int(y.sum()), "folds": len(folds), "seconds": seconds, "load": load,
                          "command": command} for m, (v, lo, hi) in metrics.items()])
            with PREDICTIONS.open("a") as f:
                f.write(json.dumps({"recipe": name, "protocol": protocol, **detail}) + "\n")
            auc, low, high = metrics["auc"]
            print(f"{name:32s} {protocol:9s} AUC {auc:.3f} [{low:.3f}, {high:.3f}]  sens "
                  f"{metrics['sensitivity_at_val_threshold'][0]:.2f} spec {metrics['specificity_at_val_threshold'][0]:.2f}"
                  f"  ECE {metrics['ece_calibrated'][0]:.3f}  ({seconds:.0f} s)", flush=True)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    run_guarded(main)
