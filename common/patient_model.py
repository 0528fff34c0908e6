"""Patient-level diagnosis (APL vs other AML): train a recipe into a run directory, score patient folders."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from leukfed import __version__
from leukfed.common.atomic import atomic_write_bytes, atomic_write_json
from leukfed.common.errors import LeukError
from leukfed.common.images import IMAGE_EXTENSIONS
from leukfed.common.metrics import binary_auc
from leukfed.common.patient_features import extract_features, feature_backbone
from leukfed.common.patient_heads import PatientHead, head_scores, make_head, train_head
from leukfed.common.patient_protocol import (fit_temperature, sensitivity_specificity, sigmoid,
                                             stratified_folds, threshold_for_sensitivity)

PATIENT_RUN_FORMAT = "leukfed-patient-run/1"
PATIENT_MODEL_JSON, HEADS_FILE = "patient_model.json", "heads.safetensors"
BLAST_TYPES = ("blast", "promyelocyte")  # folder names containing these count as blasts/promyelocytes


@dataclass(frozen=True)
class PatientRecipe:
    """Everything that defines a patient model: backbone features, cells used, head, ensemble, threshold."""

    backbone: str = "efficientnet_lite0"
    image_size: int = 160
    cells: str = "all"                 # all | blasts (blast and promyelocyte folders only)
    cell_type_features: bool = False  # append the one-hot cell type (folder name) to each cell's features
    head: str = "meanpool"             # meanprob | meanpool | attention
    weight_decay: float = 1e-2
    epochs: int = 60                   # attention head only
    ensemble: str = "folds"            # folds (the inner-CV models, averaged) | refit (one model on all)
    inner_folds: int = 5
    target_sensitivity: float = 0.9
    seed: int = 0


RECIPES: dict[str, PatientRecipe] = {
    # Chosen by repeated CV on the earlier patients (benchmarks/RESULTS.md, APL): a cell classifier on
    # frozen Lite0 features whose calibrated probabilities are averaged over the patient's cells.
    "lite0-meanprob": PatientRecipe(head="meanprob"),
    "lite0-meanpool": PatientRecipe(),
    "lite0-96-meanprob": PatientRecipe(image_size=96, head="meanprob"),  # cheaper features (about 2x faster)
    "lite0-96-meanpool": PatientRecipe(image_size=96),
}


def recipe_named(name: str) -> PatientRecipe:
    if name not in RECIPES:
        raise LeukError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass
class PatientModel:
    """A trained patient model: heads (one per ensemble member), temperature, threshold and metadata."""

    recipe: PatientRecipe
    heads: list[PatientHead]
    cell_types: tuple[str, ...]   # vocabulary of the one-hot cell type (empty when not used)
    temperature: float
    threshold: float
    description: dict


# ---- cells of a patient ---------------------------------------------------------------------------

def cell_type_of(relative: str) -> str:
    """The cell type of an image from its path inside the patient folder: its first folder, or ''."""
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else ""


def is_blast(cell_type: str) -> bool:
    return any(word in cell_type.casefold() for word in BLAST_TYPES)


def select_cells(cell_types: Sequence[str], cells: str) -> np.ndarray:
    """Indices of the cells a recipe uses; a patient without blasts keeps all cells (flagged by caller)."""
    if cells == "all":
        return np.arange(len(cell_types))
    if cells != "blasts":
        raise LeukError(f"unknown cell selection {cells!r}; choose all or blasts")
    chosen = np.flatnonzero([is_blast(t) for t in cell_types])
    return chosen if len(chosen) else np.arange(len(cell_types))


def bag_features(features: np.ndarray, cell_types: Sequence[str], recipe: PatientRecipe,
                 vocabulary: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(bag, indices of the cells in it): the recipe's cells, with one-hot cell types when asked."""
    idx = select_cells(cell_types, recipe.cells)
    bag = features[idx]
    if recipe.cell_type_features:
        onehot = np.zeros((len(idx), len(vocabulary)), dtype=np.float32)
        column = {t: i for i, t in enumerate(vocabulary)}
        for row, i in enumerate(idx):
            if cell_types[i] in column:
                onehot[row, column[cell_types[i]]] = 1.0
        bag = np.concatenate([bag, onehot], axis=1)
    return bag.astype(np.float32), idx


