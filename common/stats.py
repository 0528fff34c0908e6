"""Confidence intervals and paired tests: bootstrap over images or patients, t-statistics over seeds."""
from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukfed.common.atomic import atomic_write_bytes, atomic_write_json
from leukfed.common.errors import LeukError
from leukfed.common.metrics import classification_metrics, pool_by_patient

# Which interval, and why (every function below uses it):
# * PERCENTILE bootstrap: the 2.5th and 97.5th percentiles of the statistic over resamples. It needs
#   no normal approximation, respects the [0, 1] range of these metrics and any monotone transform,
#   and costs one metric computation per resample (BCa would add a jackknife: N more for each AUC).
#   Its known weakness: with few units (a dozen patients) it is too narrow; read it as a lower
#   bound on the uncertainty there.
# * STRATIFIED by class: each resample keeps the class counts of the test set (its units drawn with
#   replacement within each class), as our splits fix them by stratifying; every resample then has
#   every class, so AUC, sensitivity and specificity are always defined. The interval is therefore
#   conditional on the class counts (a model that always predicts one class gets a zero-width
#   accuracy interval on a balanced test set).
# * The resampled UNIT is the image, or the patient (cluster bootstrap: a drawn patient brings all of
#   its cells) whenever patient ids are known: cells of one patient are not independent, and
#   resampling them one by one would give too narrow an interval.
LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
Units = list[np.ndarray]


def headline_keys(class_names: Sequence[str]) -> tuple[str, ...]:
    """The metrics that get an interval, named as `classification_metrics` names them: with 2 classes
    AUC, sensitivity and specificity of class 1; otherwise their macro (one-vs-rest) averages."""
    if len(class_names) == 2:
        return ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")
    return ("accuracy", "balanced_accuracy", "auc_ovr", "macro_sensitivity", "macro_specificity")


