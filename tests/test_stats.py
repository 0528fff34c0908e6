"""Confidence intervals and paired tests (common/stats.py) against known cases, and `leuk evaluate --bootstrap`."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from leukfed.common.errors import LeukError
from leukfed.common.metrics import classification_metrics, patient_metrics, pool_by_patient
from leukfed.common.stats import (Predictions, across_seeds, bootstrap_ci, bootstrap_p_value, compare,
                                  headline_keys, intervals, load_predictions, paired_bootstrap, paired_t,
                                  save_predictions)

BINARY = ["neg", "pos"]


def binary_scores(correct: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Probabilities whose argmax is right exactly where `correct` is True."""
    confidence = rng.uniform(0.55, 0.95, len(labels))
    positive = np.where(correct == (labels == 1), confidence, 1 - confidence)
    return np.column_stack([1 - positive, positive])


def test_percentile_interval_covers_a_binomial_accuracy_at_its_nominal_rate() -> None:
    """100 images (50 per class), each right with probability 0.8: the 95 % interval holds 0.8 in about
    95 % of simulated test sets, and is as wide as the binomial's normal interval."""
    rng = np.random.default_rng(11)
    labels = np.repeat([0, 1], 50)
    covered, widths = 0, []
    for _ in range(60):
        proba = binary_scores(rng.random(100) < 0.8, labels, rng)
        lo, hi = bootstrap_ci(labels, proba, BINARY, n_resamples=100, seed=int(rng.integers(1 << 30)))["accuracy"]
        covered += lo <= 0.8 <= hi
        widths.append(hi - lo)
    assert covered / 60 >= 0.85
    expected = 2 * 1.96 * np.sqrt(0.8 * 0.2 / 100)
    assert np.mean(widths) == pytest.approx(expected, rel=0.2)


def test_resampling_patients_widens_the_interval_when_cells_of_a_patient_agree() -> None:
    """20 patients x 15 cells whose correctness depends on the patient: resampling cells alone pretends
    300 independent observations; the cluster bootstrap sees about 20."""
    rng = np.random.default_rng(5)
    patients = np.repeat([f"P{i:02d}" for i in range(20)], 15)
    labels = np.repeat(np.arange(20) % 2, 15)
    patient_accuracy = np.repeat(rng.beta(1.0, 0.4, 20), 15)
    proba = binary_scores(rng.random(300) < patient_accuracy, labels, rng)
    by_image = bootstrap_ci(labels, proba, BINARY, n_resamples=200, seed=1)
    by_patient = bootstrap_ci(labels, proba, BINARY, groups=list(patients), n_resamples=200, seed=1)
    for key in ("accuracy", "auc", "sensitivity"):
        width_image = by_image[key][1] - by_image[key][0]
        assert by_patient[key][1] - by_patient[key][0] > 1.5 * width_image, key
    accuracy = classification_metrics(labels, proba, BINARY)["accuracy"]
    assert by_patient["accuracy"][0] <= accuracy <= by_patient["accuracy"][1]


def test_intervals_name_the_metrics_of_classification_metrics_and_are_reproducible() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], 20)
    proba = rng.dirichlet([1, 1, 1], 60)
    proba[np.arange(60), labels] += 0.3
    proba /= proba.sum(1, keepdims=True)
    names = ["A", "B", "C"]
    first = bootstrap_ci(labels, proba, names, n_resamples=100, seed=3)
    assert list(first) == list(headline_keys(names)) == ["accuracy", "balanced_accuracy", "auc_ovr",
                                                          "macro_sensitivity", "macro_specificity"]
    assert first == bootstrap_ci(labels, proba, names, n_resamples=100, seed=3)
    assert first != bootstrap_ci(labels, proba, names, n_resamples=100, seed=4)
    metrics = classification_metrics(labels, proba, names)
    for key, (lo, hi) in first.items():
        assert 0 <= lo <= metrics[key] <= hi <= 1, key


