"""`--local-optimizer-state`: each site's optimizer resumes its own state (Adam's moments and step) every round."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inprocess_federation import run_federation
from leukfed.client.client_app import LOCAL_OPTIMIZER
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.wire import decode_state
from leukfed.common.train import load_optimizer_tensors, make_optimizer, optimizer_tensors
from leukfed.models import create_model


def adam_steps(contexts: dict) -> list[float]:
    """Each site's Adam step count, as its kept state says."""
    return [float(decode_state(c.state[LOCAL_OPTIMIZER])["0.step"]) for c in contexts.values()]


def test_each_site_resumes_its_own_optimizer_round_after_round(tmp_path: Path, monkeypatch) -> None:
    after: dict[int, list[float]] = {}
    for rounds in (1, 2):
        contexts: dict = {}
        run_federation(tmp_path / f"out-{rounds}", monkeypatch, rounds=rounds, contexts_out=contexts,
                       local_optimizer_state=True)
        kept = [decode_state(c.state[LOCAL_OPTIMIZER]) for c in contexts.values()]
        assert len(kept) == 2 and all({"0.exp_avg", "0.exp_avg_sq", "0.step"} <= set(k) for k in kept)
        after[rounds] = adam_steps(contexts)
    assert all(steps > 0 for steps in after[1])
    # Round 2 continued round 1's optimizer: its step count is both rounds' batches, not one round's.
    assert after[2] == [2 * steps for steps in after[1]]


def test_without_the_setting_sites_keep_no_optimizer_state(tmp_path: Path, monkeypatch) -> None:
    contexts: dict = {}
    run_federation(tmp_path / "out", monkeypatch, rounds=1, contexts_out=contexts)
    assert all(LOCAL_OPTIMIZER not in c.state.array_records for c in contexts.values())


def trained_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model, "adam", 1e-3)
    model(torch.randn(4, 3, 24, 24)).sum().backward()
    optimizer.step()
    return optimizer


def test_a_kept_state_is_restored_exactly_and_one_of_another_model_is_ignored() -> None:
    torch.manual_seed(0)
    model = create_model("tinycnn", num_classes=4, image_size=24)
    kept = optimizer_tensors(trained_adam(model))
    fresh = make_optimizer(model, "adam", 1e-3)
    assert load_optimizer_tensors(fresh, kept)
    assert all(torch.equal(kept[k], v) for k, v in optimizer_tensors(fresh).items())
    other = make_optimizer(create_model("smallcnn", num_classes=4), "adam", 1e-3)
    assert not load_optimizer_tensors(other, kept)
    assert optimizer_tensors(other) == {}   # untouched: it starts afresh


def test_dp_sgd_runs_refuse_the_setting() -> None:
    with pytest.raises(LeukError, match="local-optimizer-state is not available with DP-SGD"):
        FedConfig(state_dir="unused", local_optimizer_state=True, dp_noise_multiplier=1.0)
