"""DP-SGD at the site: clipping, accounting, the persisted ledger, budget refusal, DP-ready models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leukfed.common.dataset import BatchLoader, SmearDataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.dp_accounting import PrivacyLedger, epsilon_of, noise_for_epsilon
from leukfed.common.dp_model import dp_compatible, dp_problems
from leukfed.common.dp_settings import BudgetSpent, DPSettings, noise_problem, round_privacy
from leukfed.common.dp_training import PoissonBatches, PrivateResult, make_private, private_train
from leukfed.common.train import make_loss, make_optimizer, seed_everything, select_hardware
from leukfed.models import create_model

DELTA = 1e-5


def tiny_loader(n: int = 32, size: int = 8, batch: int = 8, seed: int = 0) -> BatchLoader:
    """The project's in-memory loader over random uint8 'smears' (flip augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=generator).numpy()
    dataset = SmearDataset(images, labels, create_model("tinycnn", 4).leuk_info.data_config, train=True,
                           augment="flip")
    return make_loader(dataset, batch, shuffle=True, seed=seed)


def tiny_model() -> nn.Module:
    seed_everything(0)
    return dp_compatible(create_model("tinycnn", 4))


def train(model: nn.Module, settings: DPSettings, ledger: PrivacyLedger | None = None, *,
          loader: BatchLoader | None = None, **kwargs) -> PrivateResult:
    return private_train(model, make_optimizer(model, "adam", 1e-2), loader or tiny_loader(), make_loss("ce", 4),
                         select_hardware("cpu"), settings, ledger=ledger, **kwargs)


def test_settings_are_validated() -> None:
    with pytest.raises(LeukError, match="noise multiplier"):
        DPSettings(0.0)
    with pytest.raises(LeukError, match="delta"):
        DPSettings(1.0, delta=1.5)
    with pytest.raises(LeukError, match="accountant"):
        DPSettings(1.0, accountant="prv")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_are_clipped_to_the_bound() -> None:
    model, clip = tiny_model(), 0.05
    dp_model, optimizer, batches, _ = make_private(model, make_optimizer(model, "sgd", 0.1), tiny_loader(),
                                                   DPSettings(1.0, max_grad_norm=clip))
    images, labels = next(iter(batches))
    assert len(labels) > 0
    make_loss("ce", 4)(dp_model(images), labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], 1)
    norms = per_sample.norm(dim=1)
    assert (norms > clip).all()  # every example is really clipped
    clipped = per_sample * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()
    optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    torch.testing.assert_close(summed, clipped.sum(0), rtol=1e-4, atol=1e-6)


def test_poisson_batches_vary_and_empty_steps_are_noise_only() -> None:
    loader = tiny_loader(n=16, batch=1)  # sample rate 1/16: about a third of the batches are empty
    sizes = [len(y) for _, y in PoissonBatches(loader, 1 / 16, 64, torch.Generator().manual_seed(0))]
    assert 0 in sizes and max(sizes) >= 2
    result = train(tiny_model(), DPSettings(1.0), loader=loader)
    assert result.steps == 16 and result.sample_rate == pytest.approx(1 / 16)
    assert all(torch.isfinite(v).all() for v in result.state.values())
    assert math.isfinite(result.stats[0].loss)  # an empty batch adds no NaN to the loss


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    q = 0.05
    by_steps = [epsilon_of([(1.0, q, steps)], DELTA) for steps in (10, 100, 1000)]
    by_noise = [epsilon_of([(noise, q, 100)], DELTA) for noise in (0.7, 1.0, 2.0)]
    assert epsilon_of([], DELTA) == 0.0
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 3
    # Composition: two rounds of 50 steps cost what one round of 100 does.
    assert epsilon_of([(1.0, q, 50), (1.0, q, 50)], DELTA) == pytest.approx(by_steps[1])


def test_noise_for_epsilon_hits_the_target() -> None:
    noise = noise_for_epsilon(3.0, DELTA, 0.03, 300)
    assert epsilon_of([(noise, 0.03, 300)], DELTA) == pytest.approx(3.0, rel=0.01)


def test_ledger_persists_and_accumulates_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "site" / "privacy-ledger.json"
    first = train(tiny_model(), DPSettings(1.0), PrivacyLedger(path), context={"run_id": 7, "round": 1})
    assert first.epsilon == pytest.approx(first.round_epsilon) and first.epsilon > 0
    # A fresh ClientApp process opens the same file: the history is there and composes.
    reopened = PrivacyLedger(path)
    assert reopened.epsilon(DELTA) == pytest.approx(first.epsilon)
    second = train(tiny_model(), DPSettings(1.0), reopened, context={"run_id": 7, "round": 2})
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(epsilon_of(PrivacyLedger(path).history(), DELTA))
    entries = json.loads(path.read_text())["entries"]
    assert [e["round"] for e in entries] == [1, 2] and entries[-1]["epsilon_after"] == pytest.approx(second.epsilon)
    assert sum(e["steps"] for e in entries) == first.steps + second.steps


