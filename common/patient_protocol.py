"""Patient-level protocol: repeated stratified k-fold, a temporal split, validation thresholds, bootstrap CIs."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from leukfed.common.errors import LeukError
from leukfed.common.metrics import binary_auc


@dataclass(frozen=True)
class PatientFold:
    """One train/test division of patients (ids); `name` says which repeat/fold or "temporal"."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]


def natural_key(patient: str) -> tuple:
    """Sort key that orders Patient_2 before Patient_10 (digits compared as numbers)."""
    return tuple(int(t) if t.isdigit() else t.casefold() for t in re.split(r"(\d+)", patient))


def stratified_folds(labels: Sequence[int], k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index (0..k-1) per patient: each class shuffled and dealt round-robin from a random start."""
    y = np.asarray(labels)
    if k < 2:
        raise LeukError(f"need at least 2 folds, got {k}")
    counts = np.bincount(y, minlength=2)
    if counts.min() < k:
        raise LeukError(f"{k}-fold stratification needs >= {k} patients per class, have {counts.tolist()}")
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)  # the next class continues where this one stopped: fold sizes stay even
    return fold


def repeated_cv(patients: Sequence[str], labels: Sequence[int], *, folds: int = 5, repeats: int = 3,
                seed: int = 0) -> list[PatientFold]:
    """Repeated patient-level stratified k-fold: `repeats` x `folds` train/test divisions."""
    ids = np.asarray(list(patients))
    rng = np.random.default_rng(seed)
    out = []
    for r in range(repeats):
        fold = stratified_folds(labels, folds, rng)
        for f in range(folds):
            out.append(PatientFold(f"cv r{r} f{f}", tuple(ids[fold != f]), tuple(ids[fold == f])))
    return out


def temporal_split(patients: Sequence[str], labels: Sequence[int], *, test_fraction: float = 0.25) -> PatientFold:
    """Train on the earlier patients in id order, test on the latest `test_fraction` (a later cohort)."""
    if not 0 < test_fraction < 1:
        raise LeukError(f"test fraction must be between 0 and 1, got {test_fraction}")
    order = sorted(range(len(patients)), key=lambda i: natural_key(patients[i]))
    n_test = max(1, math.ceil(len(order) * test_fraction))
    train, test = order[:-n_test], order[-n_test:]
    y = np.asarray(labels)
    for side, idx in (("train", train), ("test", test)):
        if len(set(y[idx].tolist())) < 2:
            raise LeukError(f"temporal split: the {side} patients hold only one diagnosis")
    return PatientFold("temporal", tuple(patients[i] for i in train), tuple(patients[i] for i in test))


def threshold_for_sensitivity(y: Sequence[int], score: Sequence[float], target: float = 0.9) -> float:
    """Highest threshold t with sensitivity (score >= t among positives) >= `target` on these (validation)
    data (`choose_threshold`, with its margin for float noise)."""
    from leukfed.common.calibration import choose_threshold

    return choose_threshold(np.asarray(score), np.asarray(y) == 1, target)


def sensitivity_specificity(y: Sequence[int], score: Sequence[float], threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of flagging score >= threshold (nan where a class is absent)."""
    y, flagged = np.asarray(y), np.asarray(score) >= threshold
    sens = float(flagged[y == 1].mean()) if (y == 1).any() else float("nan")
    spec = float((~flagged[y == 0]).mean()) if (y == 0).any() else float("nan")
    return sens, spec


def patient_bootstrap_ci(y: Sequence[int], score: Sequence[float],
                         metric: Callable[[np.ndarray, np.ndarray], float | None] = binary_auc, *,
                         resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `metric` over patient resamples (stratified: each class resampled within itself)."""
    y, s = np.asarray(y), np.asarray(score, dtype=np.float64)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    values = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, len(g), replace=True) for g in groups])
        v = metric(y[idx], s[idx])
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def reliability_bins(y: Sequence[int], prob: Sequence[float], bins: int = 10) -> list[dict]:
    """Equal-width probability bins: mean predicted probability, observed positive rate, count."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "count": int((which == b).sum()),
             "mean_prob": float(p[which == b].mean()) if (which == b).any() else None,
             "positive_rate": float(y[which == b].mean()) if (which == b).any() else None}
            for b in range(bins)]


def expected_calibration_error(y: Sequence[int], prob: Sequence[float], bins: int = 10) -> float:
    """ECE: count-weighted |observed rate - mean probability| over equal-width bins."""
    rows = reliability_bins(y, prob, bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["positive_rate"] - r["mean_prob"]) for r in rows if r["count"]) / n)


def fit_temperature(logits: Sequence[float], y: Sequence[int]) -> float:
    """Temperature T minimising the log loss of sigmoid(logit / T) on validation data (grid, 0.05..20)."""
    z, t = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))
    losses = [float(np.mean(np.logaddexp(0, z / T) - t * z / T)) for T in grid]
    return float(grid[int(np.argmin(losses))])


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))
