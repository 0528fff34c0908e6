"""The training and evaluation core shared by centralized, federated and local-only training."""
from __future__ import annotations

import contextlib
import itertools
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leukfed.common.errors import LeukError

OPTIMIZERS = ("adam", "adamw", "sgd")
LOSSES = ("ce", "kl")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images, labels) batches, e.g. a BatchLoader


@dataclass(frozen=True)
class Hardware:
    """Where and how tensors are computed."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 on CUDA
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        extra = " bf16 autocast, channels_last" if self.autocast_dtype else ""
        return f"{self.device}{extra}"


@dataclass
class EpochStats:
    """What one pass of local training measured."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy,
                f"{prefix}seconds": self.seconds}


def select_hardware(spec: str = "auto") -> Hardware:
    """`auto`: CUDA with bf16 autocast and channels_last when present, else CPU."""
    spec = spec.lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LeukError(f"device {spec!r} requested but no CUDA GPU is available")
        bf16 = torch.cuda.is_bf16_supported()
        return Hardware(torch.device(spec), torch.bfloat16 if bf16 else None, True)
    if spec != "cpu":
        raise LeukError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    return Hardware(torch.device("cpu"), None, False)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so the same seed gives the same run on the same machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights_from_counts(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def make_loss(name: str, num_classes: int, *, label_smoothing: float = 0.0,
              class_weights: torch.Tensor | None = None) -> LossFn:
    """Cross-entropy or KL-divergence to the (smoothed) one-hot target, optionally class-weighted."""
    if name not in LOSSES:
        raise LeukError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if name == "ce":
        def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            weight = class_weights.to(logits.device) if class_weights is not None else None
            return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing)
        return cross_entropy

    def kl_divergence(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # DSCNet (paper 004) trains on KL(target || softmax); with one-hot targets this equals CE,
        # with label smoothing it differs by the target entropy only.
        smooth = label_smoothing / num_classes
        dist = torch.full((len(target), num_classes), smooth, device=logits.device)
        dist.scatter_(1, target[:, None], 1.0 - label_smoothing + smooth)
        per_sample = F.kl_div(F.log_softmax(logits.float(), 1), dist, reduction="none").sum(1)
        if class_weights is None:
            return per_sample.mean()
        weight = class_weights.to(logits.device)[target]
        return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)
    return kl_divergence


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (default), AdamW or SGD with momentum over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise LeukError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def check_optimizer_state(state: dict, params: list) -> None:
    """Every saved per-parameter tensor has the parameter's shape (or is a scalar, like Adam's step)."""
    groups, per_param = state["param_groups"], state["state"]
    ids = [i for group in groups for i in group["params"]]
    if len(ids) != len(params):
        raise ValueError(f"the optimizer state has {len(ids)} parameters, the model {len(params)}")
    shapes = {i: tuple(p.shape) for i, p in zip(ids, params)}
    for index, values in per_param.items():
        if index not in shapes or not isinstance(values, dict):
            raise ValueError(f"optimizer state for unknown parameter {index!r}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shapes[index]:
                raise ValueError(f"optimizer state {name} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {shapes[index]}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam's moments and step, SGD's momentum) as flat tensors
    keyed "<parameter index>.<name>"; its settings (learning rate ...) are the run's and not kept."""
    return {f"{index}.{name}": (value.detach().cpu().clone() if isinstance(value, torch.Tensor)
                                else torch.tensor(value))
            for index, values in optimizer.state_dict()["state"].items() for name, value in values.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> bool:
    """Put back what optimizer_tensors kept, when it fits this optimizer's parameters; False (the
    optimizer untouched, starting afresh) when it does not."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        state = {"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]}
        check_optimizer_state(state, [p for group in optimizer.param_groups for p in group["params"]])
    except ValueError:
        return False
    optimizer.load_state_dict(state)
    return True


def prepare_model(model: nn.Module, hardware: Hardware) -> nn.Module:
    model = model.to(hardware.device)
    if hardware.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batches(loader: Batches, max_steps: int | None) -> Iterator:
    """Cycle the loader until max_steps (steps mode), or one pass (epoch mode)."""
    if max_steps is None:
        yield from loader
        return
    steps = 0
    while steps < max_steps:
        for batch in loader:
            yield batch
            steps += 1
            if steps >= max_steps:
                return


def train_epoch(model: nn.Module, loader: Batches, optimizer: torch.optim.Optimizer,
                loss_fn: LossFn, hardware: Hardware, *, max_steps: int | None = None,
                regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
                on_step: Callable[[int], None] | None = None) -> EpochStats:
    """One pass over the loader (or `max_steps` batches); `regularizer` adds e.g. FedProx's term."""
    model.train()
    start = time.perf_counter()
    # Totals stay on the device and are read once after the loop: no host sync per step on a GPU.
    total_loss = torch.zeros((), dtype=torch.float64, device=hardware.device)
    correct = torch.zeros((), dtype=torch.int64, device=hardware.device)
    seen = steps = 0
    for images, target in _batches(loader, max_steps):
        images = images.to(hardware.device, non_blocking=True)
        if hardware.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(hardware.device, non_blocking=True)
        with hardware.autocast():
            logits = model(images)
            loss = loss_fn(logits, target)
        if regularizer is not None:
            loss = loss + regularizer(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().double() * len(target)
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
        steps += 1
        if on_step is not None:
            on_step(len(target))
    if seen == 0:
        raise LeukError("no training examples: the training set is empty")
    return EpochStats(float(total_loss) / seen, int(correct) / seen, seen, steps, time.perf_counter() - start)


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's BatchNorm layers (weights, biases, running statistics)."""
    return [f"{name}.{key}" for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) for key in module.state_dict()]


def recalibrate_batchnorm(model: nn.Module, loader: Batches, hardware: Hardware, max_batches: int) -> int:
    """Recompute BatchNorm running statistics over up to `max_batches` training batches with the current
    weights ("precise BN"): a plain average instead of the momentum average of past weights, which lags
    when the weights move fast (DSCNet: benchmarks/dscnet_stability.py). Returns the batches used."""
    if max_batches <= 0 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    used = 0

    def moved_batches() -> Iterator[torch.Tensor]:
        nonlocal used
        for images, _ in itertools.islice(iter(loader), max_batches):
            used += 1
            images = images.to(hardware.device, non_blocking=True)
            yield images.contiguous(memory_format=torch.channels_last) if hardware.channels_last else images

    with torch.no_grad(), hardware.autocast():
        torch.optim.swa_utils.update_bn(moved_batches(), model)
    return used


@torch.no_grad()
def predict(model: nn.Module, loader: Batches, hardware: Hardware) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and the loader's labels (N,)."""
    model.eval()
    probs, labels = [], []
    for images, target in loader:
        images = images.to(hardware.device, non_blocking=True)
        if hardware.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with hardware.autocast():
            logits = model(images)
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(target)
    if not probs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(model: nn.Module, loader: Batches, hardware: Hardware, class_names, *,
             patients=None, loss_fn: LossFn | None = None) -> dict:
    """Clinical metrics on a loader; adds patient-level metrics when patients are given."""
    from leukfed.common.metrics import classification_metrics, patient_metrics

    proba, labels = predict(model, loader, hardware)
    metrics = classification_metrics(labels, proba, class_names)
    if loss_fn is not None and len(labels):
        logits = torch.log(torch.as_tensor(proba).clamp_min(1e-12))
        metrics["loss"] = float(loss_fn(logits, torch.as_tensor(labels)))
    if patients is not None and all(p is not None for p in patients):
        metrics["patient_level"] = patient_metrics(labels, proba, list(patients), class_names)
    return metrics


def proximal_term(model: nn.Module, mu: float) -> Callable[[nn.Module], torch.Tensor]:
    """FedProx: (mu/2)·||w − w_global||² against the weights the round started from."""
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def term(current: nn.Module) -> torch.Tensor:
        params = [p for p in current.parameters() if p.requires_grad]
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
    return term
