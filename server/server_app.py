"""Flower ServerApp: federated rounds with per-round checkpoints, history and a final run export."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from leukfed.common.flower.wire import encode_state
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.dp_settings import round_privacy
from leukfed.common.train import seed_everything
from leukfed.server.grids import PromptGrid
from leukfed.server.registered_sites import RegisteredSites, describe
from leukfed.server.run_status import write_status
from leukfed.server.state import Resumed, export_final, load_resumed, save_round
from leukfed.server.statistics_round import statistics_round
from leukfed.server.strategies import make_strategy, restore_strategy_state, strategy_state
from leukfed.server.tracking import SafeTracker, evaluation_scalars, open_tracker, round_scalars

app = ServerApp()


def log(message: str) -> None:
    print(f"[leukfed] {message}", flush=True)


def wait_for_sites(grid: Grid, minimum: int, sites: RegisteredSites | None = None) -> list[int]:
    """Block until `minimum` sites are connected (hospitals join when they are ready), logging progress."""
    last_count, last_log = -1, 0.0
    sites = sites if sites is not None else RegisteredSites()
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if len(nodes) != last_count or time.monotonic() - last_log > 60:
            names = shown_names(sorted(map(sites.site_name, nodes)))
            log(f"waiting for sites: {len(nodes)} of {minimum} connected" + (f" ({names})" if nodes else ""))
            last_count, last_log = len(nodes), time.monotonic()
        time.sleep(1.0)
    return nodes


MAX_CLASSES, MAX_CLASS_NAME = 1000, 100


def reported_classes(reply: Message) -> tuple[tuple[str, ...] | None, str]:
    """A site's answer to the class query: (its class list, "") or (None, why it is unusable). A
    reply is untrusted input: anything but a short list of distinct, printable names is ignored."""
    if reply.has_error():
        return None, f"error reply (code {reply.error.code})"
    info = reply.content.config_records.get("info")
    names = info.get("class-names") if info is not None else None
    if not isinstance(names, list) or not names:
        return None, "no class list"
    if len(names) > MAX_CLASSES:
        return None, f"{len(names)} classes (at most {MAX_CLASSES})"
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME and n.isprintable() and "," not in n
               for n in names):
        return None, f"class names must be printable text of 1-{MAX_CLASS_NAME} characters without commas"
    if len(set(names)) != len(names):
        return None, "repeated class names"
    return tuple(names), ""


def ask_class_names(grid: Grid, fed: FedConfig, sites: RegisteredSites | None = None) -> tuple[str, ...]:
    """The run's classes: given in the config, else the list most sites report (ties: the first list in
    sorted order). Malformed or conflicting answers are logged by site and ignored."""
    if fed.classes:
        return fed.classes
    sites = sites if sites is not None else RegisteredSites()
    nodes = wait_for_sites(grid, fed.min_sites, sites)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    answers: dict[int, tuple[str, ...]] = {}
    for reply in grid.send_and_receive(messages, timeout=fed.round_timeout):
        node = reply.metadata.src_node_id
        classes, problem = reported_classes(reply)
        if node in nodes:
            sites.note_reply(reply)   # a name it gives itself counts only without a registration list
        if node not in nodes or node in answers:
            log(f"class query: ignored a reply from {sites.label(node)} (not asked, or a second reply)")
        elif classes is None:
            log(f"class query: ignored the reply of {sites.label(node)}: {problem}")
        else:
            answers[node] = classes
    lists = Counter(answers.values())
    if not lists:
        raise LeukError("no site answered the class-list query with a usable class list")
    classes = min(lists, key=lambda c: (-lists[c], c))
    for node, other in sorted(answers.items()):
        if other != classes:
            shown = ", ".join(other[:10]) + (f" ... ({len(other)} classes)" if len(other) > 10 else "")
            log(f"{sites.label(node)} reports classes [{shown}], not the run's {list(classes)}; it will be refused")
    return classes


def initial_model(fed: FedConfig, num_classes: int):
    from leukfed.common.centralized import TrainConfig, build_model
    from leukfed.common.dp_model import dp_compatible

    model = build_model(TrainConfig(model=fed.model, image_size=fed.image_size or None,
                                    pretrained=fed.pretrained), num_classes)
    return dp_compatible(model) if fed.dp else model  # the sites' build_site_model does the same


def server_evaluator(fed: FedConfig, class_names):
    """Scores the global model on held-out data at the coordinator, when the run names some."""
    if not fed.eval_data:
        return None
    from leukfed.common.data import scan_dataset
    from leukfed.common.dataset import build_dataset, make_loader
    from leukfed.common.splits import load_split
    from leukfed.common.train import evaluate, select_hardware
    from leukfed.models import resolve_data_config

    manifest = scan_dataset(fed.eval_data)
    paths = list(load_split(fed.eval_split, manifest).test) if fed.eval_split else [s.path for s in manifest.samples]
    dataset = build_dataset(manifest, paths, resolve_data_config(fed.model, fed.image_size or None), train=False)
    loader = make_loader(dataset, fed.batch_size * 2, shuffle=False)
    hardware = select_hardware("auto")

    def score(model) -> dict:
        return evaluate(model.to(hardware.device), loader, hardware, class_names, patients=dataset.groups)
    return score


def round_row(round_: int, strategy, server_metrics: dict | None,
              server_eval_seconds: float, round_seconds: float) -> dict:
    """One history entry: per-site and aggregated metrics, bytes and timings."""
    log_ = strategy.log
    slowest = max((m.get("train_seconds", 0.0) for m in log_.train.values()), default=0.0)
    scoring = {n: m.get("eval_seconds", 0.0) for n, m in log_.evaluate_in_train.items()}
    slowest_work = max((m.get("train_seconds", 0.0) + scoring.get(n, 0.0) for n, m in log_.train.items()), default=0.0)
    return {
        "round": round_,
        "sites_sampled": len(log_.sites_sampled),
        "sites_replied": len(log_.train),
        "sites": site_rows(strategy.sites, log_),
        "failures": log_.failures,
        "rejected": log_.rejected,
        "ignored": log_.ignored,
        "train": log_.aggregated_train,
        "evaluate": log_.aggregated_evaluate,
        "server_evaluate": server_metrics or {},
        "bytes_sent": log_.bytes_sent,
        "bytes_received": log_.bytes_received,
        "round_seconds": round_seconds,
        "train_phase_seconds": log_.train_phase_seconds,
        "slowest_site_train_seconds": slowest,
        "slowest_site_work_seconds": slowest_work,   # training plus scoring the previous model, if asked
        "privacy": round_privacy(log_.train),
        "aggregation_seconds": log_.aggregation_seconds,
        "evaluate_phase_seconds": log_.evaluate_phase_seconds,
        "server_evaluate_seconds": server_eval_seconds,
        "time": time.time(),
    }


def site_rows(sites: RegisteredSites, log_) -> dict[str, dict]:
    """Per site, keyed by its name (`node-<id>` where none is known), the node id as a detail."""
    nodes = sorted(set(log_.train) | set(log_.evaluate), key=sites.site_name)
    return {sites.site_name(n): {"node": n, "train": log_.train.get(n, {}), "evaluate": log_.evaluate.get(n, {})}
            for n in nodes}


def attach_evaluation(history: list[dict], log_, current_round: int, sites: RegisteredSites) -> dict | None:
    """The sites scored an earlier round's model in this round's train task: that round's entry gets
    the scores (what its own evaluation message would have brought back)."""
    if not log_.evaluated_round:
        return None
    row = next((r for r in reversed(history) if r["round"] == log_.evaluated_round), None)
    if row is None:
        return None
    row["evaluate"] = log_.aggregated_evaluate_in_train
    for node, scores in log_.evaluate_in_train.items():
        row["sites"].setdefault(sites.site_name(node), {"node": node, "train": {}})["evaluate"] = scores
    row["evaluated_in_round"] = current_round
    return row


def shown_names(names: list[str], most: int = 12) -> str:
    """Site names for a log line: all of them, or the first `most` and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return (", ".join(names[:most]) or "none") + more