def test_damaged_ledger_is_refused_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(LeukError, match="unreadable"):
        PrivacyLedger(path).epsilon(DELTA)


def test_site_refuses_before_training_when_budget_would_be_exceeded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    one_round = epsilon_of([(1.0, 1 / 4, 4)], DELTA)  # one epoch: 4 Poisson batches at rate 1/4
    settings = DPSettings(1.0, budget_epsilon=one_round * 1.2)
    train(tiny_model(), settings, ledger)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetSpent, match=r"^privacy budget spent: epsilon \d+\.\d+ of ") as caught:
        train(model, settings, ledger)
    assert isinstance(caught.value, LeukError) and "stops contributing" in str(caught.value)
    assert len(ledger.entries()) == 1  # the refused round spent nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ledger.would_exceed(settings.budget_epsilon, DELTA, 1.0, 0.25, 8)


def test_private_training_returns_the_global_models_keys() -> None:
    global_model = tiny_model()
    result = train(tiny_model(), DPSettings(1.0), epochs=2)
    reference = {k: v.clone() for k, v in global_model.state_dict().items()}
    assert list(result.state) == list(reference)
    assert all(result.state[k].shape == v.shape for k, v in reference.items())
    global_model.load_state_dict(result.state)  # strict
    assert any(not torch.equal(result.state[k], v) for k, v in reference.items())
    assert result.steps == 2 * 4 and result.sample_rate == pytest.approx(1 / 4)
    assert result.metrics()["dp_noise_multiplier"] == 1.0


def test_steps_mode_and_fedprox_keep_the_accountant_running() -> None:
    result = train(tiny_model(), DPSettings(1.0), max_steps=3, proximal_mu=0.1)
    assert result.steps == 3 and result.round_epsilon == pytest.approx(epsilon_of([(1.0, 0.25, 3)], DELTA))


def test_dp_compatible_models_have_no_batchnorm_and_train() -> None:
    seed_everything(0)
    original = create_model("tinycnn", 4)
    fixed = dp_compatible(original)
    assert any(isinstance(m, _BatchNorm) for m in original.modules())  # the input is left alone
    assert not any(isinstance(m, _BatchNorm) for m in fixed.modules())
    assert dp_problems(fixed) == [] and dp_problems(original)
    norms = [m for m in fixed.modules() if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(16, 16), (32, 32), (16, 48)]
    result = train(fixed, DPSettings(1.0))
    assert all(torch.isfinite(v).all() for v in result.state.values())


def test_dp_compatible_is_deterministic_across_server_and_sites() -> None:
    server = dp_compatible(create_model("tinycnn", 4))
    site = dp_compatible(create_model("tinycnn", 4))  # different random init, same architecture
    assert {k: v.shape for k, v in server.state_dict().items()} == {k: v.shape for k, v in site.state_dict().items()}
    again = dp_compatible(server)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in server.state_dict().items())


def test_dp_compatible_handles_timm_batchnorm_act() -> None:
    """timm's BatchNormAct2d subclasses BatchNorm2d, which Opacus' own validator does not catch."""
    original = create_model("efficientnet_lite0", 4, pretrained=False)
    fixed = dp_compatible(original)
    assert not any(isinstance(m, _BatchNorm) for m in fixed.modules())
    assert dp_problems(fixed) == []
    assert isinstance(fixed.bn1, nn.Sequential) and type(fixed.bn1[2]) is type(original.bn1.act)
    torch.testing.assert_close(fixed.bn1[0].weight, original.bn1.weight)
    assert fixed(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_server_refuses_too_little_noise() -> None:
    assert noise_problem({"dp_noise_multiplier": 1.2}, 1.0) is None
    assert noise_problem({}, 0.0) is None
    assert "0.5 < the required 1" in noise_problem({"dp_noise_multiplier": 0.5}, 1.0)
    assert "no DP noise reported" in noise_problem({"train_loss": 0.3}, 1.0)


def test_round_privacy_summarises_the_sites_reports() -> None:
    sites = {1: {"dp_epsilon": 0.8, "dp_noise_multiplier": 1.5, "dp_delta": 1e-5},
             2: {"dp_epsilon": 1.9, "dp_noise_multiplier": 1.1, "dp_delta": 1e-5}, 3: {"train_loss": 0.2}}
    assert round_privacy(sites) == {"max_epsilon": 1.9, "min_noise_multiplier": 1.1, "delta": 1e-5, "sites": 2}
    assert round_privacy({1: {"train_loss": 0.2}}) == {}
