"""The coordinator's half of `leuk-server --task patients`: the APL patient model trained by FedAvg.

The algorithm of benchmarks/apl_federated.py (its pieces in common/patient_federated.py), run over real
sites with the ServerApp's machinery (registered sites, prompt grid, guarded FedAvg, history, status):

1. moments: each site sends its training patients' cell count, feature sums and sums of squares and its
   patients per diagnosis (each reply checked: float arrays, bounded counts, consistent sums); the server
   sums them into the standardisation and the class weights;
2. the seeded initial head (recipe --patient-recipe) with that standardisation;
3. --rounds FedAvg rounds over the head (each site: --local-epochs of SGD at a cosine-decayed --lr;
   average weighted by training patients; every reply checked by the guard, which also sends the
   standardisation unchanged every round and rejects an update that moved it); with
   --secure-aggregation each round is masked (server/secagg.py): the coordinator sees only the sum of
   the sites' head updates (the standardisation's deltas are 0, so the average keeps it exactly);
4. calibration: each site scores its validation patients with the final head and sends only a histogram
   of their logits per diagnosis (once per run; at least --min-sites histograms needed); the summed
   histogram gives the threshold (>= the recipe's target sensitivity) and the temperature;
5. export: STATE/patient-model, a patient run directory as `leuk train-patients` writes it (for
   `leuk evaluate --model STATE/patient-model` and `leuk predict`), with its MODEL_CARD.md.

With --secure-aggregation steps 1 and 4 are masked rounds too (`secure_sum`: each site sends its sums as
means weighted by its cell count or validation patients, and the coordinator learns only their sum and
the weights), so no single site's moments, head update or histogram reaches the coordinator.

One FedAvg federation, not the fold ensemble of `leuk train-patients` (and of the benchmark): the model
is one head, and its validation patients are each site's own held-out share, set by the site's policy
(leuk-client --patient-val-fraction, --patient-split-seed): the run's --site-val-fraction and --seed do
not move the sites' patient splits.

    leuk-server --certs certs --task patients --patient-recipe lite0-meanprob --rounds 100 --local-epochs 2 \\
        --lr 0.1 --batch-size 256 --min-sites 3 --state state
    leuk-client --server HOST:9092 --data /data/apl --site a --certs certs/sites/a --tasks cells,patients \\
        --patient-val-fraction 0.25 --patient-split-seed 0
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from leukfed import __version__
from leukfed.common.atomic import atomic_write_json
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.wire import encode_state
from leukfed.common.patient_federated import (BINS, HIGH, HISTOGRAM_KEYS, LOW, PATIENT_STAGE, Moments, feature_dim,
                                              federable_recipe, histogram_auc, histogram_calibration,
                                              histogram_from_means, histogram_layout, histogram_rates,
                                              initial_head, moments_from_means, moments_layout,
                                              schedule_advice, zeros)
from leukfed.common.patient_model import PATIENT_RUN_FORMAT, PatientModel, save_patient_model
from leukfed.common.patient_protocol import sigmoid
from leukfed.common.runs import HISTORY_JSON
from leukfed.server.registered_sites import RegisteredSites
from leukfed.server.run_status import write_status
from leukfed.server.server_app import (log, print_round, round_row, secure_round_report, training_grid,
                                       wait_for_sites)
from leukfed.server.strategies import make_strategy

EXPORT_DIR = "patient-model"
MOMENTS = f"{MessageType.QUERY}.moments"


def run(grid: Grid, fed: FedConfig, class_names: tuple[str, ...], sites: RegisteredSites, state_dir: Path) -> None:
    """Moments, rounds, calibration and export (`grid` already restricted to the registered sites)."""
    recipe = federable_recipe(fed.patient_recipe)
    if fed.positive not in class_names or len(class_names) != 2:
        raise LeukError(f"--task patients needs two diagnoses, one of them {fed.positive!r}; the sites report "
                        f"{list(class_names)}")
    config = {"class-names": ",".join(class_names)}
    if advice := schedule_advice(fed.rounds, fed.local_epochs, fed.lr, fed.batch_size):
        log(advice)
    write_status(state_dir, phase="moments")
    dim = feature_dim(recipe.backbone, recipe.image_size)
    # --secure-aggregation: moments, head rounds and calibration masked; a site's weight is at most its cells
    train_grid = training_grid(grid, fed, max_examples=SECURE_MAX_WEIGHT)
    total, trained = (secure_moments(grid, train_grid, fed, sites, dim, config) if fed.secure_aggregation
                      else ask_moments(grid, fed, sites, dim, config))
    if min(total.patients) < 1:
        raise LeukError(f"the sites' training patients hold one diagnosis only ({total.patients[0]} other, "
                        f"{total.patients[1]} {fed.positive}): both are needed")
    log(f"moments from {len(trained)} sites: {sum(total.patients)} training patients ({total.patients[1]} "
        f"{fed.positive}), {total.cells} cells")
    head = federation_head(recipe.head, total, fed.seed)
    strategy = make_strategy(fed)
    strategy.sites = sites
    strategy.frozen = {k: np.array(getattr(head, k).numpy(), dtype=np.float32) for k in ("center", "scale")}
    history: list[dict] = []

    def after_round(current_round: int, arrays: ArrayRecord):
        if current_round == 0:
            return None
        secure = secure_round_report(train_grid, sites)
        row = round_row(current_round, strategy, None, 0.0, time.perf_counter() - strategy.log.started)
        if secure is not None:
            row["secure_aggregation"] = secure
        history.append(row)
        atomic_write_json(state_dir / HISTORY_JSON, history)
        print_round(row, fed.rounds)
        write_status(state_dir, phase="training" if current_round < fed.rounds else "calibrating",
                     round=min(current_round + 1, fed.rounds), rounds_completed=current_round)
        return None

    write_status(state_dir, phase="training", round=1, rounds_completed=0)
    result = strategy.start(grid=train_grid, initial_arrays=encode_state(head.state_dict()), num_rounds=fed.rounds,
                            timeout=fed.round_timeout, evaluate_fn=after_round,
                            train_config=ConfigRecord({**config, "patients-negative": total.patients[0],
                                                       "patients-positive": total.patients[1]}))
    if not history or not any(row["sites_replied"] for row in history):
        raise LeukError("no round completed: no site sent a usable update")
    center, scale = head.center.clone(), head.scale.clone()
    final = {k: torch.from_numpy(np.array(v.numpy(), copy=True)).float() for k, v in result.arrays.items()}
    head.load_state_dict(final)
    head.center.copy_(center)   # the standardisation is the server's own, from the moments: what the sites
    head.scale.copy_(scale)     # sent back for it (unchanged by local training) is not trusted
    final_head = encode_state(head.state_dict())
    calibration = (secure_calibration(grid, train_grid, fed, sites, final_head, config) if fed.secure_aggregation
                   else plain_calibration(fed, ask_histograms(grid, fed, sites, final_head, config, trained)))
    export(state_dir, fed, recipe, head, class_names, total, trained, calibration, len(history))
    write_status(state_dir, phase="finished", rounds_completed=len(history))
    log(f"finished {len(history)} rounds; patient model exported to {state_dir / EXPORT_DIR}")


def federation_head(kind: str, total: Moments, seed: int):
    """The seeded initial head with the summed moments' standardisation; LeukError where it is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):   # overflowing sums are named below
        head = initial_head(kind, total, seed)
    if not (torch.isfinite(head.center).all() and torch.isfinite(head.scale).all()):
        raise LeukError("the sites' summed moments give a non-finite center or scale (sums overflow)")
    return head


