"""Scoring a saved run on a dataset, and predicting single images or patient folders."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from leukfed.common.data import scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.images import IMAGE_EXTENSIONS, load_image
from leukfed.common.runs import check_classes, load_run
from leukfed.common.splits import load_split
from leukfed.common.train import evaluate, select_hardware
from leukfed.common.transforms import Normalize, prepare_image


def data_config_of(model):
    return model.leuk_info.data_config


def evaluate_run(run_dir: str | Path, data_dir: str | Path, *, split_file: str | Path | None = None,
                 subset: str = "test", device: str = "auto", batch_size: int = 64) -> dict:
    """Metrics of a run on a dataset: its split's `subset` when a split is given, else every image."""
    from leukfed.common.patient_model import evaluate_patient_run, is_patient_run

    if is_patient_run(run_dir):  # a patient model (`leuk train-patients`) scores whole patient folders
        if split_file is not None:
            raise LeukError("a patient model scores whole patient folders: --split does not apply")
        return evaluate_patient_run(run_dir, data_dir)
    hardware = select_hardware(device)
    model, description = load_run(run_dir, hardware.device)
    manifest = scan_dataset(data_dir)
    check_classes(description["class_names"], manifest.class_names, what=f"the data in {data_dir}")
    if split_file is not None:
        paths = list(getattr(load_split(split_file, manifest), subset))
    else:
        paths = [s.path for s in manifest.samples]
    dataset = build_dataset(manifest, paths, data_config_of(model), train=False)
    loader = make_loader(dataset, batch_size, shuffle=False)
    metrics = evaluate(model, loader, hardware, manifest.class_names, patients=dataset.groups)
    metrics["evaluated_on"] = {"data": str(data_dir), "split": str(split_file) if split_file else None,
                               "subset": subset if split_file else "all", "num_images": len(dataset)}
    return metrics


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@torch.no_grad()
def _probabilities(model, files: Sequence[Path], hardware, batch_size: int = 64) -> np.ndarray:
    config = data_config_of(model)
    normalize = Normalize(config)
    out = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([normalize(prepare_image(load_image(f), config)) for f in files[start:start + batch_size]])
        with hardware.autocast():
            logits = model(batch.to(hardware.device))
        out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out).numpy()


def predict_paths(run_dir: str | Path, paths: Sequence[str | Path], *, device: str = "auto") -> list[dict]:
    """One row per image file, and one per folder (a patient: mean probability over its images)."""
    hardware = select_hardware(device)
    model, description = load_run(run_dir, hardware.device)
    class_names = description["class_names"]
    rows = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = _images_under(path)
            if not files:
                raise LeukError(f"no images in folder {path}")
            proba, kind = _probabilities(model, files, hardware).mean(0), "patient"
        elif path.is_file():
            files, kind = [path], "image"
            proba = _probabilities(model, files, hardware)[0]
        else:
            raise LeukError(f"no such file or folder: {path}")
        rows.append({"path": str(path), "kind": kind, "num_images": len(files),
                     "predicted": class_names[int(np.argmax(proba))],
                     "probabilities": {c: float(p) for c, p in zip(class_names, proba)}})
    return rows

