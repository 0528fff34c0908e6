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
from leukfed.common.train import predict, select_hardware
from leukfed.common.transforms import Normalize, prepare_image


def data_config_of(model):
    return model.leuk_info.data_config


def evaluate_run(run_dir: str | Path, data_dir: str | Path, *, split_file: str | Path | None = None,
                 subset: str = "test", device: str = "auto", batch_size: int = 64, bootstrap: int = 0,
                 bootstrap_seed: int = 0, predictions_file: str | Path | None = None) -> dict:
    """Metrics of a run on a dataset: its split's `subset` when a split is given, else every image.
    With `bootstrap` N > 0, 95 % intervals (`ci` beside the metrics, image and patient level); with
    `predictions_file` (.npz or .json), the per-image probabilities, labels and patient ids."""
    from leukfed.common.metrics import metrics_with_patients
    from leukfed.common.stats import Predictions, intervals, save_predictions

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
    proba, labels = predict(model, loader, hardware)
    pred = Predictions(proba, labels, tuple(manifest.class_names), tuple(paths), tuple(dataset.groups))
    metrics = metrics_with_patients(labels, proba, manifest.class_names, dataset.groups)
    metrics["evaluated_on"] = {"data": str(data_dir), "split": str(split_file) if split_file else None,
                               "subset": subset if split_file else "all", "num_images": len(dataset)}
    if bootstrap > 0:
        found = intervals(pred, bootstrap, bootstrap_seed)
        metrics["ci"] = found["image"]
        if found["patient"] is not None and "patient_level" in metrics:
            metrics["patient_level"]["ci"] = found["patient"]
        metrics["bootstrap"] = {k: v for k, v in found.items() if k not in ("image", "patient")}
    if predictions_file is not None:
        metrics["predictions_file"] = str(save_predictions(predictions_file, pred))
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

