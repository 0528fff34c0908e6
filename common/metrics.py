"""Classification metrics as clinicians read them: cell and patient level, JSON-ready (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Conventions (the same as scikit-learn's defaults with ``zero_division=0``):
# * predicted class = argmax of the probability row (the first index wins a tie);
# * any ratio whose denominator is 0 (precision of a never-predicted class, recall of a class
#   absent from ``y_true``, ...) is reported as 0.0, never NaN;
# * macro precision / sensitivity / specificity / F1 average over the classes that occur in
#   ``y_true`` or in the predictions (so a perfect classifier scores 1.0 on a test set that lacks
#   a class); ``balanced_accuracy`` averages recall over the classes present in ``y_true``;
# * a class's one-vs-rest AUC is None when it has no positive or no negative sample, and such
#   classes are left out of the macro ``auc_ovr`` (None when no class is computable).

_LOG_EPS = 1e-15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class, shape (C, C), dtype int64."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (the zero-division convention of this module)."""
    return float(num) / float(den) if den else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` where tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_mask = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], len(xs)]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(starts_mask) - 1]
    return ranks


def _as_binary(y_binary: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_binary)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_binary and score must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_binary must contain only 0/1 (or booleans)")
    if not np.isfinite(s).all():
        raise ValueError("score contains NaN or infinite values")
    return y.astype(bool), s


def binary_auc(y_binary: Any, score: Any) -> float | None:
    """ROC AUC by the Mann-Whitney rank formula (ties count 1/2); None without both classes."""
    y, s = _as_binary(y_binary, score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(y_binary: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) at threshold +inf down to each distinct score.

    A point i means "predict positive when score >= thresholds[i]". Without positives (negatives)
    tpr (fpr) is all 0.0, following the zero-division convention.
    """
    y, s = _as_binary(y_binary, score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], dtype=int)
    tps = np.r_[0, np.cumsum(y)[last]].astype(np.float64)
    fps = np.r_[0, last + 1 - tps[1:]].astype(np.float64)
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = tps / n_pos if n_pos else np.zeros_like(tps)
    fpr = fps / n_neg if n_neg else np.zeros_like(fps)
    return fpr, tpr, np.r_[np.inf, s[last]]


def _validate(y_true: Any, proba: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    c = len(class_names)
    if c < 2 or len(set(class_names)) != c:
        raise ValueError(f"need at least 2 distinct class names, got {list(class_names)}")
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if p.shape != (len(y), c):
        raise ValueError(f"proba must have shape ({len(y)}, {c}), got {p.shape}")
    if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= c:
        raise ValueError(f"y_true must hold integer class indices in [0, {c})")
    if not np.isfinite(p).all():
        raise ValueError("proba contains NaN or infinite values")
    return y.astype(np.int64), p


def _per_class(cm: np.ndarray, y: np.ndarray, p: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    n = int(cm.sum())
    out: dict[str, dict] = {}
    for k, name in enumerate(names):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = n - tp - fn - fp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        out[name] = {
            "precision": precision,
            "recall": recall,
            "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "support": tp + fn,
            "auc": binary_auc(y == k, p[:, k]),
        }
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log probability of the true class, clipped to [1e-15, 1] (no renormalising)."""
    p_true = np.clip(p[np.arange(len(y)), y], _LOG_EPS, 1.0)
    return float(-np.log(p_true).mean())


def classification_metrics(y_true: Any, proba: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro averages, per-class sensitivity/specificity/AUC, confusion matrix, log loss.

    ``y_true`` holds class indices (N,), ``proba`` class probabilities (N, C). Every value is a plain
    Python type (json.dumps-able with allow_nan=False). With exactly 2 classes, class index 1 is
    the positive class and ``auc``, ``sensitivity`` and ``specificity`` refer to it.
    """
    names = [str(c) for c in class_names]
    y, p = _validate(y_true, proba, names)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(names))
    per_class = _per_class(cm, y, p, names)
    in_true = cm.sum(axis=1) > 0
    seen = in_true | (cm.sum(axis=0) > 0)
    rows = [per_class[n] for n, s in zip(names, seen) if s]
    aucs = [r["auc"] for r in per_class.values() if r["auc"] is not None]
    out: dict[str, Any] = {
        "num_samples": len(y),
        "accuracy": _ratio(np.trace(cm), len(y)),
        "balanced_accuracy": _mean([per_class[n]["recall"] for n, t in zip(names, in_true) if t]),
        "macro_f1": _mean([r["f1"] for r in rows]),
        "macro_precision": _mean([r["precision"] for r in rows]),
        "macro_sensitivity": _mean([r["recall"] for r in rows]),
        "macro_specificity": _mean([r["specificity"] for r in rows]),
        "auc_ovr": _mean(aucs) if aucs else None,
        "log_loss": _log_loss(y, p),
        "class_names": names,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    if len(names) == 2:
        positive = per_class[names[1]]
        out.update(auc=positive["auc"], sensitivity=positive["sensitivity"],
                   specificity=positive["specificity"])
    return out


def _group_by_patient(patients: Sequence[str], n: int) -> dict[str, np.ndarray]:
    if len(patients) != n:
        raise ValueError(f"got {len(patients)} patient ids for {n} samples")
    if any(pid is None for pid in patients):
        raise ValueError("every sample needs a patient id (found None)")
    unique, inverse = np.unique(np.asarray([str(pid) for pid in patients]), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
    return {str(pid): idx for pid, idx in zip(unique, np.split(order, bounds))}


def patient_metrics(y_true: Any, proba: Any, patients: Sequence[str],
                    class_names: Sequence[str]) -> dict[str, Any]:
    """Patient-level metrics: each patient's cells are pooled by MEAN probability, then argmax.

    A patient's label is the label shared by all of its cells (ValueError when they disagree).
    Returns ``classification_metrics`` over patients plus ``num_patients``, ``num_cells`` and
    ``patients`` (sorted by id): [{patient, label, predicted, proba, num_cells}, ...].
    """
    y, p = _validate(y_true, proba, class_names)
    groups = _group_by_patient(patients, len(y))
    labels, means = [], []
    for pid, idx in groups.items():
        cell_labels = np.unique(y[idx])
        if len(cell_labels) != 1:
            raise ValueError(f"patient {pid!r} has cells with different labels: {cell_labels.tolist()}")
        labels.append(int(cell_labels[0]))
        means.append(p[idx].mean(axis=0))
    mean_proba = np.stack(means)
    out = classification_metrics(np.asarray(labels), mean_proba, class_names)
    names = out["class_names"]
    out["num_patients"] = len(groups)
    out["num_cells"] = len(y)
    out["patients"] = [
        {"patient": pid, "label": names[lab], "predicted": names[int(np.argmax(mp))],
         "proba": [float(v) for v in mp], "num_cells": len(idx)}
        for (pid, idx), lab, mp in zip(groups.items(), labels, mean_proba)
    ]
    return out


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.2f}%"


def _table(rows: list[list[str]], right_from: int = 1) -> list[str]:
    """Left-align columns before ``right_from`` and right-align the rest."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < right_from else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


_OVERALL = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("macro_precision", "macro precision"),
    ("macro_sensitivity", "macro sensitivity"),
    ("macro_specificity", "macro specificity"),
    ("auc_ovr", "macro AUC (one-vs-rest)"),
)


def _overall_rows(m: Mapping[str, Any]) -> list[list[str]]:
    rows = [[label, str(m[key])] for key, label in
            (("num_patients", "patients"), ("num_cells", "cells"), ("num_samples", "samples"))
            if key in m and not ("num_patients" in m and key == "num_samples")]
    rows += [[label, _pct(m[key])] for key, label in _OVERALL if key in m]
    names = m.get("class_names", [])
    if len(names) == 2 and "auc" in m:
        rows += [[f"{label} ({names[1]})", _pct(m[key])]
                 for key, label in (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                                    ("auc", "AUC"))]
    if m.get("log_loss") is not None:
        rows.append(["log loss", f"{float(m['log_loss']):.4f}"])
    return rows


def _class_rows(m: Mapping[str, Any]) -> list[list[str]]:
    rows = [["class", "precision", "sensitivity", "specificity", "F1", "AUC", "support"]]
    for name, r in m["per_class"].items():
        scores = [_pct(r.get(k)) for k in ("precision", "sensitivity", "specificity", "f1", "auc")]
        rows.append([name, *scores, str(r.get("support", ""))])
    return rows


def _confusion_rows(m: Mapping[str, Any]) -> list[list[str]]:
    names = list(m["class_names"])
    rows = [["true \\ predicted"] + names]
    rows += [[name] + [str(v) for v in row] for name, row in zip(names, m["confusion_matrix"])]
    return rows


def format_metrics_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """A plain-text report: overall metrics, per-class table, confusion matrix (percent, 2 decimals)."""
    lines: list[str] = []
    if title:
        lines += [title, "=" * len(title)]
    lines += _table(_overall_rows(metrics))
    if metrics.get("per_class"):
        lines += ["", *_table(_class_rows(metrics))]
    if metrics.get("confusion_matrix") is not None and metrics.get("class_names"):
        lines += ["", "confusion matrix (rows = true, columns = predicted)",
                  *_table(_confusion_rows(metrics))]
    return "\n".join(lines)


def pool_by_patient(y_true: Any, proba: Any, patients: Sequence[str],
                    class_names: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patient ids sorted, label per patient, mean cell probability per patient): the rows that
    ``patient_metrics`` scores (ValueError when a patient's cells disagree on the label)."""
    y, p = _validate(y_true, proba, class_names)
    ids, labels, means = [], [], []
    for pid, idx in _group_by_patient(patients, len(y)).items():
        cell_labels = np.unique(y[idx])
        if len(cell_labels) != 1:
            raise ValueError(f"patient {pid!r} has cells with different labels: {cell_labels.tolist()}")
        ids.append(pid)
        labels.append(int(cell_labels[0]))
        means.append(p[idx].mean(axis=0))
    return ids, np.asarray(labels, dtype=np.int64), np.stack(means)


def metrics_with_patients(y_true: Any, proba: Any, class_names: Sequence[str],
                          patients: Sequence[str | None] | None = None) -> dict[str, Any]:
    """``classification_metrics``, plus ``patient_level`` when every sample has a patient id."""
    out = classification_metrics(y_true, proba, class_names)
    if patients is not None and len(patients) and all(pid is not None for pid in patients):
        out["patient_level"] = patient_metrics(y_true, proba, list(patients), class_names)
    return out


def format_intervals_table(metrics: Mapping[str, Any], intervals: Mapping[str, Any], title: str) -> str:
    """Each metric with an interval: value and [lo, hi] in percent (2 decimals)."""
    rows = [["metric", "value", "95% CI"]]
    for key, ci in intervals.items():
        span = "n/a" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]"
        rows.append([key.replace("_", " "), _pct(metrics.get(key)), span])
    return "\n".join([title, "-" * len(title), *_table(rows, right_from=1)])