def ask_moments(grid: Grid, fed: FedConfig, sites: RegisteredSites, dim: int,
                config: dict) -> tuple[Moments, dict[str, int | None]]:
    """The summed moments and each site's training patients by site name (every site's moments seen alone);
    unusable replies logged and ignored; fewer than min-sites: LeukError."""
    nodes = wait_for_sites(grid, fed.min_sites, sites)
    messages = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=n, message_type=MOMENTS)
                for n in nodes]
    found: dict[str, Moments] = {}
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout):
        node = reply.metadata.src_node_id
        if node not in nodes:
            continue
        sites.note_reply(reply)
        moments, problem = read_moments(reply, dim)
        if moments is None:
            log(f"moments: ignored the reply of {sites.label(node)}: {problem}")
        else:
            found[sites.site_name(node)] = moments
    if len(found) < fed.min_sites:
        raise LeukError(f"only {len(found)} sites sent usable moments; the run needs min-sites {fed.min_sites}")
    return (sum(found.values(), Moments(0, np.zeros(dim), np.zeros(dim), (0, 0))),
            {name: sum(m.patients) for name, m in found.items()})


def secure_sum(grid: Grid, train_grid: Grid, fed: FedConfig, sites: RegisteredSites, stage: str,
               layout: dict, config: dict, head: ArrayRecord | None = None) -> tuple[dict[str, np.ndarray], int, dict[str, dict]]:
    """One masked round of `stage` over the registered sites: the weighted mean of their arrays, the total
    weight, and each answering site's clear metrics by name (its weight, num-examples, among them)."""
    nodes = wait_for_sites(grid, fed.min_sites, sites)
    messages = []
    for node in nodes:
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zeros(layout).items()}),
                              "config": ConfigRecord({**config, PATIENT_STAGE: stage})})
        if head is not None:
            content["head"] = head
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    replies = [r for r in train_grid.send_and_receive(messages, timeout=fed.round_timeout) if not r.has_error()]
    secure_round_report(train_grid, sites)
    report = train_grid.last_report
    if report.aborted or not replies:
        raise LeukError(f"the secure {stage} round failed: {report.aborted or 'no site answered'}")
    metrics = {sites.site_name(r.metadata.src_node_id): dict(r.content["metrics"]) for r in replies}
    if not all(type(m.get(k, 0)) is int and m.get(k, 0) >= 0 for m in metrics.values()
               for k in ("num-examples", "secagg-clipped")):
        raise LeukError(f"the secure {stage} round: a site sent malformed counts (num-examples, secagg-clipped)")
    if clipped := sum(m.get("secagg-clipped", 0) for m in metrics.values()):
        raise LeukError(f"the secure {stage} round clipped {clipped} values: raise --secagg-clip")
    if len(metrics) < fed.min_sites:
        raise LeukError(f"only {len(metrics)} sites took part in the secure {stage} round; the run needs min-sites "
                        f"{fed.min_sites}")
    return {k: v.numpy() for k, v in replies[0].content["arrays"].items()}, report.total_examples, metrics


