"""What one hospital does in a federated round: load its data, train locally, evaluate. No Flower."""
from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.dataset import SmearDataset, build_dataset, make_loader
from leukfed.common.dp_accounting import PrivacyLedger
from leukfed.common.dp_model import dp_compatible
from leukfed.common.dp_settings import DPSettings
from leukfed.common.dp_training import private_train
from leukfed.common.errors import LeukError, SiteRefusal
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.splits import make_split
from leukfed.common.train import (EpochStats, Hardware, LossFn, class_weights_from_counts, evaluate,
                                  load_optimizer_tensors, make_loss, make_optimizer, optimizer_tensors, prepare_model,
                                  proximal_term, recalibrate_batchnorm, seed_everything, select_hardware, train_epoch)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteShare:
    """Which images a site trains and validates on. A simulation's virtual sites may also relabel their
    training images or replace their update (simulations/client_app.py); a hospital's never do."""

    manifest: Manifest
    train: list[str]
    val: list[str]
    classes: tuple[str, ...]
    relabel: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    tamper: Callable[[State, State, int], State] | None = None


@dataclass
class SiteData:
    """A site's training and site-local validation images, decoded once."""

    class_names: tuple[str, ...]
    train: SmearDataset
    val: SmearDataset
    load_seconds: float
    tamper: Callable[[State, State, int], State] | None = None  # simulation only

    @property
    def nbytes(self) -> int:
        return self.train.images.nbytes + self.val.images.nbytes


# A simulation actor serves many virtual sites in turn: keep several sites' decoded images (bounded by
# bytes) and one manifest per dataset, so a round does not re-hash and re-decode the data.
_CACHE: "OrderedDict[tuple, SiteData]" = OrderedDict()
_CACHE_BYTES = int(os.environ.get("LEUK_SITE_CACHE_MB", "2048")) * 2**20


@functools.lru_cache(maxsize=4)
def cached_manifest(root: str) -> Manifest:
    return scan_dataset(root)


def _remember(key: tuple, data: SiteData) -> None:
    _CACHE[key] = data
    _CACHE.move_to_end(key)
    while len(_CACHE) > 1 and sum(d.nbytes for d in _CACHE.values()) > _CACHE_BYTES:
        _CACHE.popitem(last=False)


def site_manifest(site: SiteConfig) -> Manifest:
    """The site's images; with an image cache, their hashes are kept there between tasks (each task is a
    fresh process: without it every round reads every image again to hash it)."""
    if not site.data_path:
        raise LeukError(f"site {site.name} has no data-path in its node config")
    return scan_dataset(site.data_path, Path(site.image_cache) if site.image_cache else None)


def hospital_share(fed: FedConfig, site: SiteConfig) -> SiteShare:
    """A hospital's images: a site-local train/validation split of its data-path."""
    manifest = site_manifest(site)
    split = make_split(manifest, val_fraction=fed.site_val_fraction, test_fraction=0.0, seed=fed.seed,
                       group_by=fed.site_group_by)
    check_site_classes(manifest.class_names, fed.classes, site.name)
    return SiteShare(manifest, list(split.train), list(split.val), manifest.class_names)


ShareSource = Callable[[FedConfig, SiteConfig], SiteShare]
_SOURCE: list[ShareSource] = [hospital_share]


def use_share_source(source: ShareSource) -> None:
    """Where this process's sites take their images from; only a simulation's ClientApp changes it."""
    _SOURCE[0] = source


def site_class_names(fed: FedConfig, site: SiteConfig) -> tuple[str, ...]:
    """The class list of the site's data, without decoding any image."""
    if _SOURCE[0] is hospital_share:
        return site_manifest(site).class_names
    return _SOURCE[0](fed, site).classes


def check_site_classes(site_classes, run_classes, site_name: str) -> None:
    if run_classes and tuple(site_classes) != tuple(run_classes):
        # The class names are what the coordinator's class query already asks every site for.
        raise SiteRefusal(f"site {site_name} refused: its classes {list(site_classes)} differ from the "
                        f"run's classes {list(run_classes)}")


