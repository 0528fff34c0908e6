"""Run directories: exported models, checkpoints and their metadata, all written atomically."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from leukfed import __version__
from leukfed.common.atomic import atomic_write_bytes, atomic_write_json
from leukfed.common.errors import LeukError

RUN_FORMAT = "leukfed-run/1"
MODEL_FILE, MODEL_JSON, METRICS_JSON, HISTORY_JSON, CHECKPOINT = (
    "model.safetensors", "model.json", "metrics.json", "history.json", "checkpoint.safetensors")
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle, written by earlier versions: never opened


def state_dict_bytes(model: nn.Module) -> bytes:
    """The model's weights as safetensors bytes (CPU, contiguous)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(state)


def model_description(model: nn.Module, class_names, *, config: dict, manifest_digest: str | None,
                      split_digest: str | None, kind: str, extra: dict | None = None) -> dict:
    """The model.json content: everything needed to rebuild and trust the model later."""
    info = model.leuk_info
    return {
        "format": RUN_FORMAT,
        "kind": kind,
        "model": info.name,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "data_config": info.data_config.to_dict(),
        "pretrained_source": info.pretrained_source,
        "manifest_digest": manifest_digest,
        "split_digest": split_digest,
        "config": config,
        "leukfed_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def export_model(run_dir: Path, model: nn.Module, description: dict, metrics: dict | None = None) -> None:
    """Write model.safetensors, model.json and (when given) metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / MODEL_FILE, state_dict_bytes(model))
    atomic_write_json(run_dir / MODEL_JSON, description)
    if metrics is not None:
        atomic_write_json(run_dir / METRICS_JSON, metrics)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LeukError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:       # ValueError: not JSON, or not UTF-8
        raise LeukError(f"{what} {path} is unreadable: {exc}") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a run directory (from `leuk train` or a federated server's state dir)."""
    from leukfed.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LeukError(f"run directory not found: {run_dir}")
    description = read_json(run_dir / MODEL_JSON, "model description")
    if not isinstance(description, dict) or description.get("format") != RUN_FORMAT:
        raise LeukError(f"{run_dir / MODEL_JSON} is not a leukfed model description")
    image_size = description["data_config"]["input_size"][1]
    model = create_model(description["model"], description["num_classes"], image_size=image_size)
    if description.get("dp_compatible"):
        from leukfed.common.dp_model import dp_compatible
        model = dp_compatible(model)  # trained with DP-SGD: GroupNorm where the model has BatchNorm
    try:
        state = load_safetensors((run_dir / MODEL_FILE).read_bytes())
    except FileNotFoundError:
        raise LeukError(f"model weights not found: {run_dir / MODEL_FILE}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise LeukError(f"model weights {run_dir / MODEL_FILE} are unreadable: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise LeukError(f"weights in {run_dir} do not fit model {description['model']}: "
                        f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), description


def check_classes(run_classes, data_classes, *, what: str = "the data") -> None:
    """Refuse to mix a model and data whose class lists differ, showing both."""
    if list(run_classes) != list(data_classes):
        raise LeukError(f"classes differ: the model has {list(run_classes)}, {what} has {list(data_classes)}")


def refuse_legacy_checkpoint(folder: Path) -> None:
    """LeukError when `folder` holds only a pickled checkpoint.pt: it is never opened (unpickling runs code)."""
    if (folder / LEGACY_CHECKPOINT).exists() and not (folder / CHECKPOINT).exists():
        raise LeukError(f"{folder / LEGACY_CHECKPOINT} is in the old pickle checkpoint format, which leukfed no "
                        f"longer reads (the format changed to {CHECKPOINT}); start a new run in another folder")


def config_difference(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human lines naming each setting that differs between a checkpoint and the current run."""
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{k}: checkpoint has {saved.get(k)!r}, now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
