"""The patient protocol (CV, temporal split, validation thresholds, bootstrap) and `leuk train-patients`."""
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

from cli_errors import assert_one_line_error
from leukfed.common.errors import LeukError
from leukfed.common.patient_model import load_patient_model, score_patients
from leukfed.common.stats import load_predictions
from leukfed.common.patient_protocol import (expected_calibration_error, fit_temperature, natural_key,
                                             patient_bootstrap_ci, repeated_cv, sensitivity_specificity,
                                             temporal_split, threshold_for_sensitivity)

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]


@pytest.fixture(scope="module")
def apl_patients(data_root: Path) -> tuple[list[str], list[int]]:
    with (data_root / "apl_aml" / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r["patient"] for r in rows], [int(r["diagnosis"] == "APL") for r in rows]


def test_cv_puts_each_patient_in_one_test_fold_per_repeat_stratified(apl_patients) -> None:
    patients, labels = apl_patients
    folds = repeated_cv(patients, labels, folds=5, repeats=3, seed=0)
    assert len(folds) == 15
    label = dict(zip(patients, labels))
    for r in range(3):
        repeat = folds[5 * r:5 * r + 5]
        tested = [p for f in repeat for p in f.test]
        assert sorted(tested) == sorted(patients)  # every patient tested exactly once per repeat
        for f in repeat:
            assert not set(f.train) & set(f.test)  # no patient on two sides
            assert set(f.train) | set(f.test) == set(patients)
            apl = sum(label[p] for p in f.test)
            assert apl in (4, 5), apl  # 22 APL over 5 folds
            assert len(f.test) in (16, 17)
    assert folds[0].test != folds[5].test  # repeats shuffle differently


def test_temporal_split_tests_the_latest_quarter_in_id_order(apl_patients) -> None:
    patients, labels = apl_patients
    split = temporal_split(patients, labels, test_fraction=0.25)
    assert len(split.test) == 21 and len(split.train) == 61
    assert not set(split.train) & set(split.test)
    assert max(natural_key(p) for p in split.train) < min(natural_key(p) for p in split.test)
    assert split.test[-1] == "Patient_81"


def test_temporal_order_is_numeric_and_refuses_one_sided_test() -> None:
    patients = [f"P_{i}" for i in (10, 2, 1, 9, 3, 11, 4, 8)]
    split = temporal_split(patients, [0, 1, 0, 1, 0, 1, 1, 0], test_fraction=0.25)
    assert split.test == ("P_10", "P_11")
    with pytest.raises(LeukError, match="only one diagnosis"):
        temporal_split(patients, [0, 1, 0, 0, 1, 0, 1, 1], test_fraction=0.25)


def test_threshold_reaches_the_target_sensitivity_with_the_best_specificity() -> None:
    y = np.array([1] * 10 + [0] * 10)
    score = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.1] + [0.05 * i for i in range(10)])
    t = threshold_for_sensitivity(y, score, 0.9)
    assert 0.5 - 2e-6 < t < 0.5    # just below the boundary case's score (THRESHOLD_MARGIN)
    sens, spec = sensitivity_specificity(y, score, t)
    assert sens == pytest.approx(0.9) and spec == pytest.approx(1.0)
    assert sensitivity_specificity(y, score, threshold_for_sensitivity(y, score, 1.0))[0] == 1.0


def test_bootstrap_ci_brackets_the_auc_and_calibration_helpers() -> None:
    rng = np.random.default_rng(0)
    y = np.array([1] * 20 + [0] * 40)
    score = np.where(y == 1, rng.normal(1.0, 1, 60), rng.normal(0, 1, 60))
    low, high = patient_bootstrap_ci(y, score, resamples=500)
    from leukfed.common.metrics import binary_auc

    assert low < binary_auc(y, score) < high and high - low < 0.4
    logits = np.where(y == 1, 6.0, -6.0) * rng.choice([1, -1], 60, p=[0.8, 0.2])  # overconfident, 20 % wrong
    temperature = fit_temperature(logits, y)
    assert temperature > 1.5
    assert expected_calibration_error(y, 1 / (1 + np.exp(-logits / temperature))) < \
        expected_calibration_error(y, 1 / (1 + np.exp(-logits)))