def load_site_data(fed: FedConfig, site: SiteConfig) -> SiteData:
    """Decode the site's images once per process (simulation actors reuse them across rounds)."""
    from leukfed.models import resolve_data_config

    key = (_SOURCE[0], site.partition_file, site.partition_id, site.data_path, fed.model, fed.image_size,
           fed.augment, fed.seed, fed.site_val_fraction, fed.site_group_by)
    if key not in _CACHE:
        start = time.perf_counter()
        share = _SOURCE[0](fed, site)
        data_config = resolve_data_config(fed.model, fed.image_size or None)
        cache = Path(site.image_cache) if site.image_cache else None
        train = build_dataset(share.manifest, share.train, data_config, train=True, augment=fed.augment,
                              cache_dir=cache)
        val = build_dataset(share.manifest, share.val, data_config, train=False, cache_dir=cache)
        if share.relabel is not None:
            train.labels = share.relabel(train.labels, len(share.classes))
        _remember(key, SiteData(tuple(share.classes), train, val, time.perf_counter() - start, share.tamper))
    _CACHE.move_to_end(key)
    return _CACHE[key]


def build_site_model(fed: FedConfig, num_classes: int, state: State | None = None) -> nn.Module:
    """The run's architecture, filled with the global weights the server sent (when given, the
    architecture is not initialised first where the weights set every tensor of it)."""
    from leukfed.models import create_model

    def build() -> nn.Module:
        model = create_model(fed.model, num_classes, pretrained=False, image_size=fed.image_size or None)
        return dp_compatible(model) if fed.dp else model  # as the server's initial_model: same keys and shapes

    model = _uninitialised(build) if state is not None else None
    if model is None:
        model = build()
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise LeukError(f"global weights do not fit model {fed.model}: {str(exc).splitlines()[0]}") from None
    return model


def _uninitialised(build) -> nn.Module | None:
    """`build()` on the meta device, then given empty CPU storage for the weights to fill: random
    initialisation of a large model costs more than loading its weights. None where a buffer would
    stay unset (one that is not in the state dict) or the model cannot be built that way."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # any model code that needs real values at construction: build it normally
        return None
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        return None
    return model.to_empty(device="cpu")


@dataclass
class LocalResult:
    state: State
    num_examples: int
    metrics: dict[str, float]
    optimizer_state: State | None = None   # --local-optimizer-state: kept by the site for its next round


def site_dp_settings(fed: FedConfig, site: SiteConfig) -> DPSettings | None:
    """The site's DP-SGD settings (None: no DP); a site that demands DP refuses a run without it.
    Epsilon is accounted at the run's delta, which the site's policy (client/policy.py) has checked is
    no larger than the site's own."""
    if not fed.dp:
        if site.dp_budget > 0 or site.dp_noise_multiplier > 0:
            raise SiteRefusal(f"site {site.name} refused: it requires differential privacy (dp-budget or "
                            "dp-noise-multiplier in its node config) but the run trains without it")
        return None
    return DPSettings(max(fed.dp_noise_multiplier, site.dp_noise_multiplier), fed.dp_max_grad_norm,
                      fed.dp_delta, site.dp_budget or None)


def ledger_path(fed: FedConfig, site: SiteConfig) -> Path:
    """Where the site's privacy history lives: it must outlive the process, the round and the run."""
    if site.dp_ledger:
        return Path(site.dp_ledger)
    if site.audit_log:
        return Path(site.audit_log).with_name("privacy-ledger.json")
    raise LeukError(f"site {site.name} trains with DP but has no privacy ledger: set dp-ledger in its node config")


def site_model(fed: FedConfig, site: SiteConfig, data: SiteData, state: State) -> nn.Module:
    """The run's model filled with the global weights, on the site's device. A train task builds it
    once, scores it (eval mode changes no weight or BatchNorm statistic), then trains it."""
    return prepare_model(build_site_model(fed, len(data.class_names), state), select_hardware(site.device))