def print_round(row: dict, total_rounds: int) -> None:
    acc = row["server_evaluate"].get("accuracy", row["evaluate"].get("eval_accuracy"))
    acc_text = f" accuracy {acc:.4f}" if isinstance(acc, float) else ""
    if row.get("privacy"):
        acc_text += f", site epsilon <= {row['privacy']['max_epsilon']:.2f} (delta {row['privacy']['delta']:g})"
    loss = row["train"].get("train_loss")   # none from the patient task's sites
    loss_text = f" train loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    log(f"round {row['round']}/{total_rounds}: {row['sites_replied']}/{row['sites_sampled']} sites"
        f" ({shown_names(list(row['sites']))}),{loss_text}{acc_text}{',' if loss_text or acc_text else ''}"
        f" {row['round_seconds']:.1f}s" + (f", {len(row['failures'])} failures" if row["failures"] else "")
        + (f", {len(row['rejected'])} updates rejected" if row["rejected"] else ""))
    for entry in row["failures"]:
        reason = (entry["reason"] or "").strip().splitlines()
        log(f"  {describe(entry['site'], entry['node'])} failed in {entry['phase']}: {reason[-1] if reason else '?'}")
    for entry in row["rejected"]:
        log(f"  {describe(entry['site'], entry['node'])}: update rejected: {entry['reason']}")
    for entry in row.get("ignored", []):
        log(f"  {entry['reason']} ({entry['phase']})")