@pytest.fixture(scope="module")
def few_patients(data_root: Path, tmp_path_factory) -> Path:
    """6 APL and 6 AML patients of apl_aml, 6 cells each (copied to tmp; never into the repository)."""
    source = data_root / "apl_aml"
    with (source / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    chosen = [r for r in rows if r["diagnosis"] == "APL"][:6] + [r for r in rows if r["diagnosis"] == "AML"][:6]
    out = tmp_path_factory.mktemp("apl") / "few"
    out.mkdir()
    for r in chosen:
        images = sorted((source / r["patient"]).rglob("*.jpg"))[:6]
        for image in images:
            target = out / image.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    with (out / "patients.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["patient", "diagnosis"])
        writer.writeheader()
        writer.writerows({"patient": r["patient"], "diagnosis": r["diagnosis"]} for r in chosen)
    return out


def leuk(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    return subprocess.run([*LEUK, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.realdata
def test_train_patients_then_evaluate_scores_every_patient(few_patients: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = leuk("train-patients", "--data", str(few_patients), "--out", str(run), "--recipe", "lite0-96-meanpool")
    assert trained.returncode == 0, trained.stderr
    description = json.loads((run / "patient_model.json").read_text())
    assert description["positive"] == "APL" and description["num_heads"] == 5
    assert 0 < description["temperature"] and "threshold" in description
    assert description["validation"]["sensitivity"] >= 0.9  # the threshold's rule, on validation patients
    out = tmp_path / "metrics.json"
    scored = leuk("evaluate", "--model", str(run), "--data", str(few_patients), "--out", str(out),
                  "--bootstrap", "200")
    assert scored.returncode == 0, scored.stderr
    metrics = json.loads(out.read_text())
    assert metrics["num_patients"] == 12 and len(metrics["patients"]) == 12
    assert metrics["bootstrap"]["unit"] == "patient" and "auc" in metrics["ci"]
    patients_scored = load_predictions(metrics["predictions_file"])
    assert len(patients_scored.labels) == 12 and patients_scored.has_patients()
    assert all(0 <= p["probability"] <= 1 for p in metrics["patients"])
    assert sum(map(sum, metrics["confusion_matrix"])) == 12
    card = (run / "MODEL_CARD.md").read_text()
    assert "patient" in card and "leuk train-patients" in card and "--recipe lite0-96-meanpool" in card
    gallery = tmp_path / "gallery"
    predicted = leuk("predict", "--model", str(run), str(few_patients / "Patient_00"), str(few_patients / "Patient_01"),
                     "--gallery", str(gallery), "--top", "4", "--json")
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)
    assert [Path(r["path"]).name for r in rows] == ["Patient_00", "Patient_01"]
    for r in rows:
        assert r["calibrated"] and r["predicted"] == ("APL" if r["decision"]["flagged"] else "AML")
        assert r["decision"]["probability"] == pytest.approx(r["probabilities"]["APL"])
        assert Path(r["gallery"]).stat().st_size > 0
    assert_one_line_error(leuk("predict", "--model", str(run), str(few_patients / "Patient_00"), "--gallery",
                               str(gallery), "--heatmap"), "heatmap")
    model = load_patient_model(run)
    [row] = score_patients(model, {"Patient_00": few_patients / "Patient_00"})
    assert len(row["cells"]) == 6 and row["cell_score_kind"] == "cell probability"
    assert {c["cell_type"] for c in row["cells"]} <= {p.name for p in (few_patients / "Patient_00").iterdir()}
    (run / "heads.safetensors").write_bytes(b"not safetensors")
    assert_one_line_error(leuk("evaluate", "--model", str(run), "--data", str(few_patients)), "unreadable")
