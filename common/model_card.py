"""MODEL_CARD.md for every exported run directory: origin, data and sites, training, privacy, metrics, limits."""
from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from leukfed.common.atomic import atomic_write_text
from leukfed.common.fedconfig import FedConfig
from leukfed.common.settings import declared, default_of, option_flags

MODEL_CARD = "MODEL_CARD.md"

# Headline metrics first, in this order; any other number follows.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "auc_ovr", "sensitivity", "specificity", "loss",
            "eval_accuracy", "eval_balanced_accuracy", "eval_macro_f1", "eval_loss")
INTENDED_USE = (
    "Research on federated learning for leukemia classification from blood-smear microscopy, and at most "
    "decision support reviewed by a qualified haematologist or pathologist. It is not a diagnosis, not a "
    "medical device and not validated for clinical use.")
LIMITS = (
    "Trained and scored only on the images named above; performance on other scanners, stains, "
    "magnifications, laboratories or populations (age groups, subtypes, rare leukemias) is unknown.",
    "Scores come from small test sets where the counts are small: read the intervals, not the point values.",
    "Per-image scores overstate per-patient performance when a patient contributes many images; images of "
    "one patient must never be split across training and test.",
    "Known failure mode: acute promyelocytic leukemia (APL) identified per patient degrades on cohorts "
    "collected later than the training cohort (dataset shift); re-validate on each new cohort.",
    "A federated model reflects the sites that took part; a site's own population may differ from the mix.",
)


@dataclass(frozen=True)
class ModelCard:
    """What a card states; `render` lays it out as Markdown."""

    kind: str                                  # federated | centralized
    model: str
    weights_origin: str                        # the model's pretrained_source
    class_names: tuple[str, ...]
    data: tuple[str, ...]                      # lines about the data
    training: tuple[str, ...]                  # lines: rounds or epochs, strategy, optimiser
    privacy: tuple[str, ...]
    metrics: Mapping[str, Any]
    command: str
    sites: Mapping[str, Mapping[str, int]] = field(default_factory=dict)   # name -> counts the site reported
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def weights_origin(source: str) -> str:
    """The model's pretrained_source in words."""
    if not source or source.startswith("none"):
        return "trained from scratch (random initialisation)"
    if source.startswith("package"):
        return f"ImageNet weights shipped with the model's Python package ({source}), fine-tuned"
    if source.startswith(("hub", "timm-hub")):
        return f"ImageNet weights from the timm hub ({source}), fine-tuned"
    return f"initial weights from {source}, fine-tuned"


def _origin(card: ModelCard) -> str:
    """weights_origin, but a patient model's backbone is frozen: only its head was trained."""
    origin = weights_origin(card.weights_origin)
    return origin.replace(", fine-tuned", ", frozen (only the patient head was trained)") if "patient" in card.kind \
        else origin