def headline(y_true: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    metrics = classification_metrics(y_true, proba, class_names)
    return {key: metrics[key] for key in headline_keys(class_names)}


def _units(labels: np.ndarray, groups: Sequence[str] | None) -> tuple[Units | None, np.ndarray]:
    """Resampling units (index arrays; None: each sample is one) and each unit's stratum (its class;
    -1 for all when a group mixes classes)."""
    if groups is None:
        return None, labels.copy()
    if len(groups) != len(labels) or any(g is None for g in groups):
        raise ValueError("groups must give an id for every sample")
    _, inverse = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    units = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    pure = all(len(np.unique(labels[u])) == 1 for u in units)
    strata = np.array([labels[u[0]] if pure else -1 for u in units])
    return units, strata


def _resamples(units: Units | None, strata: np.ndarray, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Sample indices of each stratified resample (units drawn with replacement within their stratum)."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for _ in range(n_resamples):
        drawn = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        yield drawn if units is None else np.concatenate([units[u] for u in drawn])


def _replicates(probas: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
                groups: Sequence[str] | None, n_resamples: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{model: {metric: values over resamples}} (NaN where a resample leaves a metric undefined). Every
    model is scored on the same resamples, so differences between models are paired replicate by replicate."""
    units, strata = _units(labels, groups)
    keys = headline_keys(class_names)
    out = {name: {key: np.full(n_resamples, np.nan) for key in keys} for name in probas}
    for r, index in enumerate(_resamples(units, strata, n_resamples, seed)):
        for name, proba in probas.items():
            for key, value in headline(labels[index], proba[index], class_names).items():
                if value is not None:
                    out[name][key][r] = value
    return out


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 quantiles of the defined replicates (None without any)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_p_value(differences: np.ndarray) -> float | None:
    """Two-sided p for "no difference": twice the smaller share of replicates on either side of 0,
    with the +1 correction ((k+1)/(B+1)), so the smallest reportable p is 2/(B+1). It is the p that
    matches the percentile interval (p < 0.05 when 0 lies outside the 95 % interval)."""
    differences = differences[~np.isnan(differences)]
    n = len(differences)
    if n == 0:
        return None
    below = (np.count_nonzero(differences <= 0) + 1) / (n + 1)
    above = (np.count_nonzero(differences >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


def _paired(observed_a: dict, observed_b: dict, replicates_a: dict, replicates_b: dict, level: float) -> dict:
    out = {}
    for key in observed_a:
        defined = observed_a[key] is not None and observed_b[key] is not None
        differences = replicates_a[key] - replicates_b[key]
        out[key] = {"diff": observed_a[key] - observed_b[key] if defined else None,
                    "ci": percentile_interval(differences, level), "p": bootstrap_p_value(differences)}
    return out


def bootstrap_ci(y_true: Any, proba: Any, class_names: Sequence[str], *, groups: Sequence[str] | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float] | None]:
    """{metric: [lo, hi]}: stratified percentile bootstrap of the headline metrics; with `groups`
    (patient ids) whole groups are resampled (cluster bootstrap), else single images."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    replicates = _replicates({"model": p}, y, class_names, groups, n_resamples, seed)["model"]
    return {key: percentile_interval(v, level) for key, v in replicates.items()}


def paired_bootstrap(y_true: Any, proba_a: Any, proba_b: Any, class_names: Sequence[str], *,
                     groups: Sequence[str] | None = None, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """{metric: {"diff", "ci", "p"}} for model A minus model B scored on the SAME samples: each
    resample draws one set of images (or patients) and scores both models on it, so the interval of
    the difference is not widened by the variation both models share."""
    y = np.asarray(y_true, dtype=np.int64)
    a, b = np.asarray(proba_a, dtype=np.float64), np.asarray(proba_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two models' probabilities differ in shape: {a.shape} and {b.shape}")
    replicates = _replicates({"a": a, "b": b}, y, class_names, groups, n_resamples, seed)
    return _paired(headline(y, a, class_names), headline(y, b, class_names), replicates["a"], replicates["b"], level)


# --- across seeds: the seed is the unit; t-statistics on a handful of values --------------------------

def _t_interval(values: np.ndarray, level: float) -> list[float] | None:
    """mean ± t(n-1) · sd / sqrt(n): exact under normality, the usual choice for 3 to 10 seeds (a
    bootstrap over 3 values would be meaningless). Not clipped to [0, 1]: with 2 seeds (t = 12.7) it
    says honestly that two seeds say little."""
    from scipy import stats

    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def across_seeds(values: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """{"mean", "sd", "ci", "values", "n"} of one metric over seeds (None values, undefined in a seed,
    are kept in `values` and left out of the statistics)."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"mean": float(defined.mean()) if len(defined) else None,
            "sd": float(defined.std(ddof=1)) if len(defined) > 1 else None,
            "ci": _t_interval(defined, level), "values": list(values), "n": int(len(defined))}


def paired_t(values_a: Sequence[float | None], values_b: Sequence[float | None], level: float = LEVEL) -> dict[str, Any]:
    """{"diff", "ci", "p", "test": "paired t", "n"}: A minus B over seeds where both are defined; p
    from scipy.stats.ttest_rel (two-sided). Identical differences in every seed give no t: p is 1.0
    when they are all 0, else None (undefined)."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(values_a, values_b) if a is not None and b is not None]
    diffs = np.asarray([a - b for a, b in pairs], dtype=np.float64)
    out: dict[str, Any] = {"diff": float(diffs.mean()) if len(diffs) else None, "ci": _t_interval(diffs, level),
                           "p": None, "test": "paired t", "n": int(len(diffs))}
    if len(diffs) >= 2 and np.ptp(diffs) > 0:
        out["p"] = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    elif len(diffs) >= 2 and not diffs.any():
        out["p"] = 1.0
    return out


# --- raw predictions: what every interval above is computed from --------------------------------------

@dataclass(frozen=True)
class Predictions:
    """One model's scores on one evaluation set, image by image."""

    proba: np.ndarray                  # (N, C) class probabilities
    labels: np.ndarray                 # (N,) true class index
    class_names: tuple[str, ...]
    paths: tuple[str, ...]             # sample paths relative to the dataset root
    patients: tuple[str | None, ...]   # patient id per image, None when the layout has none

    def has_patients(self) -> bool:
        return len(self.patients) > 0 and all(p is not None for p in self.patients)


def save_predictions(path: str | Path, pred: Predictions) -> Path:
    """Write predictions as .npz (allow_pickle=False readable) or, for a .json path, as JSON."""
    path = Path(path)
    patients = ["" if p is None else str(p) for p in pred.patients]
    if path.suffix == ".json":
        return atomic_write_json(path, {"class_names": list(pred.class_names), "paths": list(pred.paths),
                                        "patients": [p or None for p in patients], "labels": pred.labels.tolist(),
                                        "proba": pred.proba.tolist()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, proba=pred.proba.astype(np.float32), labels=pred.labels.astype(np.int64),
                        class_names=np.asarray(pred.class_names, dtype=str), paths=np.asarray(pred.paths, dtype=str),
                        patients=np.asarray(patients, dtype=str))
    return atomic_write_bytes(path, buffer.getvalue())


def load_predictions(path: str | Path) -> Predictions:
    """Read a file written by `save_predictions` (LeukError when it is missing or malformed)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key].tolist() for key in npz.files}
        proba = np.asarray(raw["proba"], dtype=np.float64).reshape(len(raw["labels"]), len(raw["class_names"]))
        pred = Predictions(proba, np.asarray(raw["labels"], dtype=np.int64), tuple(raw["class_names"]),
                           tuple(raw["paths"]), tuple(p or None for p in raw["patients"]))
    except FileNotFoundError:
        raise LeukError(f"predictions file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LeukError(f"predictions file {path} is unreadable: {exc}") from None
    if not len(pred.paths) == len(pred.patients) == len(pred.labels):
        raise LeukError(f"predictions file {path} is inconsistent: paths, patients and labels differ in length")
    return pred


def _same_images(preds: Sequence[Predictions]) -> None:
    first = preds[0]
    for other in preds[1:]:
        if other.paths != first.paths or other.class_names != first.class_names or not np.array_equal(other.labels, first.labels):
            raise LeukError("a paired comparison needs every model scored on the same images, in the same order")


def compare(preds: Mapping[str, Predictions], reference: str | None = None, n_resamples: int = DEFAULT_RESAMPLES,
            seed: int = 0) -> dict[str, dict[str, Any]]:
    """Several models scored on the same images, all on the same resamples (one pass, not one per pair):
    {model: {"image": {metric: [lo, hi]}, "patient": ... or None, "paired_image": {metric: {"diff",
    "ci", "p"}} (model minus `reference`; absent for the reference itself), "paired_patient", "unit",
    "resamples", "seed", "level", "method"}}. Image-level metrics resample patients when known."""
    names = list(preds)
    _same_images([preds[n] for n in names])
    first = preds[names[0]]
    groups = list(first.patients) if first.has_patients() else None
    levels = {"image": (first.labels, {n: preds[n].proba for n in names}, groups)}
    if groups is not None:
        pooled = {n: pool_by_patient(first.labels, preds[n].proba, groups, first.class_names) for n in names}
        levels["patient"] = (pooled[names[0]][1], {n: pooled[n][2] for n in names}, None)
    out: dict[str, dict[str, Any]] = {n: {"patient": None, **_about(groups, n_resamples, seed)} for n in names}
    for level, (labels, probas, level_groups) in levels.items():
        replicates = _replicates(probas, labels, first.class_names, level_groups, n_resamples, seed)
        observed = {n: headline(labels, probas[n], first.class_names) for n in names}
        for n in names:
            out[n][level] = {key: percentile_interval(v) for key, v in replicates[n].items()}
            if reference in preds and n != reference:
                out[n][f"paired_{level}"] = _paired(observed[n], observed[reference], replicates[n],
                                                    replicates[reference], LEVEL)
    return out


def intervals(pred: Predictions, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The bootstrap CIs of one model: {"image": {metric: [lo, hi]}, "patient": {...} or None, "unit",
    "resamples", "seed", "level", "method"}."""
    return compare({"model": pred}, None, n_resamples, seed)["model"]


def _about(groups, n_resamples: int, seed: int) -> dict[str, Any]:
    return {"unit": "patient" if groups is not None else "image", "resamples": n_resamples, "seed": seed,
            "level": LEVEL, "method": "stratified percentile bootstrap"}
