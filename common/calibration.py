"""Temperature scaling, expected calibration error and a validation-chosen operating threshold."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from leukfed.common.atomic import atomic_write_json
from leukfed.common.errors import LeukError

CALIBRATION_JSON = "calibration.json"
RELIABILITY_PNG = "reliability.png"
CALIBRATION_FORMAT = "leukfed-calibration/1"
ECE_BINS = 15                       # equal-width confidence bins, as Guo et al. 2017
TEMPERATURE_RANGE = (0.05, 20.0)    # a handful of validation patients must not push T to 0 or infinity
LEVELS = ("image", "patient")


@dataclass(frozen=True)
class Calibration:
    """What calibration.json holds: the temperature, and the decision rule chosen on validation."""

    temperature: float
    level: str                          # "image": logits of one image; "patient": log mean cell probability
    class_names: tuple[str, ...]
    subset: str                         # the split subset it was chosen on (never "test" by default)
    num_samples: int                    # images or patients it was fitted on
    ece_bins: int
    ece_before: float
    ece_after: float
    positive: str | None = None
    target_sensitivity: float | None = None
    threshold: float | None = None      # on the calibrated probability of `positive`
    at_threshold: dict[str, Any] | None = None   # sensitivity/specificity on the fitting subset
    reliability: dict[str, Any] = field(default_factory=dict)
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of logits at this calibration's level (N, C) or (C,)."""
        return softmax(logits, self.temperature)

    def decide(self, probabilities: np.ndarray) -> int:
        """Class index: `positive` when its probability reaches the threshold, else the likeliest other."""
        p = np.asarray(probabilities, dtype=np.float64)
        if self.positive is None or self.threshold is None:
            return int(np.argmax(p))
        k = self.class_names.index(self.positive)
        if p[k] >= self.threshold:
            return k
        others = p.copy()
        others[k] = -np.inf
        return int(np.argmax(others))

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, **dataclasses.asdict(self), "class_names": list(self.class_names)}


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    return torch.softmax(x / temperature, dim=-1).numpy()


def patient_logits(cell_logits: np.ndarray, patients: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Per patient, log of the mean cell probability (the score `leuk evaluate` pools by); sorted ids."""
    ids = sorted(set(patients))
    index = {pid: i for i, pid in enumerate(ids)}
    rows = np.array([index[p] for p in patients])
    probabilities = softmax(cell_logits)
    means = np.stack([probabilities[rows == i].mean(0) for i in range(len(ids))])
    return ids, np.log(np.clip(means, 1e-12, None))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising validation NLL (torch LBFGS over log T), clipped to TEMPERATURE_RANGE."""
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise LeukError("temperature scaling needs at least one sample with logits and a label")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        temperature = TEMPERATURE_RANGE[1]
    return float(np.clip(temperature, *TEMPERATURE_RANGE))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Top-label confidence in `bins` equal-width bins of [0, 1]: count, mean confidence, accuracy."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence = p.max(1)
    correct = (p.argmax(1) == np.asarray(labels)).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, bins) / counts
        accuracy = np.bincount(which, correct, bins) / counts
    as_list = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": counts.tolist(),
            "confidence": as_list(mean_confidence), "accuracy": as_list(accuracy)}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins of |accuracy - mean confidence| weighted by the bin's share."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(table["count"])
    if total == 0:
        raise LeukError("expected calibration error of no samples")
    return float(sum(n / total * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
                     if n))


# Scoring the same images again (another batch size or summation order) moves a score by float noise
# (1.4e-10 between `leuk calibrate` and `leuk predict` on one patient); a threshold exactly at the
# boundary case's score then missed that case. The threshold sits this far (relative) below that score.
THRESHOLD_MARGIN = 1e-6