# ---- training -------------------------------------------------------------------------------------

def fit_ensemble(recipe: PatientRecipe, bags: Sequence[np.ndarray], y: np.ndarray, *,
                 views: Sequence[Sequence[np.ndarray]] = ()) -> tuple[list[PatientHead], float, float, dict]:
    """Inner stratified CV on these (training) patients: out-of-fold logits give the temperature and
    the threshold reaching the target sensitivity; the fold models are the ensemble (or one refit).
    `views`: augmented copies of the bags (views[k][i] of patient i), used for training only."""
    rng = np.random.default_rng(recipe.seed)
    folds = stratified_folds(y, recipe.inner_folds, rng)
    oof = np.zeros(len(y))
    members = []
    for f in range(recipe.inner_folds):
        train, val = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        head = _train(recipe, *_with_views(bags, views, y, train), seed=recipe.seed + f)
        oof[val] = head_scores(head, [bags[i] for i in val])[0]
        members.append(head)
    temperature = fit_temperature(oof, y)
    prob = sigmoid(oof / temperature)
    threshold = threshold_for_sensitivity(y, prob, recipe.target_sensitivity)
    sens, spec = sensitivity_specificity(y, prob, threshold)
    validation = {"auc": binary_auc(y, oof), "sensitivity": sens, "specificity": spec,
                  "num_patients": int(len(y)), "num_positive": int(y.sum())}
    if recipe.ensemble == "refit":
        members = [_train(recipe, *_with_views(bags, views, y, np.arange(len(y))), seed=recipe.seed)]
    elif recipe.ensemble != "folds":
        raise LeukError(f"unknown ensemble {recipe.ensemble!r}; choose folds or refit")
    return members, temperature, threshold, validation


