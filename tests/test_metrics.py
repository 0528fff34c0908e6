"""Metrics against hand-computed values, and every plot writes a valid PNG atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from leukfed.common import plots
from leukfed.common.metrics import (
    binary_auc,
    classification_metrics,
    confusion_matrix,
    format_metrics_table,
    patient_metrics,
    roc_curve,
)

# Worked 3-class example, classes A=0, B=1, C=2, ten cells.
#   y_true = A A A A B B B C C C
#   y_pred = A A A B B B A C C A
# Each probability row gives 0.6 to the predicted class and 0.2 to the two others.
#
# Confusion matrix (rows = true, cols = predicted):   A  B  C
#                                               A  [ 3, 1, 0]
#                                               B  [ 1, 2, 0]
#                                               C  [ 1, 0, 2]
# accuracy = (3 + 2 + 2) / 10 = 0.7
#        TP FP FN TN   precision  recall  specificity  F1 = 2TP / (2TP + FP + FN)
#   A     3  2  1  4   3/5        3/4     4/6          6/9  = 2/3
#   B     2  1  1  6   2/3        2/3     6/7          4/6  = 2/3
#   C     2  0  1  7   1          2/3     7/7          4/5
# macro precision   = (3/5 + 2/3 + 1) / 3     = 34/45
# macro recall      = (3/4 + 2/3 + 2/3) / 3   = 25/36 (= balanced accuracy, every class present)
# macro specificity = (2/3 + 6/7 + 1) / 3     = 53/63
# macro F1          = (2/3 + 2/3 + 4/5) / 3   = 32/45
#
# One-vs-rest AUC, counting positive-vs-negative pairs (win = 1, tie = 1/2):
#   A: positives score 0.6 0.6 0.6 0.2; negatives (B B B C C C cells) 0.2 0.2 0.6 0.2 0.2 0.6
#      each 0.6 positive: 4 wins + 2 ties = 5 -> 15; the 0.2 positive: 4 ties = 2 -> 17 / 24
#   B: positives 0.6 0.6 0.2; negatives 0.2 x6 and one 0.6
#      each 0.6: 6 wins + 1 tie = 6.5 -> 13; the 0.2: 6 ties = 3 -> 16 / 21
#   C: positives 0.6 0.6 0.2; negatives all 0.2 (7)
#      each 0.6: 7 wins -> 14; the 0.2: 7 ties = 3.5 -> 17.5 / 21 = 5/6
# log loss = -(7 ln 0.6 + 3 ln 0.2) / 10   (7 correct cells at 0.6, 3 wrong ones at 0.2)
NAMES = ["A", "B", "C"]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 0])


def _proba(pred: np.ndarray, num_classes: int = 3, top: float = 0.6) -> np.ndarray:
    p = np.full((len(pred), num_classes), (1.0 - top) / (num_classes - 1))
    p[np.arange(len(pred)), pred] = top
    return p


@pytest.fixture(scope="module")
def worked() -> dict:
    return classification_metrics(Y_TRUE, _proba(Y_PRED), NAMES)


def test_confusion_matrix_and_accuracy(worked: dict) -> None:
    assert worked["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [1, 0, 2]]
    assert worked["accuracy"] == pytest.approx(0.7)
    assert worked["num_samples"] == 10
    assert worked["class_names"] == NAMES
    assert confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == worked["confusion_matrix"]


@pytest.mark.parametrize("name, precision, recall, specificity, f1, support", [
    ("A", 3 / 5, 3 / 4, 4 / 6, 2 / 3, 4),
    ("B", 2 / 3, 2 / 3, 6 / 7, 2 / 3, 3),
    ("C", 1.0, 2 / 3, 1.0, 4 / 5, 3),
])
def test_per_class(worked: dict, name: str, precision: float, recall: float, specificity: float,
                   f1: float, support: int) -> None:
    row = worked["per_class"][name]
    assert row["precision"] == pytest.approx(precision)
    assert row["recall"] == pytest.approx(recall)
    assert row["sensitivity"] == row["recall"]
    assert row["specificity"] == pytest.approx(specificity)
    assert row["f1"] == pytest.approx(f1)
    assert row["support"] == support


def test_macro_averages(worked: dict) -> None:
    assert worked["macro_precision"] == pytest.approx(34 / 45)
    assert worked["macro_sensitivity"] == pytest.approx(25 / 36)
    assert worked["balanced_accuracy"] == pytest.approx(25 / 36)
    assert worked["macro_specificity"] == pytest.approx(53 / 63)
    assert worked["macro_f1"] == pytest.approx(32 / 45)


def test_ovr_auc_and_log_loss(worked: dict) -> None:
    aucs = {"A": 17 / 24, "B": 16 / 21, "C": 5 / 6}
    for name, auc in aucs.items():
        assert worked["per_class"][name]["auc"] == pytest.approx(auc)
    assert worked["auc_ovr"] == pytest.approx(sum(aucs.values()) / 3)
    assert worked["log_loss"] == pytest.approx(-(7 * math.log(0.6) + 3 * math.log(0.2)) / 10)
    assert "auc" not in worked and "sensitivity" not in worked  # binary-only keys


def test_json_ready(worked: dict) -> None:
    assert json.loads(json.dumps(worked, allow_nan=False)) == worked
    assert type(worked["per_class"]["A"]["support"]) is int
    assert type(worked["accuracy"]) is float


def test_binary_auc_with_ties() -> None:
    # positives 0.8 0.4 0.4, negatives 0.1 0.4 0.9 (9 pairs):
    #   0.8 beats 0.1 and 0.4, loses to 0.9 -> 2; each 0.4 beats 0.1 and ties 0.4 -> 1.5 + 1.5
    #   AUC = (2 + 3) / 9
    y = [1, 1, 1, 0, 0, 0]
    s = [0.8, 0.4, 0.4, 0.1, 0.4, 0.9]
    assert binary_auc(y, s) == pytest.approx(5 / 9)
    fpr, tpr, thresholds = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 9)
    assert thresholds[0] == np.inf and list(thresholds[1:]) == [0.9, 0.8, 0.4, 0.1]
    assert fpr.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 0, 1 / 3, 1, 1])


def test_binary_perfect_and_inverted() -> None:
    y = np.array([0, 0, 0, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    perfect = classification_metrics(y, np.c_[1 - score, score], ["normal", "leukemia"])
    assert perfect["auc"] == 1.0 and perfect["auc_ovr"] == 1.0
    assert perfect["sensitivity"] == 1.0 and perfect["specificity"] == 1.0
    assert perfect["macro_f1"] == 1.0
    inverted = classification_metrics(y, np.c_[score, 1 - score], ["normal", "leukemia"])
    assert inverted["auc"] == 0.0
    assert inverted["sensitivity"] == 0.0 and inverted["specificity"] == 0.0
    assert binary_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_binary_sensitivity_specificity() -> None:
    # positive = class 1: TP 2, FN 1, TN 3, FP 1 -> sensitivity 2/3, specificity 3/4
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 0, 1])
    m = classification_metrics(y, _proba(pred, 2, 0.7), ["hem", "all"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["hem"]["sensitivity"] == pytest.approx(3 / 4)


def test_absent_class_auc_is_none() -> None:
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    m = classification_metrics(y, proba, NAMES)
    assert m["per_class"]["C"]["auc"] is None
    assert m["per_class"]["C"]["support"] == 0
    assert m["auc_ovr"] == pytest.approx(1.0)  # A and B perfectly ranked; C left out
    assert m["macro_f1"] == 1.0  # C neither true nor predicted: not in the macro mean
    assert m["per_class"]["C"]["precision"] == 0.0  # zero division -> 0.0
    only_a = classification_metrics(np.array([0, 0]), proba[:2], NAMES)
    assert only_a["auc_ovr"] is None
    assert all(r["auc"] is None for r in only_a["per_class"].values())
    assert binary_auc([1, 1], [0.2, 0.3]) is None


def test_predicted_but_absent_class_counts_in_macro() -> None:
    # true A A B B, predicted A C B B: C is predicted but never true -> precision 0, recall 0.
    m = classification_metrics(np.array([0, 0, 1, 1]), _proba(np.array([0, 2, 1, 1])), NAMES)
    assert m["macro_sensitivity"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3), NAMES)
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.full((2, 2), 0.5), NAMES)
    with pytest.raises(ValueError):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 3)), NAMES)


def test_patient_mean_probability_beats_majority_vote() -> None:
    # P-apl: 3 APL cells with p(APL) 0.55, 0.55, 0.00 -> majority vote says APL (2 of 3 cells),
    #        mean p(APL) = 1.1 / 3 = 0.367 -> predicted AML (wrong).
    # P-aml: 3 AML cells with p(APL) 0.45, 0.45, 1.00 -> majority vote says AML,
    #        mean p(APL) = 1.9 / 3 = 0.633 -> predicted APL (wrong).
    # So patient accuracy is 0 by mean probability where majority vote would give 1.
    names = ["AML", "APL"]
    p_apl = np.array([0.55, 0.55, 0.0, 0.45, 0.45, 1.0])
    y = np.array([1, 1, 1, 0, 0, 0])
    patients = ["P-apl"] * 3 + ["P-aml"] * 3
    m = patient_metrics(y, np.c_[1 - p_apl, p_apl], patients, names)
    assert m["num_patients"] == 2 and m["num_cells"] == 6 and m["num_samples"] == 2
    assert m["accuracy"] == 0.0
    rows = {r["patient"]: r for r in m["patients"]}
    assert rows["P-apl"]["label"] == "APL" and rows["P-apl"]["predicted"] == "AML"
    assert rows["P-apl"]["proba"] == pytest.approx([1 - 1.1 / 3, 1.1 / 3])
    assert rows["P-aml"]["predicted"] == "APL" and rows["P-aml"]["num_cells"] == 3
    assert [r["patient"] for r in m["patients"]] == ["P-aml", "P-apl"]
    assert m["confusion_matrix"] == [[0, 1], [1, 0]]
    json.dumps(m, allow_nan=False)


def test_patient_with_mixed_labels_raises() -> None:
    with pytest.raises(ValueError, match="P1"):
        patient_metrics(np.array([0, 1]), np.full((2, 2), 0.5), ["P1", "P1"], ["a", "b"])
    with pytest.raises(ValueError):
        patient_metrics(np.array([0, 1]), np.full((2, 2), 0.5), ["P1"], ["a", "b"])


def test_format_metrics_table(worked: dict) -> None:
    text = format_metrics_table(worked, title="test set")
    assert text.splitlines()[:2] == ["test set", "========"]
    assert "70.00%" in text and "75.56%" in text  # accuracy, macro precision 34/45
    assert "true \\ predicted" in text
    line_a = [ln for ln in text.splitlines() if ln.startswith("A ")]
    assert line_a[0].split()[1:] == ["60.00%", "75.00%", "66.67%", "66.67%", "70.83%", "4"]
    assert line_a[-1].split() == ["A", "3", "1", "0"]
    binary = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]),
                                    ["hem", "all"])
    assert "sensitivity (all)" in format_metrics_table(binary)
    single_class = classification_metrics(np.array([0, 0]), np.full((2, 3), 0.3), NAMES)
    assert "n/a" in format_metrics_table(single_class)  # no computable AUC


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


HISTORY = [
    {"round": r, "train_loss": 1.0 / r, "val_loss": 1.2 / r, "train_accuracy": 0.5 + 0.1 * r,
     "val_accuracy": None if r == 2 else 0.45 + 0.1 * r}
    for r in (1, 2, 3)
]


@pytest.mark.parametrize("name, draw", [
    ("history", lambda p: plots.plot_history(HISTORY, p, xlabel="round", title="fed",
                                             reference={"centralized accuracy": 0.9})),
    ("cm", lambda p: plots.plot_confusion_matrix([[3, 1, 0], [1, 2, 0], [0, 0, 0]], NAMES, p)),
    ("cm_counts", lambda p: plots.plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], p,
                                                        normalize=False, title="counts")),
    ("labels", lambda p: plots.plot_label_distribution([{"A": 3, "B": 1}, {"C": 5}], NAMES, p,
                                                       site_names=["h1", "h2"])),
    ("curves", lambda p: plots.plot_curves({"fedavg": [(1, 0.5), (2, 0.7)], "fedprox": [(1, 0.6)]}, p,
                                           xlabel="round", ylabel="accuracy",
                                           hlines={"centralized": 0.8})),
    ("roc", lambda p: plots.plot_roc([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3], p, title="roc")),
])
def test_plot_writes_png(tmp_path: Path, name: str, draw) -> None:
    target = tmp_path / "out" / f"{name}.png"
    assert draw(target) == target
    _assert_png(target)


def test_plot_overwrites_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    plots.plot_roc([0, 1], [0.2, 0.8], target)
    _assert_png(target)


def test_plot_history_rejects_unusable_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plots.plot_history([{"epoch": 1, "lr": 0.1}], tmp_path / "h.png")
    with pytest.raises(ValueError):
        plots.plot_history(HISTORY, tmp_path / "h.png", reference={"auc": 0.9})
    assert list(tmp_path.iterdir()) == []


def test_modules_import_lightly() -> None:
    import subprocess
    import sys

    code = ("import sys, leukfed.common.metrics, leukfed.common.plots\n"
            "print(sorted(m for m in ('matplotlib', 'torch', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