def choose_threshold(scores: np.ndarray, is_positive: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold t for which `score >= t` flags at least `target_sensitivity` of the positives,
    less THRESHOLD_MARGIN, so that the same cases scored again are flagged again."""
    if not 0 < target_sensitivity <= 1:
        raise LeukError(f"target sensitivity must be in (0, 1], not {target_sensitivity}")
    positives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(is_positive, dtype=bool)])[::-1]
    if len(positives) == 0:
        raise LeukError("no positive samples in the calibration subset: cannot choose a threshold")
    needed = max(1, math.ceil(target_sensitivity * len(positives) - 1e-9))
    boundary = float(positives[needed - 1])
    return boundary - THRESHOLD_MARGIN * max(1.0, abs(boundary))


def rates_at_threshold(scores: np.ndarray, is_positive: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion counts, sensitivity and specificity of `score >= threshold` (positive vs the rest)."""
    flagged = np.asarray(scores) >= threshold
    truth = np.asarray(is_positive, dtype=bool)
    tp, fn = int((flagged & truth).sum()), int((~flagged & truth).sum())
    fp, tn = int((flagged & ~truth).sum()), int((~flagged & ~truth).sum())
    ratio = lambda a, b: float(a / b) if b else None  # noqa: E731
    return {"threshold": float(threshold), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
            "balanced_accuracy": None if not (tp + fn and tn + fp) else (tp / (tp + fn) + tn / (tn + fp)) / 2}


def calibrate_logits(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, level: str,
                     subset: str = "val", positive: str | None = None, target_sensitivity: float = 0.9,
                     bins: int = ECE_BINS, fitted_on: dict[str, Any] | None = None) -> Calibration:
    """Fit the temperature on (logits, labels), then the positive class's threshold when one is named.

    Generic over where the logits come from: per image, per patient from pooled cells, or a
    patient model's own logits (an attention-MIL head)."""
    names = tuple(str(c) for c in class_names)
    if level not in LEVELS:
        raise LeukError(f"calibration level must be one of {', '.join(LEVELS)}, not {level!r}")
    if positive is not None and positive not in names:
        raise LeukError(f"positive class {positive!r} is not one of the run's classes ({', '.join(names)})")
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    threshold = at_threshold = None
    if positive is not None:
        k = names.index(positive)
        threshold = choose_threshold(after[:, k], labels == k, target_sensitivity)
        at_threshold = rates_at_threshold(after[:, k], labels == k, threshold)
    return Calibration(
        temperature=temperature, level=level, class_names=names, subset=subset, num_samples=len(labels),
        ece_bins=bins, ece_before=expected_calibration_error(before, labels, bins),
        ece_after=expected_calibration_error(after, labels, bins), positive=positive,
        target_sensitivity=target_sensitivity if positive is not None else None, threshold=threshold,
        at_threshold=at_threshold, fitted_on=dict(fitted_on or {}),
        reliability={"before": reliability_bins(before, labels, bins), "after": reliability_bins(after, labels, bins)})


def save_calibration(run_dir: str | Path, calibration: Calibration) -> Path:
    """calibration.json (atomic) and its reliability diagram next to the run's model."""
    from leukfed.common.plots import plot_reliability

    run_dir = Path(run_dir)
    path = atomic_write_json(run_dir / CALIBRATION_JSON, calibration.to_dict())
    plot_reliability({f"before (T=1, ECE {calibration.ece_before:.3f})": calibration.reliability["before"],
                      f"after (T={calibration.temperature:.2f}, ECE {calibration.ece_after:.3f})":
                      calibration.reliability["after"]}, run_dir / RELIABILITY_PNG,
                     title=f"reliability on {calibration.subset} ({calibration.num_samples} {calibration.level}s)")
    return path


def load_calibration(run_dir: str | Path, class_names: Sequence[str] | None = None) -> Calibration | None:
    """The run's calibration, None when it has none; one LeukError line when the file is unusable."""
    path = Path(run_dir) / CALIBRATION_JSON
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.pop("format", None) != CALIBRATION_FORMAT:
            raise ValueError(f"not a {CALIBRATION_FORMAT} file")
        calibration = Calibration(**{**raw, "class_names": tuple(raw["class_names"])})
        _check(calibration, class_names)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise LeukError(f"calibration {path} is unusable ({str(exc).splitlines()[0][:200]}); "
                        f"run `leuk calibrate` again or remove it") from None
    return calibration


def _check(c: Calibration, class_names: Sequence[str] | None) -> None:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not number(c.temperature) or not TEMPERATURE_RANGE[0] <= c.temperature <= TEMPERATURE_RANGE[1]:
        raise ValueError(f"temperature {c.temperature!r} is outside {TEMPERATURE_RANGE}")
    if c.level not in LEVELS:
        raise ValueError(f"level {c.level!r}")
    if class_names is not None and list(c.class_names) != list(class_names):
        raise ValueError(f"its classes {list(c.class_names)} are not the run's {list(class_names)}")
    if (c.positive is None) != (c.threshold is None):
        raise ValueError("positive class and threshold come together")
    if c.positive is not None and (c.positive not in c.class_names or not number(c.threshold)
                                   or not 0 <= c.threshold <= 1):
        raise ValueError(f"positive {c.positive!r} / threshold {c.threshold!r}")


@torch.no_grad()
def dataset_logits(model, dataset, hardware, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) in float32 and labels (N,) of an in-memory SmearDataset, in its order."""
    from leukfed.common.dataset import make_loader

    model.eval()
    logits, labels = [], []
    for images, target in make_loader(dataset, batch_size, shuffle=False):
        images = images.to(hardware.device)
        if hardware.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with hardware.autocast():
            logits.append(model(images).float().cpu())
        labels.append(target)
    if not logits:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def patient_level_logits(model, dataset, hardware) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(patient ids, logits (P, C), labels (P,)): the model's own patient logits when it pools cells
    itself (`model.score_bag(cells) -> (logits (C,), attention (N,))`), else log mean cell probability."""
    groups = list(dataset.groups)
    ids = sorted(set(groups))
    labels_of = {g: int(y) for g, y in zip(groups, dataset.labels.tolist())}
    if hasattr(model, "score_bag"):
        rows = []
        with torch.no_grad():
            for pid in ids:
                index = torch.tensor([i for i, g in enumerate(groups) if g == pid])
                cells = dataset.normalize(dataset.images[index]).to(hardware.device)
                rows.append(model.score_bag(cells)[0].float().cpu().numpy())
        logits = np.stack(rows)
    else:
        cell_logits, _ = dataset_logits(model, dataset, hardware)
        ids, logits = patient_logits(cell_logits, groups)
    return ids, logits, np.array([labels_of[pid] for pid in ids])


def calibrate_dataset(model, dataset, hardware, class_names: Sequence[str], **options) -> Calibration:
    """Calibrate on a dataset: per patient when every image has a patient, else per image."""
    if len(dataset) == 0:
        raise LeukError("the calibration subset is empty")
    if all(g is not None for g in dataset.groups):
        _, logits, labels = patient_level_logits(model, dataset, hardware)
        return calibrate_logits(logits, labels, class_names, level="patient", **options)
    logits, labels = dataset_logits(model, dataset, hardware)
    return calibrate_logits(logits, labels, class_names, level="image", **options)


def calibrate_after_training(run_dir: Path, model, val_set, hardware, class_names: Sequence[str]) -> Calibration | None:
    """`leuk train`'s last step: the temperature on its own validation split (a threshold needs
    `leuk calibrate --positive`); nothing when the split has no validation images."""
    if len(val_set) == 0:
        return None
    calibration = calibrate_dataset(model, val_set, hardware, class_names, subset="val",
                                    fitted_on={"split": str(Path(run_dir) / "split.json")})
    save_calibration(run_dir, calibration)
    return calibration


def _run_subset(run_dir, data_dir, split_file, subset: str, device: str):
    from leukfed.common.data import scan_dataset
    from leukfed.common.dataset import build_dataset
    from leukfed.common.runs import check_classes, load_run
    from leukfed.common.splits import load_split
    from leukfed.common.train import select_hardware

    if subset not in ("train", "val", "test"):
        raise LeukError(f"subset must be train, val or test, not {subset!r}")
    hardware = select_hardware(device)
    model, description = load_run(run_dir, hardware.device)
    manifest = scan_dataset(data_dir)
    check_classes(description["class_names"], manifest.class_names, what=f"the data in {data_dir}")
    paths = [s.path for s in manifest.samples] if split_file is None else getattr(load_split(split_file, manifest), subset)
    dataset = build_dataset(manifest, paths, model.leuk_info.data_config, train=False)
    return model, description, dataset, hardware


def calibrate_run(run_dir: str | Path, data_dir: str | Path, *, split_file: str | Path, subset: str = "val",
                  positive: str | None = None, target_sensitivity: float = 0.9,
                  device: str = "auto") -> Calibration:
    """`leuk calibrate`: fit on the split's `subset`, write calibration.json and reliability.png."""
    model, description, dataset, hardware = _run_subset(run_dir, data_dir, split_file, subset, device)
    calibration = calibrate_dataset(
        model, dataset, hardware, description["class_names"], subset=subset, positive=positive,
        target_sensitivity=target_sensitivity, fitted_on={"data": str(data_dir), "split": str(split_file)})
    save_calibration(run_dir, calibration)
    return calibration


def evaluate_at_threshold(run_dir: str | Path, data_dir: str | Path, *, split_file: str | Path | None,
                          subset: str = "test", device: str = "auto") -> dict[str, Any] | None:
    """The stored decision rule scored on other data (`leuk evaluate`); None without a stored threshold,
    and for a patient model, whose own metrics are already taken at its stored threshold."""
    from leukfed.common.patient_model import is_patient_run
    from leukfed.common.runs import read_json

    if is_patient_run(run_dir):
        return None

    names = read_json(Path(run_dir) / "model.json", "model description").get("class_names")
    calibration = load_calibration(run_dir, names)
    if calibration is None or calibration.threshold is None:
        return None
    model, _, dataset, hardware = _run_subset(run_dir, data_dir, split_file, subset, device)
    if calibration.level == "patient":
        if not all(g is not None for g in dataset.groups):
            raise LeukError("this run's threshold is per patient, and these images have no patients")
        _, logits, labels = patient_level_logits(model, dataset, hardware)
    else:
        logits, labels = dataset_logits(model, dataset, hardware)
    k = calibration.class_names.index(calibration.positive)
    scores = calibration.probabilities(logits)[:, k]
    return {"positive": calibration.positive, "level": calibration.level, "chosen_on": calibration.subset,
            "target_sensitivity": calibration.target_sensitivity, "temperature": calibration.temperature,
            "scored_on": subset if split_file is not None else "all",
            **rates_at_threshold(scores, labels == k, calibration.threshold)}


def format_threshold_metrics(r: dict[str, Any]) -> str:
    """Two lines for `leuk evaluate`: the stored decision rule and what it scores here."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return (f"at the stored threshold: {r['positive']} when calibrated P({r['positive']}) >= {r['threshold']:.4f} "
            f"(per {r['level']}, chosen on {r['chosen_on']} for >= {pct(r['target_sensitivity'])} sensitivity)\n"
            f"  sensitivity {pct(r['sensitivity'])} ({r['tp']}/{r['tp'] + r['fn']})  specificity "
            f"{pct(r['specificity'])} ({r['tn']}/{r['tn'] + r['fp']})  PPV {pct(r['ppv'])}  NPV {pct(r['npv'])}"
            f"  balanced accuracy {pct(r['balanced_accuracy'])}")
