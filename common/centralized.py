"""The centralized training recipe behind `leuk train`: flat, resumable, fully recorded."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from leukfed.common.atomic import atomic_write_json
from leukfed.common.model_card import centralized_card, config_defaults, write_model_card
from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.checkpoint import load_checkpoint, save_checkpoint
from leukfed.common.runs import (CHECKPOINT, HISTORY_JSON, config_difference, export_model, model_description,
                                 refuse_legacy_checkpoint)
from leukfed.common.splits import Split, load_split, make_split, save_split
from leukfed.common.train import (check_optimizer_state, class_weights_from_counts, evaluate, make_loss,
                                  make_optimizer, prepare_model, recalibrate_batchnorm, seed_everything,
                                  select_hardware, train_epoch)

# Settings that may change between an interrupted run and its resumption.
RESUMABLE = ("epochs", "device", "patience")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a centralized (or local-only) training run."""

    model: str = "dscnet"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    loss: str = "ce"
    label_smoothing: float = 0.0
    class_weights: bool = False
    image_size: int | None = None
    augment: str = "paper002"
    pretrained: str = "auto"
    weights: str | None = None
    seed: int = 0
    patience: int = 0
    device: str = "auto"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_by: str = "auto"
    skip_bad: bool = False
    bn_recalibration: int = 0

    def __post_init__(self) -> None:
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.lr > 0, "learning rate must be > 0"), (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
                  (self.patience >= 0, "patience must be >= 0"),
                  (self.bn_recalibration >= 0, "BatchNorm recalibration batches must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise LeukError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_digest(split: Split) -> str:
    payload = json.dumps([list(split.train), list(split.val), list(split.test)]).encode()
    return hashlib.sha256(payload).hexdigest()


def resolve_split(manifest: Manifest, cfg: TrainConfig, split_file: str | Path | None,
                  out_dir: Path | None = None) -> Split:
    """Load the given split (checked against the data) or make one and save it next to the run."""
    if split_file is not None:
        split = load_split(split_file, manifest)
    else:
        split = make_split(manifest, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                           seed=cfg.seed, group_by=cfg.group_by)
    if out_dir is not None:
        save_split(split, out_dir / "split.json")
    return split


def build_model(cfg: TrainConfig, num_classes: int):
    from leukfed.models import create_model

    pretrained: bool | str = cfg.pretrained
    if cfg.weights is not None:
        pretrained = False
    elif cfg.pretrained == "auto":
        from leukfed.models.registry import get_spec
        pretrained = "package" if get_spec(cfg.model).package is not None else "none"
    return create_model(cfg.model, num_classes, pretrained=pretrained, weights=cfg.weights,
                        image_size=cfg.image_size)


@dataclass
class Callbacks:
    """Hooks for progress display; all optional."""

    on_epoch_start: Callable[[int, int], None] | None = None   # (epoch, steps in epoch)
    on_step: Callable[[int], None] | None = None                # (examples in the batch)
    on_epoch_end: Callable[[dict], None] | None = None          # history row


def train_centralized(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                      split_file: str | Path | None = None, resume: bool = False,
                      callbacks: Callbacks | None = None, manifest: Manifest | None = None) -> dict:
    """Train on the training split, select on validation, score on test; returns test metrics."""
    callbacks = callbacks or Callbacks()
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    refuse_legacy_checkpoint(out_dir)
    if checkpoint_path.exists() and not resume:
        raise LeukError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    manifest = manifest or scan_dataset(data_dir)
    if resume and (out_dir / "split.json").exists():
        split_file = out_dir / "split.json"
    split = resolve_split(manifest, cfg, split_file, out_dir)
    class_names = manifest.class_names
    model = build_model(cfg, len(class_names))
    data_config = model.leuk_info.data_config
    hardware = select_hardware(cfg.device)
    model = prepare_model(model, hardware)

    train_set = build_dataset(manifest, split.train, data_config, train=True, augment=cfg.augment, skip_bad=cfg.skip_bad)
    val_set = build_dataset(manifest, split.val, data_config, train=False, skip_bad=cfg.skip_bad)
    test_set = build_dataset(manifest, split.test, data_config, train=False, skip_bad=cfg.skip_bad)
    counts = np.bincount(train_set.labels.numpy(), minlength=len(class_names))
    weights = class_weights_from_counts(counts) if cfg.class_weights else None
    loss_fn = make_loss(cfg.loss, len(class_names), label_smoothing=cfg.label_smoothing, class_weights=weights)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    train_loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val_loader = make_loader(val_set, cfg.batch_size * 2, shuffle=False)

    history: list[dict] = []
    best = {"val_loss": float("inf"), "epoch": 0, "state": None}
    start_epoch = 1
    if resume and checkpoint_path.exists():
        ckpt = load_checkpoint(checkpoint_path)
        saved = {"bn_recalibration": 0, **_part(ckpt, "config", dict, checkpoint_path)}  # before the setting
        differences = config_difference(saved, cfg.to_dict(), ignore=RESUMABLE)
        if differences:
            raise LeukError("cannot resume with a different config: " + "; ".join(differences))
        history, best, start_epoch = _restore(ckpt, checkpoint_path, model, optimizer, train_loader)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.patience and epoch - best["epoch"] > cfg.patience and best["state"] is not None:
            break
        if callbacks.on_epoch_start:
            callbacks.on_epoch_start(epoch, len(train_loader))
        stats = train_epoch(model, train_loader, optimizer, loss_fn, hardware, on_step=callbacks.on_step)
        recalibrate_batchnorm(model, train_loader, hardware, cfg.bn_recalibration)
        val = evaluate(model, val_loader, hardware, class_names, loss_fn=loss_fn)
        row = {"epoch": epoch, **stats.as_metrics(), "val_loss": val.get("loss", float("nan")),
               "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "time": time.time()}
        history.append(row)
        if row["val_loss"] < best["val_loss"]:
            best = {"val_loss": row["val_loss"], "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "config": cfg.to_dict(), "history": history, "best": best, "rng": torch.get_rng_state(),
            "loader_rng": train_loader.generator.get_state(), "metrics": row})
        atomic_write_json(out_dir / HISTORY_JSON, history)
        if callbacks.on_epoch_end:
            callbacks.on_epoch_end(row)

    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test_loader = make_loader(test_set, cfg.batch_size * 2, shuffle=False)
    metrics = evaluate(model, test_loader, hardware, class_names, patients=test_set.groups, loss_fn=loss_fn)
    metrics["best_epoch"] = best["epoch"]
    metrics["epochs_run"] = len(history)
    description = model_description(
        model, class_names, config=cfg.to_dict(), manifest_digest=manifest.digest(),
        split_digest=split_digest(split), kind="centralized",
        extra={"hardware": hardware.describe(), "num_train": len(train_set)})
    export_model(out_dir, model, description, metrics)
    write_model_card(out_dir, centralized_card(
        cfg.to_dict(), config_defaults(TrainConfig), model.leuk_info.pretrained_source, class_names,
        data_dir=str(data_dir), out_dir=str(out_dir), history=history, metrics=metrics,
        images={"train": len(train_set), "val": len(val_set), "test": len(test_set)}))
    write_plots(out_dir, history, metrics)
    from leukfed.common.calibration import calibrate_after_training
    calibrate_after_training(out_dir, model, val_set, hardware, class_names)
    return metrics


def _part(ckpt: dict, key: str, kind: type, path: Path):
    value = ckpt.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LeukError(f"checkpoint {path} is malformed: {key!r} is missing or not a {kind.__name__}")
    return value


def _restore(ckpt: dict, path: Path, model, optimizer, train_loader) -> tuple[list[dict], dict, int]:
    """Put model, optimizer and random state back as the checkpoint left them; (history, best, next epoch)."""
    history, best, epoch = _part(ckpt, "history", list, path), _part(ckpt, "best", dict, path), _part(ckpt, "epoch", int, path)
    state = _part(ckpt, "optimizer", dict, path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        model.load_state_dict(_part(ckpt, "model", dict, path))
        if best.get("state") is not None:
            _check_same_shapes(best["state"], model.state_dict())
        check_optimizer_state(state, params)
        optimizer.load_state_dict(state)
        torch.set_rng_state(ckpt["rng"])
        train_loader.generator.set_state(ckpt["loader_rng"])
        float(best["val_loss"]), int(best["epoch"])  # used as numbers by the epoch loop
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise LeukError(f"checkpoint {path} does not fit this run: {str(exc).strip().splitlines()[0][:300]}") from None
    return history, best, epoch + 1


def _check_same_shapes(state: dict, reference: dict) -> None:
    if not isinstance(state, dict) or state.keys() != reference.keys():
        raise ValueError("the best model's tensors differ from the model's")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != reference[key].shape:
            raise ValueError(f"the best model's {key} does not have the model's shape")


def write_plots(out_dir: Path, history: list[dict], metrics: dict, *, x_label: str = "epoch") -> None:
    """Learning curves and the confusion matrix as PNGs next to the metrics."""
    from leukfed.common.plots import plot_confusion_matrix, plot_history

    if history:
        plot_history(history, out_dir / "curves.png", xlabel=x_label)
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], out_dir / "confusion_matrix.png")
