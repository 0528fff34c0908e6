"""BatchNorm recalibration ("precise BN"): statistics recomputed with the current weights, in training and runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.common.train import recalibrate_batchnorm, select_hardware
from leukfed.models.dscnet import DSCNet

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]


def _batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=generator) * 3 + 2, torch.zeros(8, dtype=torch.long))
            for _ in range(count)]


def test_running_statistics_become_the_plain_average_over_the_batches() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(2, 3, 16, 16))
    batches = _batches(5, seed=0)
    stale = model[1].running_mean.clone()
    used = recalibrate_batchnorm(model.eval(), batches, select_hardware("cpu"), max_batches=3)
    assert used == 3 and not model.training  # the caller's mode is kept
    with torch.no_grad():
        conv = [model[0](images) for images, _ in batches[:3]]
    expected = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)  # equal batches: mean of means
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert not torch.allclose(model[1].running_mean, stale)
    assert model[1].momentum == 0.1  # restored after the cumulative average


def test_models_without_batchnorm_and_zero_batches_are_left_alone() -> None:
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    assert recalibrate_batchnorm(plain, _batches(2, 1), select_hardware("cpu"), 5) == 0
    model = DSCNet(num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, _batches(2, 1), select_hardware("cpu"), 0) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_leuk_train_recalibrates_and_records_it(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "smears", per_class=12, size=40, seed=2)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", "tinycnn", "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--bn-recalibration", "2"]
    result = subprocess.run([*LEUK, *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LEUK_NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr
    description = json.loads((run / "model.json").read_text())
    assert description["config"]["bn_recalibration"] == 2
    refused = subprocess.run([*LEUK, *args[:-1], "-1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error:") and "recalibration" in refused.stderr
