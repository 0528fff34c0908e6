"""The coordinator's state directory: per-round checkpoint and history, and the final run export."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukfed.common.atomic import atomic_write_json
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.runs import (CHECKPOINT, HISTORY_JSON, config_difference, export_model,
                                 load_checkpoint, model_description, save_checkpoint)

FEDERATED_CHECKPOINT_KIND = "leukfed-federated-checkpoint/1"


@dataclass
class Resumed:
    """What a resumed run continues from."""

    round: int
    state: dict[str, torch.Tensor]
    strategy_state: dict
    history: list[dict]
    class_names: tuple[str, ...]


def checkpoint_path(state_dir: Path) -> Path:
    return state_dir / CHECKPOINT


def resume_difference(state_dir: Path, fed: FedConfig) -> list[str]:
    """Settings that differ between the saved checkpoint and this run (empty: safe to resume)."""
    return _difference(load_checkpoint(checkpoint_path(state_dir)), fed)


def _difference(ckpt: dict, fed: FedConfig) -> list[str]:
    current = fed.training_settings()
    if not fed.class_names:  # not given again: the run keeps the classes it fixed in round 1
        current["class_names"] = ckpt["settings"].get("class_names", "")
    return config_difference(ckpt["settings"], current)


def load_resumed(state_dir: Path, fed: FedConfig) -> Resumed:
    ckpt = load_checkpoint(checkpoint_path(state_dir))
    if ckpt.get("kind") != FEDERATED_CHECKPOINT_KIND:
        raise LeukError(f"{checkpoint_path(state_dir)} is not a federated checkpoint")
    differences = _difference(ckpt, fed)
    if differences:
        raise LeukError("cannot resume: the config differs from the checkpoint's: " + "; ".join(differences))
    return Resumed(ckpt["round"], ckpt["model"], ckpt.get("strategy_state", {}), ckpt["history"],
                   tuple(ckpt["class_names"]))


def save_round(state_dir: Path, *, round_: int, state: dict[str, np.ndarray], strategy_state: dict,
               fed: FedConfig, class_names, history: list[dict]) -> None:
    """Checkpoint first, then history, each atomically: a crash leaves the last complete round."""
    save_checkpoint(checkpoint_path(state_dir), {
        "kind": FEDERATED_CHECKPOINT_KIND, "round": round_,
        "model": {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()},
        "strategy_state": strategy_state, "settings": fed.training_settings(), "config": fed.to_run_config(),
        "class_names": list(class_names), "history": history, "metrics": history[-1] if history else {}})
    atomic_write_json(state_dir / HISTORY_JSON, history)


def export_final(state_dir: Path, model, class_names, fed: FedConfig, metrics: dict, history: list[dict]) -> None:
    """Make the state dir a run directory like `leuk train`'s, for `leuk evaluate` and `leuk predict`."""
    description = model_description(model, class_names, config=fed.to_run_config(), manifest_digest=None,
                                    split_digest=None, kind="federated",
                                    extra={"rounds_completed": len(history), "strategy": fed.strategy,
                                           "dp_compatible": fed.dp})
    export_model(state_dir, model, description, metrics)


def read_history(state_dir: Path) -> list[dict]:
    path = state_dir / HISTORY_JSON
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