def _with_views(bags: Sequence[np.ndarray], views: Sequence[Sequence[np.ndarray]], y: np.ndarray,
                idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    chosen = [bags[i] for i in idx] + [view[i] for view in views for i in idx]
    return chosen, np.tile(y[idx], 1 + len(views))


def _train(recipe: PatientRecipe, bags: Sequence[np.ndarray], y: np.ndarray, seed: int) -> PatientHead:
    return train_head(recipe.head, bags, y, weight_decay=recipe.weight_decay, epochs=recipe.epochs, seed=seed)


def ensemble_logits(heads: Sequence[PatientHead], bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean patient logit over the ensemble, and the mean per-cell score."""
    outputs = [head_scores(h, bags) for h in heads]
    logits = np.mean([o[0] for o in outputs], axis=0)
    cells = [np.mean([o[1][i] for o in outputs], axis=0) for i in range(len(bags))]
    return logits, cells


def train_patient_model(data: str | Path, out: str | Path, recipe: PatientRecipe, *, positive: str = "APL",
                        progress: Callable[[str], None] | None = None) -> PatientModel:
    """Extract features of every patient's cells, fit the recipe, write the run directory atomically."""
    from leukfed.common.data import scan_dataset

    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    manifest = scan_dataset(data)
    if not manifest.has_patients() or positive not in manifest.class_names or len(manifest.class_names) != 2:
        raise LeukError(f"{data} must be a patient-folders dataset with two diagnoses, one of them {positive!r} "
                        f"(found {list(manifest.class_names)})")
    patients = patient_cells(manifest)
    say(f"{len(patients)} patients, {len(manifest)} cells: extracting {recipe.backbone} features at "
        f"{recipe.image_size} px")
    backbone = feature_backbone(recipe.backbone, recipe.image_size)
    files = [manifest.root / s.path for s in manifest.samples]
    features = extract_features(backbone, files, progress=_every_tenth(say))
    vocabulary = tuple(sorted({cell_type_of(r) for rows in patients.values() for r, _, _ in rows}))
    bags, y = patient_bags(patients, features, recipe, vocabulary, positive)
    say(f"fitting {recipe.head} heads ({recipe.inner_folds}-fold inner validation)")
    heads, temperature, threshold, validation = fit_ensemble(recipe, bags, y)
    description = {
        "format": PATIENT_RUN_FORMAT, "kind": "patient", "recipe": asdict(recipe),
        "class_names": list(manifest.class_names), "positive": positive,
        "cell_types": list(vocabulary) if recipe.cell_type_features else [],
        "feature_dim": int(bags[0].shape[1]), "num_heads": len(heads),
        "temperature": temperature, "threshold": threshold,
        "threshold_rule": f"highest threshold with >= {recipe.target_sensitivity:.0%} sensitivity on the "
                          f"out-of-fold validation patients",
        "validation": validation, "manifest_digest": manifest.digest(),
        "backbone_source": backbone.leuk_info.pretrained_source,
        "train_seconds": round(time.perf_counter() - start, 1),
        "leukfed_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    model = PatientModel(recipe, heads, tuple(description["cell_types"]), temperature, threshold, description)
    save_patient_model(out, model)
    _write_card(description, data, out, recipe, num_cells=len(manifest), num_positive=int(sum(y)))
    return model


def _write_card(description: dict, data: str | Path, out: str | Path, recipe: PatientRecipe, *, num_cells: int,
                num_positive: int) -> None:
    import shlex

    from leukfed.common.model_card import patient_card, write_model_card

    name = next((n for n, r in RECIPES.items() if r == recipe), None)
    command = ["leuk", "train-patients", "--data", str(data), "--out", str(out)] + (["--recipe", name] if name else [])
    write_model_card(Path(out), patient_card(description, data_dir=str(data), command=shlex.join(command),
                                             num_patients=description["validation"]["num_patients"],
                                             num_positive=num_positive, num_cells=num_cells))


def patient_bags(patients: dict[str, list[tuple[str, int, str]]], features: np.ndarray, recipe,
                 vocabulary: tuple[str, ...], positive: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Each patient's bag of cell features (`patient_cells` order, the recipe's cells and cell-type columns)
    and label (1 = `positive`)."""
    bags, y = [], []
    for rows in patients.values():
        idx = [i for _, i, _ in rows]
        bags.append(bag_features(features[idx], [cell_type_of(r) for r, _, _ in rows], recipe, vocabulary)[0])
        y.append(int(rows[0][2] == positive))
    return bags, np.asarray(y, dtype=np.int64)


def patient_cells(manifest) -> dict[str, list[tuple[str, int, str]]]:
    """patient -> [(path inside the patient folder, sample index, diagnosis)], patients in id order."""
    from leukfed.common.patient_protocol import natural_key

    out: dict[str, list[tuple[str, int, str]]] = {}
    for i, s in enumerate(manifest.samples):
        out.setdefault(s.patient, []).append((s.path.split("/", 1)[1] if "/" in s.path else s.path, i, s.label))
    return {p: out[p] for p in sorted(out, key=natural_key)}


def _every_tenth(say: Callable[[str], None]) -> Callable[[int, int], None]:
    marks: set[int] = set()

    def report(done: int, total: int) -> None:
        tenth = done * 10 // total
        if tenth not in marks:
            marks.add(tenth)
            say(f"features {done}/{total}")

    return report


# ---- the run directory ----------------------------------------------------------------------------

def save_patient_model(out: str | Path, model: PatientModel) -> None:
    """heads.safetensors (member i's tensors under `i.`) and patient_model.json, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, h in enumerate(model.heads)
               for k, v in h.state_dict().items()}
    atomic_write_bytes(out / HEADS_FILE, save_safetensors(tensors))
    atomic_write_json(out / PATIENT_MODEL_JSON, model.description)


def is_patient_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PATIENT_MODEL_JSON).is_file()


def load_patient_model(run_dir: str | Path) -> PatientModel:
    """Rebuild a patient model from its run directory; LeukError when anything is missing or inconsistent."""
    from leukfed.common.runs import read_json

    run_dir = Path(run_dir)
    d = read_json(run_dir / PATIENT_MODEL_JSON, "patient model description")
    if not isinstance(d, Mapping) or d.get("format") != PATIENT_RUN_FORMAT:
        raise LeukError(f"{run_dir / PATIENT_MODEL_JSON} is not a leukfed patient model description")
    try:
        recipe = replace(PatientRecipe(), **d["recipe"])
        n, dim = int(d["num_heads"]), int(d["feature_dim"])
        tensors = load_safetensors((run_dir / HEADS_FILE).read_bytes())
    except FileNotFoundError:
        raise LeukError(f"model weights not found: {run_dir / HEADS_FILE}") from None
    except Exception as exc:  # bad JSON fields or a corrupt safetensors file
        raise LeukError(f"patient model in {run_dir} is unreadable: {exc}") from None
    heads = []
    for i in range(n):
        head = make_head(recipe.head, dim)
        own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        try:
            head.load_state_dict(own)
        except RuntimeError as exc:
            raise LeukError(f"heads in {run_dir} do not fit recipe {recipe.head}: {str(exc).splitlines()[0]}") from None
        heads.append(head.eval())
    return PatientModel(recipe, heads, tuple(d["cell_types"]), float(d["temperature"]), float(d["threshold"]), d)


# ---- scoring --------------------------------------------------------------------------------------

def patient_images(folder: Path) -> list[str]:
    """Image files inside one patient folder (relative POSIX paths), hidden entries skipped."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@torch.no_grad()
def score_patients(model: PatientModel, folders: Mapping[str, Path], *,
                   backbone: torch.nn.Module | None = None) -> list[dict]:
    """Per patient: calibrated probability of the positive diagnosis, the decision at the stored
    threshold, and per cell its path, cell type and score (attention weight or cell probability)."""
    recipe = model.recipe
    backbone = backbone or feature_backbone(recipe.backbone, recipe.image_size)
    rows = []
    for patient, folder in folders.items():
        images = patient_images(folder)
        if not images:
            raise LeukError(f"no images in patient folder {folder}")
        types = [cell_type_of(r) for r in images]
        features = extract_features(backbone, [folder / r for r in images])
        bag, idx = bag_features(features, types, recipe, model.cell_types)
        logits, cells = ensemble_logits(model.heads, [bag])
        probability = float(sigmoid(logits[0] / model.temperature))
        rows.append({
            "patient": patient, "num_images": len(images), "num_cells_used": len(idx),
            "probability": probability, "positive": model.description["positive"],
            "flagged": probability >= model.threshold, "threshold": model.threshold,
            "cell_score_kind": "attention" if recipe.head == "attention" else "cell probability",
            "cells": [{"path": (folder / images[i]).as_posix(), "cell_type": types[i], "score": float(s)}
                      for i, s in zip(idx.tolist(), cells[0].tolist())],
        })
    return rows


def predict_patient_folders(run_dir: str | Path, folders: Sequence[Path], *, gallery: Path | None = None,
                            top: int = 12) -> list[dict]:
    """`leuk predict` with a patient model: per folder the calibrated probability, the decision at the
    stored threshold and, with `gallery`, a PNG of the cells that drove it (by attention or probability)."""
    from leukfed.common.gallery import gallery_name, write_gallery

    not_folders = [str(f) for f in folders if not Path(f).is_dir()]
    if not_folders:
        raise LeukError(f"a patient model scores patient folders, and {not_folders[0]} is not a folder")
    model = load_patient_model(run_dir)
    names = list(model.description["class_names"])
    positive = model.description["positive"]
    negative = next(c for c in names if c != positive)
    backbone = feature_backbone(model.recipe.backbone, model.recipe.image_size)
    rows, taken = [], set()
    for folder in map(Path, folders):
        [scored] = score_patients(model, {folder.name: folder}, backbone=backbone)
        p = scored["probability"]
        row = {"path": str(folder), "kind": "patient", "num_images": scored["num_images"],
               "predicted": positive if scored["flagged"] else negative,
               "probabilities": {c: (p if c == positive else 1 - p) for c in names},
               "calibrated": True, "temperature": model.temperature,
               "decision": {"positive": positive, "threshold": model.threshold, "probability": p,
                            "flagged": scored["flagged"], "target_sensitivity": model.recipe.target_sensitivity,
                            "chosen_on": "validation patients (inner cross-validation)"}}
        if gallery is not None:
            name = gallery_name(folder, taken)
            cells = scored["cells"]
            title = (f"{name}: {row['predicted']}  P({positive}) = {p:.3f} calibrated; top "
                     f"{min(top, len(cells))} of {len(cells)} cells by {scored['cell_score_kind']}")
            row.update(write_gallery(Path(gallery), name, [Path(c["path"]) for c in cells],
                                     [c["score"] for c in cells], weight_name=scored["cell_score_kind"],
                                     title=title, count=top))
        rows.append(row)
    return rows


def evaluate_patient_run(run_dir: str | Path, data_dir: str | Path, *, bootstrap: int = 0,
                         bootstrap_seed: int = 0, predictions_file: str | Path | None = None) -> dict:
    """Patient-level metrics of a patient run on a patient-folders dataset (with patients.csv); with
    `bootstrap` N > 0, 95 % intervals over resampled patients (`ci`); with `predictions_file`, one row
    per patient (its folder as the path)."""
    from leukfed.common.data import scan_dataset
    from leukfed.common.metrics import classification_metrics
    from leukfed.common.runs import check_classes

    model = load_patient_model(run_dir)
    manifest = scan_dataset(data_dir)
    if not manifest.has_patients():
        raise LeukError(f"{data_dir} is not a patient-folders dataset (Patient_XX/<cell type>/<image> + patients.csv)")
    check_classes(model.description["class_names"], manifest.class_names, what=f"the data in {data_dir}")
    cells = patient_cells(manifest)
    folders = {p: manifest.root / manifest.samples[c[0][1]].path.split("/")[0] for p, c in cells.items()}
    rows = score_patients(model, folders)
    names = list(manifest.class_names)
    y = np.array([names.index(c[0][2]) for c in cells.values()])
    prob = np.array([r["probability"] for r in rows])
    positive = names.index(model.description["positive"])
    p_pos = prob if positive == 1 else 1 - prob
    metrics = classification_metrics(y, np.stack([1 - p_pos, p_pos], 1), names)
    flagged = prob >= model.threshold
    pred = np.where(flagged, positive, 1 - positive)
    cm = np.zeros((2, 2), dtype=int)
    np.add.at(cm, (y, pred), 1)
    sens, spec = sensitivity_specificity((y == positive).astype(int), prob, model.threshold)
    metrics.pop("per_class", None)
    metrics.update(num_patients=len(rows), num_cells=len(manifest), confusion_matrix=cm.tolist(),
                   accuracy=float((pred == y).mean()), balanced_accuracy=float((sens + spec) / 2),
                   sensitivity=sens, specificity=spec, threshold=model.threshold,
                   decision=f"{model.description['positive']} when probability >= {model.threshold:.4f} "
                            "(threshold stored in the run, chosen on validation patients)",
                   patients=[{k: r[k] for k in ("patient", "probability", "flagged", "num_images")}
                             | {"label": names[int(t)]} for r, t in zip(rows, y)])
    metrics["evaluated_on"] = {"data": str(data_dir), "num_patients": len(rows), "num_images": len(manifest)}
    two_class = np.stack([1 - p_pos, p_pos], 1)
    if bootstrap > 0:
        from leukfed.common.stats import bootstrap_ci

        metrics["ci"] = bootstrap_ci(y, two_class, names, n_resamples=bootstrap, seed=bootstrap_seed)
        metrics["bootstrap"] = {"unit": "patient", "resamples": bootstrap, "seed": bootstrap_seed, "level": 0.95,
                                "method": "stratified percentile bootstrap"}
    if predictions_file is not None:
        from leukfed.common.stats import Predictions, save_predictions

        patients = tuple(str(r["patient"]) for r in rows)
        pred = Predictions(two_class, y, tuple(names), tuple(folders[p].name for p in cells), patients)
        metrics["predictions_file"] = str(save_predictions(predictions_file, pred))
    return metrics
