"""Confidence intervals and paired tests: bootstrap over images or patients, t-statistics over seeds."""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
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
#   every class, so AUC, sensitivity and specificity are always defined.
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


def _replicates(statistic: Callable[[np.ndarray], dict[str, float | None]], labels: np.ndarray,
                groups: Sequence[str] | None, n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The statistic's values over resamples, per key; undefined values (None) are left out."""
    units, strata = _units(labels, groups)
    values: dict[str, list[float]] = {}
    for index in _resamples(units, strata, n_resamples, seed):
        for key, value in statistic(index).items():
            values.setdefault(key, [])
            if value is not None:
                values[key].append(float(value))
    return {key: np.asarray(v) for key, v in values.items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 quantiles of the replicates (None without any)."""
    if len(values) == 0:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(y_true: Any, proba: Any, class_names: Sequence[str], *, groups: Sequence[str] | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict[str, list[float] | None]:
    """{metric: [lo, hi]}: stratified percentile bootstrap of the headline metrics; with `groups`
    (patient ids) whole groups are resampled (cluster bootstrap), else single images."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    replicates = _replicates(lambda i: headline(y[i], p[i], class_names), y, groups, n_resamples, seed)
    return {key: percentile_interval(v, level) for key, v in replicates.items()}


def bootstrap_p_value(differences: np.ndarray) -> float | None:
    """Two-sided p for "no difference": twice the smaller share of replicates on either side of 0,
    with the +1 correction ((k+1)/(B+1)), so the smallest reportable p is 2/(B+1). It is the p that
    matches the percentile interval (p < 0.05 when 0 lies outside the 95 % interval)."""
    n = len(differences)
    if n == 0:
        return None
    below = (np.count_nonzero(differences <= 0) + 1) / (n + 1)
    above = (np.count_nonzero(differences >= 0) + 1) / (n + 1)
    return float(min(1.0, 2 * min(below, above)))


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

    def difference(index: np.ndarray) -> dict[str, float | None]:
        first, second = headline(y[index], a[index], class_names), headline(y[index], b[index], class_names)
        return {k: None if first[k] is None or second[k] is None else first[k] - second[k] for k in first}

    observed = difference(np.arange(len(y)))
    replicates = _replicates(difference, y, groups, n_resamples, seed)
    return {key: {"diff": observed[key], "ci": percentile_interval(replicates[key], level),
                  "p": bootstrap_p_value(replicates[key])} for key in observed}


# --- across seeds: the seed is the unit; t-statistics on a handful of values --------------------------

def _t_interval(values: np.ndarray, level: float) -> list[float] | None:
    """mean ± t(n-1) · sd / sqrt(n): exact under normality, the usual choice for 3 to 10 seeds (a
    bootstrap over 3 values would be meaningless)."""
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


def intervals(pred: Predictions, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The bootstrap CIs of one model: {"image": {metric: [lo, hi]}, "patient": {...} or None,
    "unit", "resamples", "seed", "level", "method"}. Image-level metrics resample patients when known."""
    groups = list(pred.patients) if pred.has_patients() else None
    out = {"image": bootstrap_ci(pred.labels, pred.proba, pred.class_names, groups=groups,
                                 n_resamples=n_resamples, seed=seed), "patient": None}
    if groups is not None:
        _, labels, mean = pool_by_patient(pred.labels, pred.proba, groups, pred.class_names)
        out["patient"] = bootstrap_ci(labels, mean, pred.class_names, n_resamples=n_resamples, seed=seed)
    return {**out, **_about(groups, n_resamples, seed)}


def paired_intervals(a: Predictions, b: Predictions, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> dict[str, Any]:
    """A minus B on the same images: {"image": {metric: {"diff", "ci", "p"}}, "patient": ... or None, ...}."""
    if a.paths != b.paths or a.class_names != b.class_names or not np.array_equal(a.labels, b.labels):
        raise LeukError("a paired comparison needs both models scored on the same images, in the same order")
    groups = list(a.patients) if a.has_patients() else None
    out = {"image": paired_bootstrap(a.labels, a.proba, b.proba, a.class_names, groups=groups,
                                     n_resamples=n_resamples, seed=seed), "patient": None}
    if groups is not None:
        _, labels, mean_a = pool_by_patient(a.labels, a.proba, groups, a.class_names)
        _, _, mean_b = pool_by_patient(b.labels, b.proba, groups, b.class_names)
        out["patient"] = paired_bootstrap(labels, mean_a, mean_b, a.class_names, n_resamples=n_resamples, seed=seed)
    return {**out, **_about(groups, n_resamples, seed)}


def _about(groups, n_resamples: int, seed: int) -> dict[str, Any]:
    return {"unit": "patient" if groups is not None else "image", "resamples": n_resamples, "seed": seed,
            "level": LEVEL, "method": "stratified percentile bootstrap"}
