"""The APL patient model trained by FedAvg: the algorithm's pieces as plain functions (no Flower).

Shared by the product (`leuk-server --task patients`, server/patient_federation.py and
client/patient_tasks.py) and the in-process benchmark (benchmarks/apl_federated.py):

* standardisation from the sites' summed cell counts, feature sums and sums of squares (`Moments`);
* the server's seeded initial head with that standardisation (`initial_head`);
* the local step size of round r (`round_lr`: cosine decay);
* what a site sends instead of its validation patients' scores (`logit_histogram`), and the server's
  threshold and temperature from the summed histograms (`histogram_calibration`);
* a site's own validation patients (`split_patients`: stratified by diagnosis, seeded).

Only the linear heads (meanprob, meanpool) of recipes without cell-type features are federated: the
attention head's PCA projection would need a federated PCA, one-hot cell types a shared vocabulary.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from leukfed.common.errors import LeukError
from leukfed.common.patient_heads import PatientHead, make_head
from leukfed.common.patient_protocol import fit_temperature

FEDERATED_HEADS = ("meanprob", "meanpool")
BINS, LOW, HIGH = 50, -10.0, 10.0     # the logit histogram a site sends: 50 bins on [-10, 10], outer bins open
HISTOGRAM_KEYS = ("histogram-negative", "histogram-positive")   # its two rows in the site's evaluate reply


# The head's federated optimisation as measured (benchmarks/apl_federated.py: 100 rounds x 2 local epochs of
# SGD at 0.1, cosine-decayed, on batches of 256 cells reach the pooled L-BFGS optimum's training loss).
MEASURED_SCHEDULE = {"rounds": 100, "local_epochs": 2, "lr": 0.1, "batch_size": 256}


def schedule_advice(rounds: int, local_epochs: int, lr: float, batch_size: int) -> str | None:
    """A line for the coordinator when the run's schedule differs from the measured one (the run settings'
    defaults are the cell classifiers'), or None."""
    given = {"rounds": rounds, "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size}
    if given == MEASURED_SCHEDULE:
        return None
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in MEASURED_SCHEDULE.items())
    return (f"note: the patient head was measured with {flags}; this run trains with "
            + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in given.items()))


def federable_recipe(name: str):
    """The named `leuk train-patients` recipe, when its head can be federated; LeukError otherwise."""
    from leukfed.common.patient_model import recipe_named

    recipe = recipe_named(name)
    if recipe.head not in FEDERATED_HEADS or recipe.cell_type_features:
        raise LeukError(f"patient recipe {name!r} cannot be federated: only linear heads ({', '.join(FEDERATED_HEADS)}) "
                        "without cell-type features")
    return recipe


def feature_dim(backbone: str, image_size: int) -> int:
    """Width of the frozen backbone's pooled features (built on the meta device: no memory, no weights)."""
    from leukfed.models import create_model

    with torch.device("meta"):
        model = create_model(backbone, 1, pretrained=False, image_size=image_size)
    return int(model.num_features)


def head_layout(kind: str, dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys, shapes and dtypes of the head's state dict (what travels each round)."""
    with torch.device("meta"):
        head = make_head(kind, dim)
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in head.state_dict().items()}


# ---- standardisation from moments ------------------------------------------------------------------

@dataclass(frozen=True)
class Moments:
    """What a site tells the server about its training patients: aggregates only."""

    cells: int
    total: np.ndarray      # (D,) float64 sum of the cells' features
    squares: np.ndarray    # (D,) float64 sum of their squares
    patients: tuple[int, int]   # training patients per diagnosis (negative, positive)

    def __add__(self, other: "Moments") -> "Moments":
        if self.total.shape != other.total.shape:
            raise LeukError(f"feature sums of width {self.total.shape} and {other.total.shape} cannot be added")
        return Moments(self.cells + other.cells, self.total + other.total, self.squares + other.squares,
                       (self.patients[0] + other.patients[0], self.patients[1] + other.patients[1]))