def local_train(fed: FedConfig, site: SiteConfig, data: SiteData, state: State, server_round: int,
                *, proximal_mu: float = 0.0, lr: float | None = None, run_id: int | None = None,
                model: nn.Module | None = None, optimizer_state: State | None = None) -> LocalResult:
    """Train the global weights (`model`, or a new site_model) on the site's data for the round's local
    epochs or steps, the optimizer resuming `optimizer_state` (this site's from its last round) when
    given and it fits; with DP, DP-SGD, refusing (BudgetSpent) before any training once the round would
    overspend the site's budget."""
    dp = site_dp_settings(fed, site)
    hardware = select_hardware(site.device)
    model = site_model(fed, site, data, state) if model is None else model.train()  # scored first: eval mode
    seed_everything(fed.seed * 100_003 + server_round * 1_009 + max(site.partition_id, 0))
    weights = class_weights_from_counts(np.bincount(data.train.labels.numpy(), minlength=len(data.class_names))) \
        if fed.class_weights else None
    loss_fn = make_loss(fed.loss, len(data.class_names), label_smoothing=fed.label_smoothing, class_weights=weights)
    optimizer = make_optimizer(model, fed.optimizer, lr or fed.lr, fed.weight_decay)
    if optimizer_state and dp is None:
        load_optimizer_tensors(optimizer, optimizer_state)
    loader = make_loader(data.train, fed.batch_size, shuffle=True, seed=fed.seed + server_round)
    privacy: dict[str, float] = {}
    if dp is None:
        stats_list = _train_plain(fed, model, loader, optimizer, loss_fn, hardware, proximal_mu)
        recalibrate_batchnorm(model, loader, hardware, fed.bn_recalibration)
    else:
        result = private_train(model, optimizer, loader, loss_fn, hardware, dp, epochs=fed.local_epochs,
                               max_steps=fed.local_steps or None, ledger=PrivacyLedger(ledger_path(fed, site)),
                               proximal_mu=proximal_mu, context={"run_id": run_id, "round": server_round})
        stats_list, privacy = result.stats, result.metrics()
    seen = sum(s.num_examples for s in stats_list)
    metrics = {
        "train_loss": sum(s.loss * s.num_examples for s in stats_list) / max(seen, 1),
        "train_accuracy": sum(s.accuracy * s.num_examples for s in stats_list) / max(seen, 1),
        "train_seconds": sum(s.seconds for s in stats_list),
        "examples_processed": float(seen),
    }
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if data.tamper is not None:  # a simulated faulty or malicious site
        new_state = data.tamper(state, new_state, fed.seed + server_round)
    kept = optimizer_tensors(optimizer) if fed.local_optimizer_state and dp is None else None
    return LocalResult(new_state, len(data.train), {**accounted(fed, site, metrics), **privacy}, kept)


STATISTICS_TASK = "bn-statistics"   # train-config key: only recompute BatchNorm statistics (--bn-statistics-round)


def site_statistics(fed: FedConfig, site: SiteConfig, data: SiteData, state: State, batches: int) -> LocalResult:
    """The statistics round: the global weights unchanged, their BatchNorm statistics recomputed over up to
    `batches` of the site's training batches (as they are augmented in training); no weight moves."""
    model = site_model(fed, site, data, state)
    loader = make_loader(data.train, fed.batch_size, shuffle=True, seed=fed.seed)
    used = recalibrate_batchnorm(model, loader, select_hardware(site.device), batches)
    examples = min(used * fed.batch_size, len(data.train))
    new_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return LocalResult(new_state, examples, {"statistics_batches": float(used), "examples_processed": float(examples)})


def accounted(fed: FedConfig, site: SiteConfig, metrics: dict[str, float]) -> dict[str, float]:
    """Under DP only what the privacy accounting covers leaves the site (the update, its epsilon and the
    example count): losses, accuracies and timings computed on the data in clear are withheld, unless the
    site's own config releases them (dp-clear-metrics)."""
    return metrics if not fed.dp or site.dp_clear_metrics else {}


def _train_plain(fed: FedConfig, model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 hardware: Hardware, proximal_mu: float) -> list[EpochStats]:
    regularizer = proximal_term(model, proximal_mu) if proximal_mu > 0 else None
    if fed.local_steps > 0:
        return [train_epoch(model, loader, optimizer, loss_fn, hardware, max_steps=fed.local_steps,
                            regularizer=regularizer)]
    return [train_epoch(model, loader, optimizer, loss_fn, hardware, regularizer=regularizer)
            for _ in range(fed.local_epochs)]


def local_evaluate(fed: FedConfig, site: SiteConfig, data: SiteData, state: State,
                   model: nn.Module | None = None) -> LocalResult:
    """Score the global weights (`model`, or a new site_model) on the site-local validation split
    (aggregate numbers only)."""
    hardware = select_hardware(site.device)
    if model is None:
        model = site_model(fed, site, data, state)
    loss_fn = make_loss(fed.loss, len(data.class_names))
    loader = make_loader(data.val, fed.batch_size * 2, shuffle=False)
    metrics = evaluate(model, loader, hardware, data.class_names, loss_fn=loss_fn)
    summary = {"eval_loss": metrics.get("loss", float("nan")), "eval_accuracy": metrics["accuracy"],
               "eval_balanced_accuracy": metrics["balanced_accuracy"], "eval_macro_f1": metrics["macro_f1"]}
    return LocalResult(state, len(data.val), accounted(fed, site, summary))


def suppress_small(metrics: dict[str, float], num_examples: int, minimum: int) -> dict[str, float]:
    """Data minimisation: metrics computed on fewer than `minimum` examples are not released."""
    return metrics if num_examples >= minimum else {}

