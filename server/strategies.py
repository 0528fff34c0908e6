"""Flower strategies by name, with a guard that checks, widens and records every reply."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
                                     Krum)

from leukfed.client.records import decode_arrays
from leukfed.common.fedconfig import FedConfig


@dataclass
class RoundLog:
    """What the server saw in one round, filled in by the guard, read by the evaluate_fn hook."""

    started: float = 0.0
    train_sent_at: float = 0.0
    aggregation_seconds: float = 0.0
    train_phase_seconds: float = 0.0
    evaluate_phase_started: float = 0.0
    evaluate_phase_seconds: float = 0.0
    sites_sampled: list[int] = field(default_factory=list)
    train: dict[int, dict] = field(default_factory=dict)       # node id -> metrics
    evaluate: dict[int, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    aggregated_train: dict = field(default_factory=dict)
    aggregated_evaluate: dict = field(default_factory=dict)


def reply_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    """Why an update must not reach the global model (wrong keys, shapes, dtypes, NaN/Inf), or None."""
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return f"keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in arrays.items():
        if value.shape != reference[key].shape:
            return f"array {key} has shape {value.shape}, expected {reference[key].shape}"
        if value.dtype.kind != reference[key].dtype.kind:
            return f"array {key} has dtype {value.dtype}, expected {reference[key].dtype}"
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"array {key} contains NaN or Inf"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over the float arrays."""
    total = 0.0
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            delta = value.ravel() - reference[key].ravel()
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def keep_common_metrics(messages: list[Message]) -> None:
    """Flower aggregates only metric records with identical keys; a site whose small-sample metrics were
    suppressed sends fewer keys, so every reply keeps just the keys all replies share."""
    records = [(m, key, rec) for m in messages for key, rec in m.content.metric_records.items()]
    if not records:
        return
    common = set.intersection(*(set(rec.keys()) for _, _, rec in records))
    for message, key, rec in records:
        if set(rec.keys()) != common:
            message.content[key] = MetricRecord({k: rec[k] for k in rec.keys() if k in common})


class ReplyGuard:
    """Mixin over a Flower strategy: validate and widen replies, record per-site facts and timings."""

    norm_outlier_factor: float = 10.0

    def setup_guard(self) -> None:
        self.log = RoundLog()
        self.reference: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.log = RoundLog()
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.log.started = time.perf_counter()  # after sampling: waiting for sites to connect is not round time
        self.log.sites_sampled = [m.metadata.dst_node_id for m in messages]
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        self.log.train_sent_at = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.log.failures.append({"node": node, "phase": "train", "reason": msg.error.reason})
                continue
            record = msg.content.array_records.get("arrays")
            self.log.bytes_received += record.count_bytes() if record is not None else 0
            arrays = decode_arrays(record) if record is not None else {}  # decoded once, half precision widened
            problem = "no arrays in reply" if record is None else reply_problem(arrays, self.reference)
            metrics = dict(next(iter(msg.content.metric_records.values()), {}))
            if problem is None:
                metrics["update_norm"] = update_norm(arrays, self.reference)
            self.log.train[node] = metrics
            if problem:
                self.log.rejected.append({"node": node, "reason": problem})
                continue
            if set(arrays) != set(record.keys()) or any(record[k].dtype == "float16" for k in record.keys()):
                msg.content["arrays"] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
            accepted.append(msg)
        accepted = self._reject_norm_outliers(accepted)
        keep_common_metrics(accepted)
        start = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, accepted) if accepted else (None, None)
        if arrays is not None:
            arrays = self._restore_dtypes(arrays)
        self.log.aggregation_seconds = time.perf_counter() - start
        self.log.train_phase_seconds = time.perf_counter() - self.log.started
        self.log.aggregated_train = dict(metrics) if metrics else {}
        return arrays, metrics

    def _restore_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Weighted averaging promotes integer buffers (BatchNorm counters) to float: cast them back."""
        restored = ArrayRecord()
        for key, array in arrays.items():
            value, dtype = array.numpy(), self.reference[key].dtype
            if value.dtype != dtype:
                value = (np.rint(value) if dtype.kind in "iu" else value).astype(dtype)
            restored[key] = Array(np.asarray(value, order="C"))
        return restored

    def _reject_norm_outliers(self, accepted: list[Message]) -> list[Message]:
        """Drop updates whose norm is far outside the cohort's (median-relative), when >= 3 replied."""
        if len(accepted) < 3:
            return accepted
        norms = {m.metadata.src_node_id: self.log.train[m.metadata.src_node_id]["update_norm"] for m in accepted}
        median = float(np.median(list(norms.values())))
        keep = []
        for m in accepted:
            norm = norms[m.metadata.src_node_id]
            if median > 0 and norm > self.norm_outlier_factor * median:
                self.log.rejected.append({"node": m.metadata.src_node_id,
                                          "reason": f"update norm {norm:.3g} > {self.norm_outlier_factor:g}x cohort median {median:.3g}"})
            else:
                keep.append(m)
        return keep

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.log.evaluate_phase_started = time.perf_counter()
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.log.failures.append({"node": node, "phase": "evaluate", "reason": msg.error.reason})
                continue
            self.log.evaluate[node] = dict(next(iter(msg.content.metric_records.values()), {}))
            valid.append(msg)
        keep_common_metrics(valid)
        metrics = super().aggregate_evaluate(server_round, valid) if valid else None
        self.log.evaluate_phase_seconds = time.perf_counter() - self.log.evaluate_phase_started
        self.log.aggregated_evaluate = dict(metrics) if metrics else {}
        return metrics


BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
         "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}

# FedAdam/FedYogi moments: the strategy state a checkpoint must carry.
STATE_ATTRIBUTES = ("m_t", "v_t")


def make_strategy(fed: FedConfig):
    """The named Flower strategy wrapped in the ReplyGuard."""
    base = BASES[fed.strategy]
    guarded = type(f"Guarded{base.__name__}", (ReplyGuard, base), {})
    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=1.0, min_train_nodes=fed.min_sites,
                  min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites)
    extra = {"fedprox": {"proximal_mu": fed.proximal_mu}, "fedadam": {"eta": fed.server_lr},
             "fedyogi": {"eta": fed.server_lr}, "fedtrimmedavg": {"beta": fed.trim_beta},
             "krum": {"num_malicious_nodes": fed.krum_malicious}}.get(fed.strategy, {})
    strategy = guarded(**common, **extra)
    strategy.setup_guard()
    return strategy


def strategy_state(strategy) -> dict:
    return {k: getattr(strategy, k) for k in STATE_ATTRIBUTES if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy, key, value)