def run_params(fed: FedConfig) -> dict:
    """What a tracking run records as its parameters: the training settings."""
    return {k: v for k, v in fed.training_settings().items() if k not in ("eval_data", "eval_split")}


def training_grid(grid: Grid, fed: FedConfig, max_examples: int | None = None) -> Grid:
    """The grid for `strategy.start`: under --secure-aggregation every TRAIN exchange a masked round;
    `max_examples`: the largest weight one site may send (default: the protocol's 2^20)."""
    if not fed.secure_aggregation:
        return grid
    from leukfed.server.secagg import SecAggSettings, SecureAggregationGrid, check_secagg_strategy

    check_secagg_strategy(fed.strategy)
    limit = {"max_examples": max_examples} if max_examples else {}
    return SecureAggregationGrid(grid, SecAggSettings(threshold=fed.secagg_threshold or None, clip=fed.secagg_clip,
                                                      **limit), log=log)


def secure_round_report(train_grid: Grid, sites: RegisteredSites) -> dict | None:
    """The latest secure round's report for the history row (None: no secure aggregation); notes the site
    names the sites signed their round keys for (no list: simulation)."""
    secure = getattr(train_grid, "last_report", None)
    if secure is None:
        return None
    for node, name in secure.names.items():
        sites.note_claim(node, name)
    return dataclasses.asdict(secure)