def _interval(metrics: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """A 95 % interval from `<key>_ci` or `ci[<key>]`: [low, high] or {low/lower, high/upper}."""
    ci = metrics.get(f"{key}_ci")
    if ci is None and isinstance(metrics.get("ci"), Mapping):
        ci = metrics["ci"].get(key)
    if isinstance(ci, Mapping):
        ci = (ci.get("low", ci.get("lower")), ci.get("high", ci.get("upper")))
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown table rows `| metric | value | 95 % interval |` of the numbers in `metrics`."""
    keys = [k for k in HEADLINE if _number(metrics.get(k))]
    keys += sorted(k for k, v in metrics.items() if _number(v) and k not in keys and not k.endswith("_ci"))
    rows = []
    for key in keys:
        interval = _interval(metrics, key)
        shown = f"{interval[0]:.4g} – {interval[1]:.4g}" if interval else "—"
        rows.append(f"| {key} | {metrics[key]:.4g} | {shown} |")
    return rows


def render(card: ModelCard) -> str:
    title = f"# Model card: {card.model} ({card.kind})"
    lines = [title, "", f"Written by leukfed on {card.created}.", "", "## Model", "",
             f"- Architecture: `{card.model}`, {len(card.class_names)} classes: {', '.join(card.class_names)}",
             f"- Weights origin: {_origin(card)}", "",
             "## Data", "", *(f"- {line}" for line in card.data)]
    if card.sites:
        lines += ["", "Sites (counts are the aggregates each site itself reported):", "",
                  "| site | training examples (last round) | evaluation examples (last round) |", "|---|---:|---:|"]
        for name, counts in card.sites.items():
            lines.append(f"| {name} | {counts.get('train', '—')} | {counts.get('evaluate', '—')} |")
    lines += ["", "## Training", "", *(f"- {line}" for line in card.training),
              "", "## Privacy", "", *(f"- {line}" for line in card.privacy), "", "## Metrics", ""]
    rows = metric_rows(card.metrics)
    lines += (["| metric | value | 95 % interval |", "|---|---:|---|", *rows] if rows else ["No metrics were recorded."])
    patient = card.metrics.get("patient_level")
    if isinstance(patient, Mapping) and metric_rows(patient):
        lines += ["", "Per patient:", "", "| metric | value | 95 % interval |", "|---|---:|---|", *metric_rows(patient)]
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limits", "", *(f"- {line}" for line in LIMITS),
              "", "## How to reproduce", "", "```", card.command, "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: Path, card: ModelCard) -> Path:
    path = Path(run_dir) / MODEL_CARD
    atomic_write_text(path, render(card))
    return path


# -- federated runs ----------------------------------------------------------------------------------
def server_command(fed: FedConfig) -> str:
    """The leuk-server command line with this run's coordinator settings (defaults left out)."""
    parts = ["leuk-server", "--certs", "CERTS"]
    for f in declared(FedConfig):
        if f.metadata["who"] != "coordinator" or not f.metadata["cli"] or f.name == "resume":
            continue
        value, flag = getattr(fed, f.name), option_flags(f)[0]
        if value == default_of(f) and not f.metadata["required"]:
            continue
        if isinstance(value, bool):
            on, _, off = flag.partition("/")
            parts.append(on if value else (off or f"--no-{on[2:]}"))
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def site_counts(history: list[dict]) -> dict[str, dict[str, int]]:
    """Per site, the example counts it reported in the last round it trained or was scored."""
    counts: dict[str, dict[str, int]] = {}
    for row in history:
        for name, site in row.get("sites", {}).items():
            for phase in ("train", "evaluate"):
                value = (site.get(phase) or {}).get("num-examples")
                if _number(value):
                    counts.setdefault(name, {})[phase] = int(value)
            counts.setdefault(name, {})
    return counts


def federated_privacy(fed: FedConfig, history: list[dict]) -> tuple[str, ...]:
    lines = []
    if fed.dp:
        spent = [row["privacy"] for row in history if row.get("privacy")]
        reached = (f"; the largest epsilon any site reported: {max(p['max_epsilon'] for p in spent):.3g} at delta "
                   f"{max(p['delta'] for p in spent):g}" if spent else "; no site reported its epsilon")
        lines.append(f"Differential privacy (DP-SGD at each site): noise multiplier {fed.dp_noise_multiplier:g}, "
                     f"per-example clipping {fed.dp_max_grad_norm:g}, delta {fed.dp_delta:g}{reached}")
    else:
        lines.append("No differential privacy: the updates are not noised")
    lines.append("Secure aggregation: " + ("on (the coordinator saw only the sum of the updates)"
                                           if fed.secure_aggregation else "off (the coordinator saw each site's update)"))
    lines.append(f"Metrics computed on fewer than {fed.min_metric_examples} examples were not released by the sites")
    return tuple(lines)


def federated_card(fed: FedConfig, source: str, class_names, history: list[dict], metrics: dict) -> ModelCard:
    rounds = len(history)
    scored_at = "the coordinator's held-out data" if fed.eval_data else "the sites' own validation images (aggregated)"
    local = f"{fed.local_steps} local batches" if fed.local_steps else f"{fed.local_epochs} local epoch(s)"
    data = (f"Each site trained on its own images; no image left a site. Metrics below: {scored_at}"
            + (f" ({fed.eval_data}{', test side of ' + fed.eval_split if fed.eval_split else ''})" if fed.eval_data else ""),
            f"{len(site_counts(history))} site(s) took part, named "
            + ("as registered with `leuk certs`" if fed.registered_sites else
               "as they named themselves (no registration list: a simulation or an --insecure run)"))
    training = (f"{rounds} federated round(s) of {fed.strategy}, {local} per round, batch {fed.batch_size}, "
                f"{fed.optimizer} lr {fed.lr:g}, loss {fed.loss}, augmentation {fed.augment}, seed {fed.seed}",
                f"Updates travelled as {fed.transfer_dtype}; the coordinator refused updates failing its checks "
                f"(norm bound {fed.max_update_norm:g}, at most {fed.max_examples_per_site} examples per site)")
    return ModelCard("federated", fed.model, source, tuple(class_names), data, training, federated_privacy(fed, history),
                     metrics, server_command(fed), site_counts(history))


# -- centralized runs --------------------------------------------------------------------------------
def train_command(config: Mapping[str, Any], data_dir: str, out_dir: str, defaults: Mapping[str, Any]) -> str:
    """The `leuk train` command line for a TrainConfig (as dict) and its defaults."""
    parts = ["leuk", "train", "--data", str(data_dir), "--out", str(out_dir), "--split", str(Path(out_dir) / "split.json")]
    for key, value in config.items():
        if key in ("val_fraction", "test_fraction", "device") or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is not None and value is not False:
            parts += [flag, str(value)]
    return shlex.join(parts)


def centralized_card(config: Mapping[str, Any], defaults: Mapping[str, Any], source: str, class_names, *,
                     data_dir: str, out_dir: str, images: Mapping[str, int], history: list[dict],
                     metrics: dict) -> ModelCard:
    data = (f"Dataset {data_dir}: {images.get('train', 0)} training, {images.get('val', 0)} validation and "
            f"{images.get('test', 0)} test images (split saved as split.json)",
            "Metrics below: the test images, never used for training or model selection")
    training = (f"{len(history)} epoch(s) of centralized training (best validation loss kept), batch "
                f"{config.get('batch_size')}, {config.get('optimizer')} lr {config.get('lr')}, loss {config.get('loss')}, "
                f"augmentation {config.get('augment')}, seed {config.get('seed')}",)
    privacy = ("No differential privacy; all images were pooled on one machine",)
    return ModelCard("centralized", str(config.get("model")), source, tuple(class_names), data, training, privacy,
                     metrics, train_command(config, data_dir, out_dir, defaults))


def patient_card(description: Mapping[str, Any], *, data_dir: str, command: str, num_patients: int,
                 num_positive: int, num_cells: int) -> ModelCard:
    """The card of a patient model (`leuk train-patients`): frozen features, a head, validation figures."""
    recipe = description["recipe"]
    data = (f"Dataset {data_dir}: {num_patients} patients ({num_positive} {description['positive']}), "
            f"{num_cells} cell images; a cell's label is its patient's diagnosis",
            "Metrics below: out-of-fold validation patients of the inner cross-validation (no separate test "
            "set was held out: score a later cohort with `leuk evaluate`)")
    training = (f"Frozen {recipe['backbone']} features at {recipe['image_size']} px, cells: {recipe['cells']}, "
                f"head: {recipe['head']}, weight decay {recipe['weight_decay']}, ensemble: {recipe['ensemble']} "
                f"({description['num_heads']} heads)",
                f"Temperature {description['temperature']:.3f}; threshold {description['threshold']:.4f}: "
                f"{description['threshold_rule']}")
    privacy = ("No differential privacy; all patients' cells were pooled on one machine",)
    model = f"{recipe['backbone']} + {recipe['head']} head"
    return ModelCard("patient", model, description.get("backbone_source", ""), tuple(description["class_names"]),
                     data, training, privacy, dict(description.get("validation", {})), command)


def federated_patient_card(description: Mapping[str, Any], *, command: str) -> ModelCard:
    """The card of a patient model trained by `leuk-server --task patients`: one FedAvg federation of the head."""
    recipe, fed = description["recipe"], description["federation"]
    sites = {name: {k: "masked" if v is None else v for k, v in counts.items()} for name, counts in fed["sites"].items()}
    validation = description["validation"]
    data = (f"{len(sites)} sites' own patient folders: {fed['train_patients']} training patients "
            f"({fed['train_positive']} {description['positive']}), {fed['cells']} cells; each site kept "
            "its own share of its patients per diagnosis for validation (its policy's patient-val-fraction)",
            f"Metrics below: the {validation['num_patients']} validation patients of the sites that released a "
            "histogram, from binned logits (no separate test set: score a later cohort with `leuk evaluate`)")
    training = (f"Frozen {recipe['backbone']} features at {recipe['image_size']} px, cells: {recipe['cells']}, "
                f"head: {recipe['head']}, L2 {recipe['weight_decay']}; ONE FedAvg federation of the head (no fold "
                f"ensemble, unlike `leuk train-patients`): {fed['rounds']} rounds x {fed['local_epochs']} local "
                f"epochs of SGD (step {fed['lr']:g}, cosine-decayed; batch {fed['batch_size']} cells), averaged by "
                "training patients; standardisation and class weights from the sites' summed moments and counts",
                f"Temperature {description['temperature']:.3f}; threshold {description['threshold']:.4f}: "
                f"{description['threshold_rule']}")
    if fed.get("secure_aggregation"):
        privacy = ("No differential privacy. Secure aggregation: each site's moments (feature sums and sums of squares "
                   "of its training patients' cells, patients per diagnosis), its head update each round and its "
                   "histogram of its validation patients' binned logits under the final head left it only masked; the "
                   "coordinator saw their sums over the sites and, in the clear, each site's cell count and number "
                   f"of validation patients (a site with fewer than {fed['min_metric_examples']} added no histogram). "
                   "No image, file name or single cell's features left a site.",)
    else:
        privacy = ("No differential privacy. What left each site, in the clear to the coordinator: its training "
                   "patients' cell count, feature sums and sums of squares and patients per diagnosis; its own head "
                   "update each round (from which a coordinator sending a crafted head can approximate the sum of one "
                   "diagnosis's training-patient mean features at that site); one histogram of its validation "
                   f"patients' binned logits under the final head (withheld below {fed['min_metric_examples']} patients; "
                   "with 1-2 patients of a diagnosis it shows their binned scores). No image, file name or single "
                   "cell's features left a site.",)
    model = f"{recipe['backbone']} + {recipe['head']} head"
    return ModelCard("federated patient", model, description.get("backbone_source", ""),
                     tuple(description["class_names"]), data, training, privacy,
                     {k: v for k, v in validation.items() if isinstance(v, (int, float))}, command, sites)


def config_defaults(cls) -> dict:
    """Field defaults of a settings dataclass (for the command lines above)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}
