"""Scoring a saved run on a dataset, and predicting single images or patient folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from leukfed.common.calibration import Calibration, load_calibration, softmax
from leukfed.common.data import scan_dataset
from leukfed.common.dataset import build_dataset, make_loader
from leukfed.common.errors import LeukError
from leukfed.common.gallery import gallery_name, write_gallery
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
    from leukfed.common.patient_model import evaluate_patient_run, is_patient_run
    from leukfed.common.stats import Predictions, intervals, save_predictions

    if is_patient_run(run_dir):  # a patient model (`leuk train-patients`) scores whole patient folders
        if split_file is not None:
            raise LeukError("a patient model scores whole patient folders: --split does not apply")
        return evaluate_patient_run(run_dir, data_dir, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed,
                                    predictions_file=predictions_file)
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
def _logits(model, files: Sequence[Path], hardware, batch_size: int = 64) -> np.ndarray:
    config = data_config_of(model)
    normalize = Normalize(config)
    out = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([normalize(prepare_image(load_image(f), config)) for f in files[start:start + batch_size]])
        with hardware.autocast():
            out.append(model(batch.to(hardware.device)).float().cpu())
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class PatientScore:
    """One folder's (or image's) prediction: calibrated class probabilities and a weight per cell."""

    probabilities: np.ndarray   # (C,)
    cell_weights: np.ndarray    # (N,), one per file: attention, or a cell's probability of one class
    weight_name: str            # "attention" or "P(<class>)"


@torch.no_grad()
def score_patient(model, files: Sequence[Path], hardware, class_names: Sequence[str],
                  calibration: Calibration | None) -> PatientScore:
    """Patient probability (calibrated when the run has calibration.json) and per-cell weights.

    A model that pools a patient's cells itself (attention MIL) exposes
    `model.score_bag(cells) -> (patient logits (C,), attention (N,))` on the normalised cells; the
    rest are scored per cell and pooled by mean probability, weighted by each cell's probability of
    the positive class (or of the predicted class when the run names none)."""
    if hasattr(model, "score_bag"):
        config = data_config_of(model)
        cells = torch.stack([Normalize(config)(prepare_image(load_image(f), config)) for f in files])
        patient_logit, attention = model.score_bag(cells.to(hardware.device))
        logit = patient_logit.float().cpu().numpy()
        probabilities = calibration.probabilities(logit) if calibration else softmax(logit)
        return PatientScore(probabilities, attention.float().cpu().numpy().reshape(-1), "attention")
    cell_logits = _logits(model, files, hardware)
    cell_probabilities = softmax(cell_logits)
    if calibration is None:
        probabilities = cell_probabilities.mean(0)
    elif calibration.level == "patient":   # fitted on log mean cell probability, as `leuk calibrate` pools
        probabilities = calibration.probabilities(np.log(np.clip(cell_probabilities.mean(0), 1e-12, None)))
    else:
        probabilities = calibration.probabilities(cell_logits).mean(0)
    positive = calibration.positive if calibration else None
    shown = class_names.index(positive) if positive else int(np.argmax(probabilities))
    return PatientScore(probabilities, cell_probabilities[:, shown], f"P({class_names[shown]})")


def predict_paths(run_dir: str | Path, paths: Sequence[str | Path], *, device: str = "auto",
                  gallery: str | Path | None = None, heatmap: bool = False, top: int = 12) -> list[dict]:
    """One row per image file, and one per folder (a patient); with `gallery`, a PNG of its top cells
    per row (and their Grad-CAM overlays with `heatmap`)."""
    if heatmap and gallery is None:
        raise LeukError("--heatmap draws into the gallery: give --gallery DIR too")
    if top < 1:
        raise LeukError(f"--top must be >= 1, not {top}")
    from leukfed.common.patient_model import is_patient_run, predict_patient_folders

    if is_patient_run(run_dir):
        if heatmap:
            raise LeukError("--heatmap needs an image model: a patient model's gallery ranks the cells by its "
                            "own cell scores (attention or cell probability)")
        return predict_patient_folders(run_dir, [Path(p) for p in paths], gallery=Path(gallery) if gallery else None,
                                       top=top)
    hardware = select_hardware(device)
    model, description = load_run(run_dir, hardware.device)
    class_names = list(description["class_names"])
    calibration = load_calibration(run_dir, class_names)
    rows, taken = [], set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files, kind = _images_under(path), "patient"
            if not files:
                raise LeukError(f"no images in folder {path}")
        elif path.is_file():
            files, kind = [path], "image"
        else:
            raise LeukError(f"no such file or folder: {path}")
        score = score_patient(model, files, hardware, class_names, calibration)
        decided = calibration.decide(score.probabilities) if calibration else int(np.argmax(score.probabilities))
        row = {"path": str(path), "kind": kind, "num_images": len(files), "predicted": class_names[decided],
               "probabilities": {c: float(p) for c, p in zip(class_names, score.probabilities)},
               "calibrated": calibration is not None,
               "temperature": calibration.temperature if calibration else None}
        if calibration is not None and calibration.threshold is not None:
            k = class_names.index(calibration.positive)
            row["decision"] = {"positive": calibration.positive, "threshold": calibration.threshold,
                               "probability": float(score.probabilities[k]), "flagged": decided == k,
                               "target_sensitivity": calibration.target_sensitivity, "chosen_on": calibration.subset}
        if gallery is not None:
            row.update(_draw(Path(gallery), gallery_name(path, taken), files, score, model, class_names,
                             decided, calibration, heatmap, top))
        rows.append(row)
    return rows


def _draw(out: Path, name: str, files: list[Path], score: PatientScore, model, class_names: list[str],
          decided: int, calibration: Calibration | None, heatmap: bool, top: int) -> dict[str, str]:
    """The row's gallery (and Grad-CAM) PNGs; the heat map explains the positive class when there is one."""
    target = class_names.index(calibration.positive) if calibration and calibration.positive else decided
    overlays = None
    if heatmap:
        from leukfed.common.explain import gradcam_overlays
        overlays = lambda picked: gradcam_overlays(model, picked, target)  # noqa: E731
    title = (f"{name}: {class_names[decided]}  P({class_names[target]}) = "
             f"{score.probabilities[target]:.3f}{' calibrated' if calibration else ''}; "
             f"top {min(top, len(files))} of {len(files)} cells by {score.weight_name}")
    return write_gallery(out, name, files, score.cell_weights, weight_name=score.weight_name, title=title,
                         count=top, overlays=overlays)