def moments(bags: Sequence[np.ndarray], y: Sequence[int]) -> Moments:
    """Count, sum and sum of squares of these patients' cells, and their patients per diagnosis."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=2)
    return Moments(int(sum(len(b) for b in bags)), sum(b.astype(np.float64).sum(0) for b in bags),
                   sum((b.astype(np.float64) ** 2).sum(0) for b in bags), (int(counts[0]), int(counts[1])))


# ---- the same aggregates as weighted means (for secure aggregation, which reveals only their sum) -----
# A secure round averages the sites' arrays weighted by their num-examples and reveals that average and the
# total weight: a site sends its sums divided by its weight, the server multiplies the average back.

PATIENT_STAGE = "patient-stage"     # train config key: "moments" or "calibrate" inside a secure round


def moments_layout(dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of a secure moments round: per-cell mean feature, mean square, patients per cell."""
    return {"mean": ((dim,), "float64"), "meansq": ((dim,), "float64"), "patients": ((2,), "float64")}


def histogram_layout() -> dict[str, tuple[tuple[int, ...], str]]:
    """The array of a secure calibration round: the histogram divided by the site's validation patients."""
    return {"histogram": ((2, BINS), "float64")}


def zeros(layout: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, np.ndarray]:
    """The round's starting arrays: secure aggregation averages the sites' differences from them."""
    return {k: np.zeros(shape, dtype=dtype) for k, (shape, dtype) in layout.items()}


def moments_as_means(m: Moments) -> tuple[dict[str, np.ndarray], int]:
    """A site's moments as (arrays, weight = cells) for a secure round."""
    return {"mean": m.total / m.cells, "meansq": m.squares / m.cells,
            "patients": np.asarray(m.patients, dtype=np.float64) / m.cells}, m.cells


def moments_from_means(arrays: dict[str, np.ndarray], cells: int) -> Moments:
    """The summed moments from a secure round's weighted mean and total weight (patients rounded)."""
    patients = np.rint(np.asarray(arrays["patients"], dtype=np.float64) * cells)
    return Moments(int(cells), np.asarray(arrays["mean"], dtype=np.float64) * cells,
                   np.asarray(arrays["meansq"], dtype=np.float64) * cells, (int(patients[0]), int(patients[1])))


def histogram_as_means(histogram: np.ndarray, patients: int) -> dict[str, np.ndarray]:
    """A site's (2, BINS) histogram divided by its validation patients (the round's weight)."""
    return {"histogram": np.asarray(histogram, dtype=np.float64) / max(patients, 1)}


def histogram_from_means(arrays: dict[str, np.ndarray], patients: int) -> np.ndarray:
    """The summed (2, BINS) histogram from a secure round's weighted mean and total weight."""
    return np.rint(np.asarray(arrays["histogram"], dtype=np.float64) * patients).astype(np.int64)