@app.main()
def main(grid: Grid, context: Context) -> None:
    fed = FedConfig.from_run_config(context.run_config)
    sites = RegisteredSites.parse(fed.registered_sites)   # names every site in logs and history
    grid = sites.grid(grid)   # only the coordinator's sites exist for this run
    state_dir = Path(fed.state_dir or "leuk-server-state")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_status(state_dir, run_id=context.run_id, phase="waiting for sites", total_rounds=fed.rounds, round=0,
                 sites={name: node for node, name in sites.names.items()})
    resumed: Resumed | None = load_resumed(state_dir, fed) if fed.resume else None
    class_names = resumed.class_names if resumed else ask_class_names(grid, fed, sites)
    fed = FedConfig.from_run_config({**fed.to_run_config(), "class-names": ",".join(class_names)})
    if fed.task == "patients":   # the APL patient model: moments, FedAvg of a head, calibration, export
        from leukfed.server import patient_federation

        patient_federation.run(PromptGrid(grid), fed, class_names, sites, state_dir)
        return
    seed_everything(fed.seed)  # the initial global model is the same for the same seed
    model = initial_model(fed, len(class_names))
    if resumed:
        try:
            model.load_state_dict(resumed.state)
        except (RuntimeError, KeyError, TypeError) as err:
            raise LeukError(f"the checkpoint in {state_dir} does not fit {fed.model}: "
                            f"{str(err).splitlines()[0][:200]}") from None
    start_round = resumed.round + 1 if resumed else 1
    history = resumed.history if resumed else []
    if start_round > fed.rounds:
        log(f"all {fed.rounds} rounds are already complete")
    strategy = make_strategy(fed, statistics=frozenset(name for name, _ in model.named_buffers()))
    strategy.sites = sites   # the same names (and claims) as the class query saw
    strategy.round_offset = start_round - 1
    if resumed:
        restore_strategy_state(strategy, resumed.strategy_state)
    grid = PromptGrid(grid)
    train_grid = training_grid(grid, fed)
    score = server_evaluator(fed, class_names)
    final_metrics: dict = {}
    tracker = SafeTracker(open_tracker(fed.tracking, state_dir.name, run_params(fed)), log) if fed.tracking else None

    def after_round(current_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this after every round: evaluate, checkpoint, record (round 0: skip)."""
        nonlocal final_metrics
        if current_round == 0:
            return None
        round_ = start_round - 1 + current_round
        state = {k: v.numpy() for k, v in arrays.items()}
        model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})
        started = time.perf_counter()
        server_metrics = score(model) if score else None
        server_seconds = time.perf_counter() - started
        secure = secure_round_report(train_grid, sites)
        row = round_row(round_, strategy, server_metrics, server_seconds,
                        time.perf_counter() - strategy.log.started)
        if secure is not None:
            row["secure_aggregation"] = secure
        scored = attach_evaluation(history, strategy.log, round_, sites)
        history.append(row)
        save_round(state_dir, round_=round_, state=state, strategy_state=strategy_state(strategy),
                   fed=fed, class_names=class_names, history=history)
        if scored and isinstance(scored["evaluate"].get("eval_accuracy"), float):
            log(f"round {scored['round']} model, scored by the sites in round {round_}: "
                f"accuracy {scored['evaluate']['eval_accuracy']:.4f}")
        print_round(row, fed.rounds)
        write_status(state_dir, phase="training" if round_ < fed.rounds else "exporting",
                     round=min(round_ + 1, fed.rounds), rounds_completed=round_)
        if tracker is not None:
            tracker.log(round_, round_scalars(row))
            if scored:
                tracker.log(scored["round"], evaluation_scalars(scored))
        final_metrics = server_metrics or row["evaluate"]
        return MetricRecord({k: v for k, v in (server_metrics or {}).items() if isinstance(v, (int, float))})

    try:
        if start_round <= fed.rounds:
            write_status(state_dir, phase="training", round=start_round, rounds_completed=start_round - 1)
            strategy.start(
                grid=train_grid,
                initial_arrays=encode_state(model.state_dict()),
                num_rounds=fed.rounds - start_round + 1,
                timeout=fed.round_timeout,
                # ClientApps check their classes against the run's before touching the weights.
                train_config=ConfigRecord({"round-offset": start_round - 1, "class-names": fed.class_names}),
                evaluate_config=ConfigRecord({"class-names": fed.class_names}),
                evaluate_fn=after_round,
            )
    finally:
        if tracker is not None:
            tracker.close()
    if not history:
        raise LeukError("no round completed")
    if statistics_round(train_grid, fed, model, sites, {"round-offset": fed.rounds, "class-names": fed.class_names},
                        log) and score:
        final_metrics = score(model)   # the exported model, with its new statistics
    if not final_metrics:
        final_metrics = history[-1]["server_evaluate"] or history[-1]["evaluate"]
    export_final(state_dir, model, class_names, fed, final_metrics, history)
    write_status(state_dir, phase="finished", rounds_completed=len(history))
    log(f"finished {len(history)} rounds; model exported to {state_dir}")
