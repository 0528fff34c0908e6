"""Differential privacy at the site: DP-SGD (Opacus), a persisted RDP accountant, and budget checks."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leukfed.common.atomic import atomic_write_json
from leukfed.common.dataset import BatchLoader
from leukfed.common.errors import LeukError
from leukfed.common.train import Batches, EpochStats, Hardware, LossFn, train_epoch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one training per site at a time is assumed there
    fcntl = None

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

ACCOUNTANTS = ("rdp",)
# The RDP orders of Opacus' RDPAccountant, so epsilons match what its accountant reports.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
LEDGER_VERSION = 1
# One step of the accountant's history: (noise multiplier, Poisson sample rate, number of steps).
Mechanism = tuple[float, float, int]
State = dict[str, torch.Tensor]
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BudgetSpent(LeukError):
    """The site's privacy budget would be exceeded by the next round: it stops contributing."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD parameters of one site's local training, and the site's lifetime budget."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    budget_epsilon: float | None = None   # None: account and report, never refuse
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        checks = [(self.noise_multiplier > 0, "DP noise multiplier must be > 0"),
                  (self.max_grad_norm > 0, "DP max grad norm must be > 0"),
                  (0 < self.delta < 1, "DP delta must be in (0, 1)"),
                  (self.budget_epsilon is None or self.budget_epsilon > 0, "DP budget epsilon must be > 0"),
                  (self.accountant in ACCOUNTANTS, f"DP accountant must be one of {', '.join(ACCOUNTANTS)}")]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise LeukError("; ".join(problems))


def _require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise LeukError("differential privacy needs Opacus: pip install 'leukfed[dp]'") from None


# ---------------------------------------------------------------------------------------------
# Models


def dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of `model` that DP-SGD can train: every BatchNorm becomes GroupNorm.

    Deterministic, so the server and every site derive the same architecture (same state-dict
    keys and shapes) from the same model: a BatchNorm over C channels becomes
    GroupNorm(gcd(32, C), C) (Opacus' default group count) with the BatchNorm's eps and affine
    flag, and its affine weight and bias are copied over (no random draw). timm's
    BatchNormAct2d (BatchNorm + dropout + activation in one module) becomes
    Sequential(GroupNorm, drop, act), so its keys gain a ".0" ("bn1.weight" -> "bn1.0.weight").
    Running statistics are dropped: GroupNorm has none. In-place activations are made
    out-of-place (no weights change). Raises LeukError for what Opacus still cannot train privately.
    """
    fixed = copy.deepcopy(model)
    for name, module in list(fixed.named_modules()):
        if isinstance(module, _BatchNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(fixed.get_submodule(parent_name), child, _replace_batchnorm(name, module))
    for module in fixed.modules():
        # Autograd forbids in-place ops on the outputs of Opacus' backward hooks (ReLU(inplace)).
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    problems = dp_problems(fixed)
    if problems:
        raise LeukError(f"model cannot be trained with DP-SGD: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return fixed


def _replace_batchnorm(name: str, bn: _BatchNorm) -> nn.Module:
    norm = nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            norm.weight.copy_(bn.weight)
            norm.bias.copy_(bn.bias)
    norm = norm.to(device=bn.weight.device if bn.affine else None)
    if type(bn) in _PLAIN_BATCHNORMS:
        return norm
    if _is_timm_batchnorm_act(bn):
        return nn.Sequential(norm, bn.drop, bn.act)  # BatchNormAct2d.forward: norm, drop, act
    raise LeukError(f"model cannot be trained with DP-SGD: layer {name} is an unknown BatchNorm "
                    f"variant {type(bn).__name__}")


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return False
    return type(module) is BatchNormAct2d


def dp_problems(model: nn.Module) -> list[str]:
    """Why Opacus cannot train `model` privately (empty when it can)."""
    _require_opacus()
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    # ModuleValidator matches exact types, so BatchNorm subclasses (timm) slip through it.
    problems = [f"layer {n} is a BatchNorm ({type(m).__name__})"
                for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    problems += [str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)]
    problems += [str(e).splitlines()[0] for e in GradSampleModule.validate(model, strict=False)]
    return list(dict.fromkeys(problems))


# ---------------------------------------------------------------------------------------------
# Accounting


def epsilon_of(history: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at `delta` of the composition of every (noise, sample rate, steps) in `history`.

    The same bound as Opacus' RDPAccountant (same orders); RDP composes additively and is linear
    in the number of steps, so one per-step curve per (noise, sample rate) serves every round.
    """
    if not history:
        return 0.0
    _require_opacus()
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(int(steps) * _rdp_per_step(float(noise), float(rate)) for noise, rate, steps in history)
    with warnings.catch_warnings():
        # RDP warns when the best order is at the edge of its grid; the bound stays valid.
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    _require_opacus()
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends `target_epsilon` at `delta` in `steps` Poisson steps (RDP)."""
    _require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the search probes tiny noise: edge-order warnings
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp",
                                          epsilon_tolerance=0.005))


class PrivacyLedger:
    """A site's DP-SGD history on its data, kept as JSON so that fresh processes compose it.

    Every training round (of any run) that touched the site's data appends one entry; epsilon is
    always computed from the whole history, so budgets hold across rounds, runs and restarts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            for e in entries:
                _ = (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh over a damaged ledger: that would forget privacy already spent.
            raise LeukError(f"privacy ledger {self.path} is unreadable ({exc}); repair or remove it "
                            "knowingly") from None
        return entries

    def history(self) -> list[Mechanism]:
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self.entries()]

    def epsilon(self, delta: float, extra: Sequence[Mechanism] = ()) -> float:
        """Epsilon spent so far (plus `extra`, the steps about to be taken) at `delta`."""
        return epsilon_of(self.history() + list(extra), delta)

    def would_exceed(self, budget_epsilon: float, delta: float, noise_multiplier: float,
                     sample_rate: float, steps: int) -> bool:
        return self.epsilon(delta, [(noise_multiplier, sample_rate, steps)]) > budget_epsilon

    def require_budget(self, settings: DPSettings, sample_rate: float, steps: int) -> None:
        """Raise BudgetSpent, before any training, when the next `steps` would overspend."""
        if settings.budget_epsilon is None:
            return
        planned = (settings.noise_multiplier, sample_rate, steps)
        if not self.would_exceed(settings.budget_epsilon, settings.delta, *planned):
            return
        spent, after = self.epsilon(settings.delta), self.epsilon(settings.delta, [planned])
        raise BudgetSpent(f"privacy budget spent: epsilon {spent:.3f} of {settings.budget_epsilon:g} "
                          f"(delta {settings.delta:g}) used on this site's data; the next round "
                          f"({steps} steps at noise {settings.noise_multiplier:g}) would reach "
                          f"{after:.3f}, so this site stops contributing")

    def record(self, history: Sequence[Mechanism], delta: float, **context: Any) -> float:
        """Append one round's mechanisms (with e.g. run id, round); returns epsilon spent in all."""
        entries = self.entries()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for noise, rate, steps in history:
            entries.append({"time": stamp, "noise_multiplier": float(noise), "sample_rate": float(rate),
                            "steps": int(steps), **context})
        epsilon = epsilon_of([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], delta)
        if history:
            entries[-1]["epsilon_after"] = epsilon
            entries[-1]["delta"] = delta
            atomic_write_json(self.path, {"version": LEDGER_VERSION, "accountant": "rdp", "entries": entries})
        return epsilon

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Exclusive across processes: check, train and record as one step, so that two
        concurrent trainings on the same data cannot both pass the budget check."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield self
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Training


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
    _require_opacus()
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


def noise_problem(metrics: Mapping[str, Any], min_noise_multiplier: float) -> str | None:
    """Server policy: why an update must be refused for too little DP noise, or None.

    The noise multiplier is what the site reports; the server cannot verify it, so this guards
    against misconfigured sites, not dishonest ones.
    """
    if min_noise_multiplier <= 0:
        return None
    reported = metrics.get("dp_noise_multiplier")
    if reported is None:
        return f"no DP noise reported; the run requires noise multiplier >= {min_noise_multiplier:g}"
    if float(reported) < min_noise_multiplier:
        return f"DP noise multiplier {float(reported):g} < the required {min_noise_multiplier:g}"
    return None


def round_privacy(site_metrics: Mapping[Any, Mapping[str, Any]]) -> dict[str, float]:
    """For the server's history: the round's worst site epsilon and least noise (empty without DP)."""
    reports = [m for m in site_metrics.values() if "dp_epsilon" in m]
    if not reports:
        return {}
    return {"max_epsilon": max(float(m["dp_epsilon"]) for m in reports),
            "min_noise_multiplier": min(float(m["dp_noise_multiplier"]) for m in reports),
            "delta": max(float(m["dp_delta"]) for m in reports), "sites": len(reports)}