def secure_moments(grid: Grid, train_grid: Grid, fed: FedConfig, sites: RegisteredSites, dim: int,
                   config: dict) -> tuple[Moments, dict[str, int | None]]:
    """The summed moments from one masked round (no site's own); each site's training patients unknown (None)."""
    mean, cells, metrics = secure_sum(grid, train_grid, fed, sites, "moments", moments_layout(dim), config)
    total = moments_from_means(mean, cells)
    if problem := moments_problem(total, dim, len(metrics), tolerance=SECURE_SUM_TOLERANCE):
        raise LeukError(f"the sites' summed moments are unusable: {problem} (a site sent a malformed sum)")
    return total, {name: None for name in metrics}


MAX_CELLS = 10_000_000          # per site: the moments of more cells are not believed
MAX_PATIENTS = 100_000          # per site and diagnosis
SUM_TOLERANCE = 1e-6            # relative slack of sum(x)^2 <= n sum(x^2) (Cauchy-Schwarz) for rounding
SECURE_SUM_TOLERANCE = 1e-3     # the same through fixed point (~2^-26 per cell-weighted mean): near-constant,
                                # tiny features would otherwise fail it
SECURE_MAX_WEIGHT = 1 << 24     # >= MAX_CELLS: a site's cell count is its moments round's weight


def read_moments(reply: Message, dim: int) -> tuple[Moments | None, str]:
    """A site's moments, or (None, why not): untrusted input, checked for dtypes, shapes, finiteness, bounded
    counts and sums that some real cells could have."""
    if reply.has_error():
        return None, reply.error.reason.strip().splitlines()[-1][:300] if reply.error.reason else "error reply"
    arrays = reply.content.array_records.get("moments")
    metrics = reply.content.metric_records.get("metrics")
    if arrays is None or metrics is None or set(arrays.keys()) != {"total", "squares"}:
        return None, "no moments in the reply"
    try:
        raw = [arrays[k].numpy() for k in ("total", "squares")]
    except Exception:  # noqa: BLE001 - untrusted bytes
        return None, "feature sums are not readable arrays"
    if not all(a.dtype.kind == "f" for a in raw):
        return None, f"feature sums must be floating point, not {raw[0].dtype}/{raw[1].dtype}"
    counts = [metrics.get(k) for k in ("cells", "patients-negative", "patients-positive")]
    if not all(type(c) is int for c in counts):
        return None, "counts must be whole numbers"
    found = Moments(counts[0], *(a.astype(np.float64) for a in raw), (counts[1], counts[2]))
    if problem := moments_problem(found, dim, 1):
        return None, problem
    return found, ""


