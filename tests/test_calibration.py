"""Temperature scaling, ECE and the validation-chosen threshold (common/calibration.py), on real logits."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leukfed.common.calibration import (CALIBRATION_JSON, ECE_BINS, THRESHOLD_MARGIN, calibrate_logits,
                                        choose_threshold, expected_calibration_error, fit_temperature,
                                        load_calibration, rates_at_threshold, save_calibration, softmax)
from leukfed.common.errors import LeukError


@functools.lru_cache(maxsize=None)
def overconfident_model_logits(seed: int = 0, n: int = 3000, sharpen: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits of a logistic regression fitted on overlapping 3-class blobs, its weights then
    multiplied by `sharpen` (what overfitting does to a network's logits): accuracy stays, confidence soars."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = rng.integers(0, 3, count)
        return torch.tensor(centres[y] + rng.normal(size=(count, 2)), dtype=torch.float32), torch.tensor(y)

    x_train, y_train = draw(n)
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        model.weight.mul_(sharpen)
        model.bias.mul_(sharpen)
        x_val, y_val = draw(n)
        return model(x_val).numpy(), y_val.numpy()


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    logits, labels = overconfident_model_logits()
    before = expected_calibration_error(softmax(logits), labels)
    temperature = fit_temperature(logits, labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert 3.5 < temperature < 7.0           # undoes most of the x5 sharpening
    assert before > 0.15 and after < 0.04 and after < before / 4
    # Temperature does not change the ranking: accuracy is the same before and after.
    assert (softmax(logits).argmax(1) == softmax(logits, temperature).argmax(1)).all()


def test_an_underconfident_model_gets_a_temperature_below_one() -> None:
    logits, labels = overconfident_model_logits(seed=1, sharpen=0.3)
    temperature = fit_temperature(logits, labels)
    assert 0.2 < temperature < 0.45
    assert expected_calibration_error(softmax(logits, temperature), labels) < expected_calibration_error(softmax(logits), labels)


def test_ece_is_the_bin_weighted_gap_between_accuracy_and_confidence() -> None:
    # Two samples at confidence 0.9 (one right), two at 0.6 (both right): bins 13 and 9 of 15.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert expected_calibration_error(probabilities, labels, bins=1) == pytest.approx(abs(0.75 - 0.75))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_the_threshold_is_the_highest_that_reaches_the_target_sensitivity(target: float) -> None:
    rng = np.random.default_rng(4)
    is_positive = rng.random(200) < 0.3
    scores = np.clip(rng.normal(np.where(is_positive, 0.65, 0.35), 0.15), 0, 1)
    threshold = choose_threshold(scores, is_positive, target)
    assert rates_at_threshold(scores, is_positive, threshold)["sensitivity"] >= target
    boundary = np.min(scores[scores >= threshold])                # the case it sits just below
    assert boundary - threshold == pytest.approx(THRESHOLD_MARGIN)    # scores are probabilities: <= 1
    higher = np.min(scores[scores > boundary], initial=np.inf)    # the next candidate above it
    if np.isfinite(higher):
        assert rates_at_threshold(scores, is_positive, higher)["sensitivity"] < target


def test_the_boundary_case_scored_again_with_float_noise_is_still_flagged() -> None:
    """`leuk predict` scored a validation APL patient 1.4e-10 below the score `leuk calibrate` had
    chosen its threshold at, and missed it; the threshold now keeps a margin below that score."""
    scores = np.array([0.4065462446164413, 0.4186089922596082, 0.36, 0.35])
    is_positive = np.array([True, True, False, False])
    threshold = choose_threshold(scores, is_positive, 0.9)
    rescored = np.array([0.4065462444790997, 0.4186089922596082, 0.36, 0.35])
    assert rates_at_threshold(rescored, is_positive, threshold)["sensitivity"] == 1.0
    assert rates_at_threshold(rescored, is_positive, threshold)["specificity"] == 1.0


def test_calibrate_logits_stores_the_threshold_on_the_calibrated_probability(tmp_path: Path) -> None:
    logits, labels = overconfident_model_logits(n=600)
    calibration = calibrate_logits(logits, labels, ["AML", "APL", "other"], level="image", positive="APL",
                                   target_sensitivity=0.9)
    scores = calibration.probabilities(logits)[:, 1]
    assert calibration.at_threshold["sensitivity"] >= 0.9
    assert rates_at_threshold(scores, labels == 1, calibration.threshold)["sensitivity"] >= 0.9
    assert calibration.ece_after < calibration.ece_before and calibration.ece_bins == ECE_BINS
    save_calibration(tmp_path, calibration)
    assert load_calibration(tmp_path, ["AML", "APL", "other"]) == calibration
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / CALIBRATION_JSON).read_text())
    assert {"temperature", "threshold", "positive", "target_sensitivity", "subset", "ece_before",
            "ece_after", "ece_bins"} <= set(stored)
    # The decision follows the threshold, not the argmax.
    p = np.array([0.7, calibration.threshold, 0.0])
    assert calibration.decide(p) == 1 and calibration.decide(p - [0, 1e-6, 0]) == 0


def test_an_unusable_calibration_file_is_one_error(tmp_path: Path) -> None:
    assert load_calibration(tmp_path) is None
    logits, labels = overconfident_model_logits(n=300)
    save_calibration(tmp_path, calibrate_logits(logits, labels, ["a", "b", "c"], level="image"))
    with pytest.raises(LeukError, match="not the run's"):
        load_calibration(tmp_path, ["a", "b", "x"])
    stored = json.loads((tmp_path / CALIBRATION_JSON).read_text())
    for broken in ('{"temperature": ', json.dumps({**stored, "temperature": -1.0}),
                   json.dumps({**stored, "positive": "b"}), json.dumps({**stored, "format": "other"}), "[]"):
        (tmp_path / CALIBRATION_JSON).write_text(broken)
        with pytest.raises(LeukError, match="calibration .* is unusable"):
            load_calibration(tmp_path, ["a", "b", "c"])


def test_a_threshold_needs_positives_and_a_known_class() -> None:
    logits, labels = overconfident_model_logits(n=300)
    with pytest.raises(LeukError, match="not one of the run's classes"):
        calibrate_logits(logits, labels, ["a", "b", "c"], level="image", positive="APL")
    with pytest.raises(LeukError, match="no positive samples"):
        calibrate_logits(logits, np.where(labels == 2, 0, labels), ["a", "b", "c"], level="image", positive="c")


class AttentionBag(torch.nn.Module):
    """A small attention-MIL model: a cell CNN, attention over its cells' logits, the weighted sum."""

    def __init__(self) -> None:
        super().__init__()
        from leukfed.models import create_model

        self.cells = create_model("tinycnn", 2, image_size=24)
        self.leuk_info = self.cells.leuk_info
        self.attention = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cells(x)

    def score_bag(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.cells(cells)
        attention = torch.softmax(self.attention(logits).squeeze(1), 0)
        return (attention[:, None] * logits).sum(0), attention


def test_a_model_that_pools_its_cells_is_calibrated_and_explained_by_its_attention(synthetic_patients) -> None:
    from leukfed.common.calibration import calibrate_dataset, patient_level_logits
    from leukfed.common.dataset import build_dataset
    from leukfed.common.inference import score_patient
    from leukfed.common.train import select_hardware

    torch.manual_seed(0)
    model, hardware = AttentionBag().eval(), select_hardware("cpu")
    manifest = synthetic_patients
    dataset = build_dataset(manifest, [s.path for s in manifest.samples], model.leuk_info.data_config, train=False)
    ids, logits, labels = patient_level_logits(model, dataset, hardware)
    assert len(ids) == 24 and logits.shape == (24, 2) and set(labels.tolist()) == {0, 1}
    calibration = calibrate_dataset(model, dataset, hardware, manifest.class_names, positive="APL")
    assert calibration.level == "patient" and calibration.num_samples == 24
    assert calibration.at_threshold["sensitivity"] >= 0.9
    files = [manifest.root / s.path for s in manifest.samples if s.patient == ids[0]]
    score = score_patient(model, files, hardware, list(manifest.class_names), calibration)
    assert score.weight_name == "attention" and score.cell_weights.shape == (len(files),)
    assert score.cell_weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert score.probabilities == pytest.approx(calibration.probabilities(logits[0]), abs=1e-5)