def test_paired_bootstrap_finds_a_real_difference_and_none_between_equal_models() -> None:
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1], 60)
    base = rng.random(120) < 0.75
    better = base | (rng.random(120) < 0.6)  # right wherever the base model is, and on most of the rest
    proba_base, proba_better = binary_scores(base, labels, rng), binary_scores(better, labels, rng)
    paired = paired_bootstrap(labels, proba_better, proba_base, BINARY, n_resamples=400, seed=0)
    gain = classification_metrics(labels, proba_better, BINARY)["accuracy"] - classification_metrics(
        labels, proba_base, BINARY)["accuracy"]
    assert paired["accuracy"]["diff"] == pytest.approx(gain) and gain > 0.05
    assert 0 < paired["accuracy"]["ci"][0] <= gain <= paired["accuracy"]["ci"][1]
    assert paired["accuracy"]["p"] < 0.01
    # The unpaired intervals overlap far more than the paired one allows: pairing removes shared noise.
    alone = [bootstrap_ci(labels, p, BINARY, n_resamples=400, seed=0)["accuracy"] for p in (proba_better, proba_base)]
    assert paired["accuracy"]["ci"][1] - paired["accuracy"]["ci"][0] < 0.75 * ((alone[0][1] - alone[0][0]) + (alone[1][1] - alone[1][0]))
    same = paired_bootstrap(labels, proba_base, proba_base, BINARY, n_resamples=200, seed=0)
    assert all(row["diff"] == 0 and row["ci"] == [0.0, 0.0] and row["p"] == 1.0 for row in same.values())


def test_bootstrap_p_value_bounds() -> None:
    assert bootstrap_p_value(np.full(999, 0.1)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.r_[np.full(500, -0.1), np.full(500, 0.1)]) == 1.0
    assert bootstrap_p_value(np.array([])) is None