def moments_problem(m: Moments, dim: int, sites: int, tolerance: float = SUM_TOLERANCE) -> str:
    """Why moments summed over `sites` sites cannot come from real cells ("" when they can): finite sums of
    width `dim`, bounded counts, sums of squares at least what the sums need."""
    total, squares, counts = m.total, m.squares, (m.cells, *m.patients)
    if total.shape != (dim,) or squares.shape != (dim,) or not (np.isfinite(total).all() and np.isfinite(squares).all()):
        return f"feature sums must be {dim} finite numbers"
    if min(counts) < 0 or counts[0] < 1 or counts[1] + counts[2] < 1 or counts[0] > sites * MAX_CELLS \
            or max(counts[1:]) > sites * MAX_PATIENTS:
        return (f"counts must be whole numbers, with 1 to {MAX_CELLS} cells and at least one and at most "
                f"{MAX_PATIENTS} patients per diagnosis per site")
    if (squares < 0).any() or (total ** 2 > squares * counts[0] * (1 + tolerance)).any():
        return "sums of squares too small for the feature sums (no cells have these moments)"
    return ""


def ask_histograms(grid: Grid, fed: FedConfig, sites: RegisteredSites, arrays: ArrayRecord, config: dict,
                   trained: dict[str, int]) -> dict[str, tuple[int, np.ndarray | None]]:
    """The calibration round: per site, its number of validation patients and its histogram (None: withheld);
    `trained`: each site's training patients from its moments (bounds its validation count)."""
    nodes = [n for n in grid.get_node_ids()]
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in nodes]
    found: dict[str, tuple[int, np.ndarray | None]] = {}
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout):
        node = reply.metadata.src_node_id
        if node not in nodes:
            continue
        name = sites.site_name(node)
        if reply.has_error():
            log(f"calibration: {sites.label(node)} failed: {(reply.error.reason or '?').strip().splitlines()[-1][:300]}")
            continue
        entry, problem = read_histogram(dict(reply.content.metric_records.get("metrics") or {}), trained.get(name, 0))
        if entry is None:
            log(f"calibration: ignored the reply of {sites.label(node)}: {problem}")
        else:
            if entry[1] is None:
                log(f"calibration: {sites.label(node)} withheld its histogram ({entry[0]} validation patients, "
                    f"min-metric-examples {fed.min_metric_examples})")
            found[name] = entry
    return found


def read_histogram(metrics: dict, trained: int) -> tuple[tuple[int, np.ndarray | None] | None, str]:
    """A site's (validation patients, histogram or None where withheld), or (None, why not): the count is
    bounded by the site's training patients (at most 10 x them + 10, and MAX_PATIENTS)."""
    count = metrics.get("num-examples")
    rows = [metrics.get(k) for k in HISTOGRAM_KEYS]
    if type(count) is not int or count < 0:
        return None, "no patient count"
    if count > min(10 * trained + 10, MAX_PATIENTS):
        return None, f"{count} validation patients is out of bounds for a site with {trained} training patients"
    if rows[0] is None and rows[1] is None:
        return (count, None), ""
    if not all(isinstance(r, list) and len(r) == BINS and all(type(v) is int and v >= 0 for v in r)
               for r in rows) or sum(map(sum, rows)) != count:
        return None, f"not a histogram of {BINS} bins per diagnosis summing to its patient count"
    return (count, np.asarray(rows, dtype=np.int64)), ""


def released_histograms(fed: FedConfig, histograms: dict[str, tuple[int, np.ndarray | None]]) -> list[np.ndarray]:
    """The histograms calibration uses: from at least min-sites sites, with APL patients; LeukError otherwise."""
    released = [h for _, h in histograms.values() if h is not None]
    check_release(fed, len(released), np.sum(released, axis=0) if released else np.zeros((2, BINS), np.int64))
    return released


def check_release(fed: FedConfig, sites: int, summed: np.ndarray) -> None:
    """LeukError unless histograms of at least min-sites sites, with APL patients among them, are summed."""
    if sites < fed.min_sites:
        raise LeukError(f"calibration needs histograms from at least min-sites ({fed.min_sites}) sites; "
                        f"{sites} released one (a site withholds it below min-metric-examples "
                        f"({fed.min_metric_examples}) validation patients)")
    if summed[1].sum() == 0:
        raise LeukError(f"no site released a histogram with {fed.positive} validation patients: the sites raise "
                        "their patient-val-fraction, or lower --min-metric-examples where their policies allow")


