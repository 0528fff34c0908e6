"""DP-SGD training at the site: Poisson batches, Opacus' private model and optimizer, the budgeted round."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from leukfed.common.dataset import BatchLoader
from leukfed.common.dp_accounting import PrivacyLedger, epsilon_of
from leukfed.common.dp_model import dp_problems
from leukfed.common.dp_settings import DPSettings, require_opacus
from leukfed.common.errors import LeukError
from leukfed.common.train import Batches, EpochStats, Hardware, LossFn, train_epoch

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

State = dict[str, torch.Tensor]


class PoissonBatches:
    """Poisson-sampled batches, the sampling DP-SGD's accountant assumes: at every step each
    example joins the batch independently with probability `sample_rate` (so sizes vary, and a
    batch may even be empty: its step is then noise only, as the analysis requires).
    Augments and normalises like the BatchLoader it is built from."""

    def __init__(self, loader: BatchLoader, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        self.dataset = loader.dataset
        self.augment = loader.augment
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        for _ in range(self.steps):
            index = torch.nonzero(torch.rand(n, generator=self.generator) < self.sample_rate).flatten()
            images = self.augment(self.dataset.images[index])
            yield self.dataset.normalize(images), self.dataset.labels[index]


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: BatchLoader, settings: DPSettings,
                 *, generator: torch.Generator | None = None
                 ) -> tuple[GradSampleModule, DPOptimizer, PoissonBatches, RDPAccountant]:
    """Opacus' DP-SGD parts: (per-example-gradient model, clipping+noising optimizer, Poisson
    batches with one pass = len(loader) steps, RDP accountant fed by every optimizer step).

    What PrivacyEngine.make_private assembles, minus its DataLoader wrapping: leukfed's loaders
    are in-memory batch iterators, not torch DataLoaders. The loss must be a plain per-example
    mean (no class weights): the optimizer scales by the expected batch size, which is only right
    for an unweighted mean.
    """
    require_opacus()
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    problems = dp_problems(model)
    if problems:
        raise LeukError(f"model cannot be trained with DP-SGD: {problems[0]}; build it with dp_compatible()")
    n = len(loader.dataset)
    if n == 0:
        raise LeukError("no training examples: the training set is empty")
    sample_rate = min(1.0, loader.batch_size / n)
    batches = PoissonBatches(loader, sample_rate, len(loader), generator or _generator_from_global_rng())
    dp_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    dp_model.forbid_grad_accumulation()  # Poisson sampling: one backward per step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Secure RNG turned off": leukfed seeds torch's PRNG
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=settings.noise_multiplier,
                                   max_grad_norm=settings.max_grad_norm,
                                   expected_batch_size=max(1, round(n * sample_rate)), loss_reduction="mean")
    accountant = RDPAccountant()
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp_model, dp_optimizer, batches, accountant


def _generator_from_global_rng() -> torch.Generator:
    """A sampling generator seeded from torch's global RNG, so seed_everything fixes the batches."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))


@dataclass
class PrivateResult:
    """One site's private local training: new weights, what it cost and what it measured."""

    state: State
    stats: list[EpochStats]
    epsilon: float            # spent on the site's data in all, this round included
    round_epsilon: float      # this round alone
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int

    def metrics(self) -> dict[str, float]:
        """What the site reports with its update (and writes to its audit log)."""
        return {"dp_epsilon": self.epsilon, "dp_round_epsilon": self.round_epsilon, "dp_delta": self.delta,
                "dp_noise_multiplier": self.noise_multiplier, "dp_max_grad_norm": self.max_grad_norm,
                "dp_sample_rate": self.sample_rate, "dp_steps": float(self.steps)}


def private_train(model: nn.Module, optimizer: torch.optim.Optimizer, loader: BatchLoader, loss_fn: LossFn,
                  hardware: Hardware, settings: DPSettings, *, epochs: int = 1, max_steps: int | None = None,
                  ledger: PrivacyLedger | None = None, proximal_mu: float = 0.0,
                  context: Mapping[str, Any] | None = None) -> PrivateResult:
    """DP-SGD over `epochs` passes (or `max_steps` batches); refuses first if over budget.

    `model` must be dp_compatible and `optimizer` built over its parameters; the returned state
    has the global model's keys. Without a ledger only this call is accounted for.
    """
    dp_model, dp_optimizer, batches, accountant = make_private(model, optimizer, loader, settings)
    steps = max_steps if max_steps else epochs * len(batches)
    if proximal_mu > 0:
        _add_proximal_after_noise(dp_optimizer, model, proximal_mu)
    # DP-SGD in float32: per-example gradient norms decide the clipping, so no bf16 rounding there.
    hardware = dataclasses.replace(hardware, autocast_dtype=None)
    guard = ledger.locked() if ledger is not None else contextlib.nullcontext()
    try:
        with guard:
            if ledger is not None:
                ledger.require_budget(settings, batches.sample_rate, steps)
            stats = [_train_epoch(dp_model, batches, dp_optimizer, _empty_safe(loss_fn), hardware, max_steps)
                     for _ in range(1 if max_steps else epochs)]
            history = list(accountant.history)
            round_epsilon = epsilon_of(history, settings.delta)
            total = ledger.record(history, settings.delta, **dict(context or {})) if ledger else round_epsilon
    finally:
        dp_model.cleanup()
    state = {k: v.detach().cpu().clone() for k, v in strip_wrapper_prefix(dp_model.state_dict()).items()}
    return PrivateResult(state, stats, total, round_epsilon, settings.delta, settings.noise_multiplier,
                         settings.max_grad_norm, batches.sample_rate, sum(s for _, _, s in history))


def _empty_safe(loss_fn: LossFn) -> LossFn:
    """The mean loss of an empty Poisson batch is NaN; make it a graph-connected zero instead."""
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, target) if len(target) else logits.sum() * 0.0
    return loss


def _train_epoch(model: nn.Module, loader: Batches, optimizer, loss_fn: LossFn, hardware: Hardware,
                 max_steps: int | None) -> EpochStats:
    with warnings.catch_warnings():
        # Opacus hooks the first layer, whose input needs no gradient: torch warns, harmlessly.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            return train_epoch(model, loader, optimizer, loss_fn, hardware, max_steps=max_steps)
        except RuntimeError as exc:
            if "BackwardHookFunction" not in str(exc):
                raise
            raise LeukError("model cannot be trained with DP-SGD: its forward modifies a layer's output in "
                            "place (e.g. timm ResNet's `x += shortcut`), which Opacus' hooks forbid") from None


def _add_proximal_after_noise(optimizer, model: nn.Module, mu: float) -> None:
    """FedProx under DP: add mu·(w − w_global) to the privatised gradient.

    Opacus builds the update from per-example gradients only, so a regularizer in the loss would
    be silently dropped; the proximal term depends on no example, so adding it after clipping and
    noise costs no privacy. Chained after the accountant's hook, which must keep running.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    accountant_hook = optimizer.step_hook

    def hook(opt) -> None:
        accountant_hook(opt)
        for p, a in zip(params, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)
    optimizer.step_hook = hook


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> State:
    """Keys of an Opacus GradSampleModule's state dict without its "_module." prefix."""
    return {k.removeprefix("_module."): v for k, v in state.items()}