def standardisation(m: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (ddof 1, at least 1e-4) of all cells from summed moments."""
    mean = m.total / m.cells
    std = np.sqrt(np.maximum(m.squares - m.cells * mean ** 2, 0) / max(m.cells - 1, 1))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32).clamp_min(1e-4)


def initial_head(kind: str, m: Moments, seed: int) -> PatientHead:
    """The server's seeded initial head, with the federation's standardisation."""
    if kind not in FEDERATED_HEADS:
        raise LeukError(f"the {kind} head cannot be federated: only {', '.join(FEDERATED_HEADS)}")
    torch.manual_seed(seed)
    head = make_head(kind, m.total.shape[0])
    center, scale = standardisation(m)
    head.center.copy_(center)
    head.scale.copy_(scale)
    return head.eval()


def round_lr(lr: float, r: int, rounds: int) -> float:
    """The local step size of round r (0-based): cosine decay from `lr` (round 0) towards 0."""
    return lr * 0.5 * (1 + math.cos(math.pi * r / rounds))


# ---- threshold and temperature from histograms -----------------------------------------------------

def logit_histogram(logits: np.ndarray, y: np.ndarray, bins: int = BINS, low: float = LOW,
                    high: float = HIGH) -> np.ndarray:
    """(2, bins) counts of non-APL (row 0) and APL (row 1) patients per equal-width logit bin on
    [low, high]; logits outside fall in the outer bins. What a site sends instead of its scores."""
    which = np.clip(np.floor((np.asarray(logits) - low) / (high - low) * bins).astype(np.int64), 0, bins - 1)
    out = np.zeros((2, bins), dtype=np.int64)
    np.add.at(out, (np.asarray(y, dtype=np.int64), which), 1)
    return out


def histogram_calibration(histograms: Sequence[np.ndarray], low: float = LOW, high: float = HIGH,
                          target: float = 0.9) -> tuple[float, float]:
    """The server's (logit threshold, temperature) from summed site histograms: the threshold is the lower
    edge of the highest bin at or above which >= `target` of the APL patients lie (-inf for the bottom bin,
    which is open), so validation sensitivity >= target as with threshold_for_sensitivity, and at most one
    bin lower than the pooled scores' threshold; the temperature minimises the log loss of the bin centres."""
    total = np.sum(histograms, axis=0)
    bins = total.shape[1]
    edges = np.linspace(low, high, bins + 1)
    positives = total[1]
    if positives.sum() == 0:
        raise LeukError("no APL validation patients in the histograms: cannot choose a threshold")
    needed = max(math.ceil(target * positives.sum() - 1e-9), 1)
    above = np.cumsum(positives[::-1])[::-1]  # APL patients in bin b or higher
    b = int(np.flatnonzero(above >= needed).max())
    threshold = float(edges[b]) if b > 0 else -math.inf
    centres = (edges[:-1] + edges[1:]) / 2
    z = np.concatenate([np.repeat(centres, total[0]), np.repeat(centres, total[1])])
    t = np.concatenate([np.zeros(total[0].sum()), np.ones(total[1].sum())])
    return threshold, fit_temperature(z, t)


def histogram_auc(histogram: np.ndarray) -> float | None:
    """AUC of the binned logits (ties within a bin count one half): what the server can know of the
    validation patients' separation; None without both diagnoses."""
    neg, pos = np.asarray(histogram[0], dtype=np.float64), np.asarray(histogram[1], dtype=np.float64)
    if neg.sum() == 0 or pos.sum() == 0:
        return None
    below = np.cumsum(neg) - neg   # negatives in lower bins
    return float((pos * (below + neg / 2)).sum() / (pos.sum() * neg.sum()))


def histogram_rates(histogram: np.ndarray, threshold: float, low: float = LOW,
                    high: float = HIGH) -> tuple[float, float]:
    """Sensitivity and specificity of flagging logits >= `threshold` (a bin edge, or -inf) on binned logits."""
    bins = histogram.shape[1]
    first = 0 if threshold == -math.inf else int(round((threshold - low) / (high - low) * bins))
    neg, pos = histogram[0], histogram[1]
    sens = float(pos[first:].sum() / pos.sum()) if pos.sum() else float("nan")
    spec = float(neg[:first].sum() / neg.sum()) if neg.sum() else float("nan")
    return sens, spec


# ---- a site's own validation patients --------------------------------------------------------------

def split_patients(y: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation patients: per diagnosis, round(fraction x its patients) of them,
    seeded, keeping at least one training patient of each diagnosis the site has."""
    y = np.asarray(y, dtype=np.int64)
    if not 0 <= fraction < 1:
        raise LeukError(f"site validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(y == cls))
        take = min(int(math.floor(fraction * len(members) + 0.5)), max(len(members) - 1, 0))
        val[members[:take]] = True
    return val