def test_across_seeds_t_interval_and_paired_t_match_scipy() -> None:
    row = across_seeds([0.8, None, 0.9, 1.0])
    half = scipy_stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)
    assert row["mean"] == pytest.approx(0.9) and row["sd"] == pytest.approx(0.1) and row["n"] == 3
    assert row["ci"] == pytest.approx([0.9 - half, 0.9 + half])
    assert row["values"] == [0.8, None, 0.9, 1.0]
    a, b = [0.91, 0.88, 0.93, 0.90], [0.89, 0.87, 0.90, 0.90]
    paired = paired_t(a, b)
    assert paired["test"] == "paired t" and paired["n"] == 4
    assert paired["p"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert paired["diff"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert paired["ci"][0] < paired["diff"] < paired["ci"][1]
    assert paired_t([0.9, 0.8], [0.9, 0.8])["p"] == 1.0
    assert paired_t([0.9], [0.8])["ci"] is None and paired_t([0.9], [0.8])["p"] is None


def test_pool_by_patient_gives_the_rows_patient_metrics_scores() -> None:
    rng = np.random.default_rng(0)
    patients = ["P2", "P1", "P2", "P3", "P1", "P3"]
    labels = np.array([1, 0, 1, 0, 0, 0])
    proba = rng.dirichlet([1, 1], 6)
    ids, patient_labels, mean = pool_by_patient(labels, proba, patients, BINARY)
    assert ids == ["P1", "P2", "P3"] and patient_labels.tolist() == [0, 1, 0]
    assert mean[1] == pytest.approx(proba[[0, 2]].mean(0))
    reference = patient_metrics(labels, proba, patients, BINARY)
    assert classification_metrics(patient_labels, mean, BINARY)["auc"] == reference["auc"]


def _predictions(rng: np.random.Generator, patients: bool = True) -> Predictions:
    labels = np.repeat([0, 1], 24)
    proba = binary_scores(rng.random(48) < 0.8, labels, rng)
    ids = tuple(f"P{i // 4:02d}" for i in range(48)) if patients else (None,) * 48
    return Predictions(proba, labels, tuple(BINARY), tuple(f"img{i}.png" for i in range(48)), ids)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_predictions_round_trip_without_pickle(tmp_path: Path, suffix: str) -> None:
    pred = _predictions(np.random.default_rng(1))
    path = save_predictions(tmp_path / f"p{suffix}", pred)
    back = load_predictions(path)
    assert back.paths == pred.paths and back.patients == pred.patients and back.class_names == pred.class_names
    assert np.array_equal(back.labels, pred.labels) and np.allclose(back.proba, pred.proba, atol=1e-6)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:  # plain arrays only: no object arrays
            assert {k: npz[k].dtype.kind for k in npz.files} == {"proba": "f", "labels": "i", "class_names": "U",
                                                                "paths": "U", "patients": "U"}
    unknown = Predictions(pred.proba, pred.labels, pred.class_names, pred.paths, (None,) * 48)
    assert load_predictions(save_predictions(tmp_path / f"u{suffix}", unknown)).patients == (None,) * 48
    (tmp_path / f"bad{suffix}").write_bytes(b"not a predictions file")
    with pytest.raises(LeukError, match="unreadable"):
        load_predictions(tmp_path / f"bad{suffix}")


def test_compare_scores_every_model_on_the_same_resamples_and_only_the_same_images() -> None:
    rng = np.random.default_rng(4)
    pred = _predictions(rng)
    found = intervals(pred, 100, 0)
    assert found["unit"] == "patient" and set(found["image"]) == set(found["patient"]) == set(headline_keys(BINARY))
    assert intervals(_predictions(rng, patients=False), 100, 0)["patient"] is None
    other = Predictions(np.roll(pred.proba, 1, axis=0), pred.labels, pred.class_names, pred.paths, pred.patients)
    both = compare({"other": other, "centralized": pred}, "centralized", 100, 0)
    assert "paired_image" not in both["centralized"] and both["centralized"]["image"] == found["image"]
    groups = list(pred.patients)
    assert both["other"]["paired_image"] == paired_bootstrap(pred.labels, other.proba, pred.proba, BINARY,
                                                             groups=groups, n_resamples=100, seed=0)
    assert set(both["other"]["paired_patient"]["auc"]) == {"diff", "ci", "p"}
    shuffled = Predictions(pred.proba, pred.labels, pred.class_names, pred.paths[::-1], pred.patients)
    with pytest.raises(LeukError, match="same images"):
        compare({"a": shuffled, "b": pred}, "b", 100, 0)


# --- `leuk evaluate --bootstrap` on real patients ------------------------------------------------------

def leuk(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, "-c", "from leukfed.cli import main; main()", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def real_patients(source: Path, target: Path, patients: list[str], cells: int) -> Path:
    """A few real patients of apl_aml (their first `cells` cells) in a temporary patient-folder tree."""
    rows = {r["patient"]: r for r in csv.DictReader((source / "patients.csv").open())}
    for patient in patients:
        for image in sorted((source / patient).rglob("*.jpg"))[:cells]:
            destination = target / image.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, destination)
    with (target / "patients.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(next(iter(rows.values()))))
        writer.writeheader()
        writer.writerows(rows[p] for p in patients)
    return target


@pytest.mark.slow
def test_evaluate_bootstrap_on_real_patients(data_root: Path, tmp_path: Path) -> None:
    source = data_root / "apl_aml"
    diagnosis = {r["patient"]: r["diagnosis"] for r in csv.DictReader((source / "patients.csv").open())}
    apl = [p for p in sorted(diagnosis) if diagnosis[p] == "APL"]
    aml = [p for p in sorted(diagnosis) if diagnosis[p] == "AML"]
    train = real_patients(source, tmp_path / "train", apl[:6] + aml[:6], 12)
    new = real_patients(source, tmp_path / "new", apl[6:12] + aml[6:12], 10)
    leuk("train", "--data", str(train), "--model", "tinycnn", "--image-size", "24", "--epochs", "1",
         "--out", str(tmp_path / "run"))
    out = tmp_path / "eval.json"
    result = leuk("evaluate", "--model", str(tmp_path / "run"), "--data", str(new), "--bootstrap", "200",
                  "--bootstrap-seed", "7", "--out", str(out))
    assert "95% CI" in result.stdout and "resamples of patients" in result.stdout
    metrics = json.loads(out.read_text())
    assert metrics["bootstrap"]["unit"] == "patient" and metrics["bootstrap"]["resamples"] == 200
    for level in (metrics, metrics["patient_level"]):
        assert set(level["ci"]) == set(headline_keys(["AML", "APL"]))
        for key, (lo, hi) in level["ci"].items():
            assert lo <= level[key] <= hi, key
    pred = load_predictions(tmp_path / "eval.predictions.npz")
    assert len(pred.labels) == metrics["num_samples"] == 120
    assert sorted(set(pred.patients)) == sorted(apl[6:12] + aml[6:12])
    assert classification_metrics(pred.labels, pred.proba, pred.class_names)["accuracy"] == pytest.approx(metrics["accuracy"])
    # The same seed gives the same intervals; the file is enough to recompute them without the model.
    assert intervals(pred, 200, 7)["patient"] == metrics["patient_level"]["ci"]
