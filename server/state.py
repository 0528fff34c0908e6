"""The coordinator's state directory: per-round checkpoint and history, and the final run export."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from leukfed.common.atomic import atomic_write_json
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.checkpoint import load_checkpoint, save_checkpoint
from leukfed.common.model_card import federated_card, write_model_card
from leukfed.common.runs import (CHECKPOINT, HISTORY_JSON, config_difference, export_model, model_description,
                                 refuse_legacy_checkpoint)

FEDERATED_CHECKPOINT_KIND = "leukfed-federated-checkpoint/2"


@dataclass
class Resumed:
    """What a resumed run continues from."""

    round: int
    state: dict[str, torch.Tensor]
    strategy_state: dict
    history: list[dict]
    class_names: tuple[str, ...]


def checkpoint_path(state_dir: Path) -> Path:
    """The state dir's checkpoint; LeukError when it holds only the old pickled checkpoint.pt."""
    refuse_legacy_checkpoint(state_dir)
    return state_dir / CHECKPOINT


def resume_difference(state_dir: Path, fed: FedConfig) -> list[str]:
    """Settings that differ between the saved checkpoint and this run (empty: safe to resume)."""
    return _difference(_read(state_dir), fed)


def _difference(ckpt: dict, fed: FedConfig) -> list[str]:
    current = fed.training_settings()
    if not fed.class_names:  # not given again: the run keeps the classes it fixed in round 1
        current["class_names"] = ckpt["settings"].get("class_names", "")
    # A setting added after the checkpoint was written: the run then behaved as its default does.
    defaults = {f.name: f.default for f in fields(FedConfig) if f.name in current}
    saved = {**defaults, **ckpt["settings"]}
    return config_difference(saved, current)


def load_resumed(state_dir: Path, fed: FedConfig) -> Resumed:
    ckpt = _read(state_dir)
    differences = _difference(ckpt, fed)
    if differences:
        raise LeukError("cannot resume: the config differs from the checkpoint's: " + "; ".join(differences))
    return Resumed(ckpt["round"], ckpt["model"], ckpt["strategy_state"], upgrade_history(ckpt["history"]),
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


def _read(state_dir: Path) -> dict:
    """The checkpoint, its parts checked for type and the strategy's arrays for the model's shapes."""
    path = checkpoint_path(state_dir)
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != FEDERATED_CHECKPOINT_KIND:
        raise LeukError(f"{path} is not a federated checkpoint")
    expected = {"round": int, "model": dict, "strategy_state": dict, "settings": dict, "history": list,
                "class_names": list}
    for key, kind in expected.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise LeukError(f"checkpoint {path} is malformed: {key!r} is missing or not a {kind.__name__}")
    model = ckpt["model"]
    if not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise LeukError(f"checkpoint {path} is malformed: the model holds a value that is not a tensor")
    if not all(isinstance(c, str) for c in ckpt["class_names"]):
        raise LeukError(f"checkpoint {path} is malformed: a class name is not a string")
    _check_strategy_arrays(ckpt["strategy_state"], {k: tuple(v.shape) for k, v in model.items()}, path)
    return ckpt


def _check_strategy_arrays(value, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Arrays the strategy keeps per model tensor must have that tensor's shape: by name (FedAdam's moments)
    or, for a list of arrays (FedAvgM's momentum), in the model's order."""
    if isinstance(value, list) and value and all(isinstance(item, (np.ndarray, np.generic)) for item in value):
        if len(value) != len(shapes):
            raise LeukError(f"checkpoint {path} is malformed: strategy state holds {len(value)} arrays, the model "
                            f"{len(shapes)} tensors")
        value = dict(zip(shapes, value))
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key in shapes and isinstance(item, (np.ndarray, np.generic)) and np.shape(item) != shapes[key]:
            raise LeukError(f"checkpoint {path} is malformed: strategy state for {key} has shape "
                            f"{np.shape(item)}, the model {shapes[key]}")
        if isinstance(item, (dict, list)):
            _check_strategy_arrays(item, shapes, path)


def export_final(state_dir: Path, model, class_names, fed: FedConfig, metrics: dict, history: list[dict]) -> None:
    """Make the state dir a run directory like `leuk train`'s, for `leuk evaluate` and `leuk predict`."""
    description = model_description(model, class_names, config=fed.to_run_config(), manifest_digest=None,
                                    split_digest=None, kind="federated",
                                    extra={"rounds_completed": len(history), "strategy": fed.strategy,
                                           "dp_compatible": fed.dp})
    export_model(state_dir, model, description, metrics)
    write_model_card(state_dir, federated_card(fed, model.leuk_info.pretrained_source, class_names, history, metrics))


def read_history(state_dir: Path) -> list[dict]:
    path = state_dir / HISTORY_JSON
    try:
        return upgrade_history(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def upgrade_history(rows: list) -> list:
    """Rows of an older state dir in today's form: `sites` keyed by site name (`node-<id>` where none was
    registered) with the node id as `node`, and every failure, rejection and ignored reply naming its `site`."""
    for row in rows:
        if not isinstance(row, dict):
            continue
        sites = row.get("sites")
        if isinstance(sites, dict) and any(isinstance(v, dict) and "node" not in v for v in sites.values()):
            row["sites"] = {_old_site_name(key, site): _old_site_row(key, site) for key, site in sites.items()}
        for kind in ("failures", "rejected", "ignored"):
            for entry in row.get(kind) or []:
                if isinstance(entry, dict) and "site" not in entry and "node" in entry:
                    entry["site"] = f"node-{entry['node']}"
    return rows


def _old_site_name(key: str, site) -> str:
    if isinstance(site, dict) and site.get("name"):
        return str(site["name"])
    return key if "node" in (site or {}) else f"node-{key}"


def _old_site_row(key: str, site) -> dict:
    if not isinstance(site, dict) or "node" in site:
        return site
    node = int(key) if str(key).isdigit() else key
    return {"node": node, **{k: v for k, v in site.items() if k != "name"}}