@dataclass(frozen=True)
class Calibration:
    """What the calibration round gives the coordinator: the summed histogram, from how many sites, and each
    site's validation patients."""

    summed: np.ndarray            # (2, BINS)
    released: int
    evaluated: dict[str, int]


def plain_calibration(fed: FedConfig, histograms: dict[str, tuple[int, np.ndarray | None]]) -> Calibration:
    """From each site's own histogram (seen alone)."""
    return Calibration(np.sum(released_histograms(fed, histograms), axis=0), sum(h is not None for _, h in histograms.values()),
                       {name: count for name, (count, _) in histograms.items()})


def secure_calibration(grid: Grid, train_grid: Grid, fed: FedConfig, sites: RegisteredSites, head: ArrayRecord,
                       config: dict) -> Calibration:
    """From one masked round: only the sum of the sites' histograms (a site with fewer validation patients
    than min-metric-examples, which it sends in the clear, adds zeros)."""
    mean, patients, metrics = secure_sum(grid, train_grid, fed, sites, "calibrate", histogram_layout(), config, head)
    evaluated = {name: m.get("num-examples", 0) for name, m in metrics.items()}   # whole numbers: secure_sum
    released = [n for n in evaluated.values() if n >= max(fed.min_metric_examples, 1)]
    summed = histogram_from_means(mean, patients)
    if (summed < 0).any() or int(summed.sum()) != sum(released):
        raise LeukError("the sites' summed histogram is unusable: it does not count their validation patients "
                        "(a site sent a malformed sum)")
    check_release(fed, len(released), summed)
    return Calibration(summed, len(released), evaluated)


def export(state_dir: Path, fed: FedConfig, recipe, head, class_names: tuple[str, ...], total: Moments,
           trained: dict[str, int | None], calibration: Calibration, rounds: int) -> Path:
    """STATE/patient-model: heads.safetensors, patient_model.json and MODEL_CARD.md (train-patients' format);
    `trained`: each site's training patients (None: only their sum was seen)."""
    from leukfed.common.model_card import federated_patient_card, server_command, write_model_card

    summed = calibration.summed
    logit_threshold, temperature = histogram_calibration([summed], LOW, HIGH, recipe.target_sensitivity)
    threshold = 0.0 if logit_threshold == -math.inf else float(sigmoid(logit_threshold / temperature))
    sensitivity, specificity = histogram_rates(summed, logit_threshold)
    description = {
        "format": PATIENT_RUN_FORMAT, "kind": "patient", "recipe": {**asdict(recipe), "ensemble": "single"},
        "class_names": list(class_names), "positive": fed.positive, "cell_types": [],
        "feature_dim": int(total.total.shape[0]), "num_heads": 1, "temperature": temperature, "threshold": threshold,
        "threshold_rule": f"lower edge of the highest logit bin at or above which >= {recipe.target_sensitivity:.0%} "
                          f"of the sites' {fed.positive} validation patients lie ({BINS} bins on [{LOW:g}, {HIGH:g}], "
                          "summed site histograms)",
        "validation": {"auc": histogram_auc(summed), "sensitivity": sensitivity, "specificity": specificity,
                       "num_patients": int(summed.sum()), "num_positive": int(summed[1].sum()), "binned": True},
        "federation": {
            "rounds": rounds, "local_epochs": fed.local_epochs, "lr": fed.lr, "batch_size": fed.batch_size,
            "seed": fed.seed, "validation_split": "each site's own (its policy's patient-val-fraction)",
            "min_metric_examples": fed.min_metric_examples, "cells": total.cells,
            "train_patients": sum(total.patients), "train_positive": total.patients[1],
            "sites": {name: {"train": count, "evaluate": calibration.evaluated.get(name, 0)}
                      for name, count in trained.items()},
            "histograms_released": calibration.released, "secure_aggregation": fed.secure_aggregation},
        "backbone_source": f"package:{recipe.backbone}",   # feature_backbone: the offline ImageNet weights package
        "leukfed_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = state_dir / EXPORT_DIR
    save_patient_model(out, PatientModel(recipe, [head.eval()], (), temperature, threshold, description))
    write_model_card(out, federated_patient_card(description, command=server_command(fed)))
    log(f"calibration: {int(summed.sum())} validation patients from {calibration.released} sites; temperature "
        f"{temperature:.3f}, threshold {threshold:.4f} (validation sensitivity {sensitivity:.2f}, specificity "
        f"{specificity:.2f}, binned)")
    return out
