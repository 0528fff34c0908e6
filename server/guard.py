"""A Flower strategy wrapped by composition: registered sites only, every reply checked, a round log."""
from __future__ import annotations

import math
import time
from logging import INFO
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from leukfed.common.dp_settings import noise_problem
from leukfed.common.flower.wire import decode_arrays
from leukfed.server.fused_mean import FusedMean, FusedUpdate
from leukfed.server.registered_sites import RegisteredSites
from leukfed.server.reply_checks import (check_consistency, count_problem, frozen_problem, keep_common_metrics,
                                         norm_problem, reply_problem, reply_weight, shape_problem, short_reason,
                                         split_evaluation, update_norm)
from leukfed.server.round_log import RoundLog


@dataclass(frozen=True)
class GuardSettings:
    """The coordinator's policy for replies, and when the sites score the global model."""

    min_noise_multiplier: float = 0.0   # refuse updates that report less DP noise
    max_examples: int = 0               # refuse example counts above this (0: no upper bound)
    max_update_norm: float = 0.0        # refuse updates farther from the global model (L2; 0: no bound)
    evaluate_every: int = 1
    rounds: int = 0
    evaluate_with_train: bool = False   # round r's model is scored in round r+1's train task


def _plain_weighted_mean(strategy: Strategy) -> bool:
    """True when the (wrapped) strategy aggregates with FedAvg's own aggregate_train (FedAvg, FedProx):
    a weighted mean of the arrays, which FusedMean computes without materialising them."""
    inner = strategy.strategy if isinstance(strategy, GuardedStrategy) else strategy
    return isinstance(inner, FedAvg) and type(inner).aggregate_train is FedAvg.aggregate_train


class GuardedStrategy(Strategy):
    """Wraps any Flower strategy (as Flower's DP wrappers do): messages go to registered sites only,
    replies from other nodes are ignored, every update is checked (keys, shapes, dtypes, NaN/Inf,
    example count, norm bound, DP noise, norm outliers) before the wrapped strategy aggregates it, and
    per-site metrics, bytes and timings go to `self.log`. `start` is Flower's own."""

    norm_outlier_factor: float = 10.0
    statistics: frozenset[str] = frozenset()   # arrays that take the accepted replies' weighted mean, whatever
                                               # the wrapped strategy makes of them (see strategies.SERVER_OPTIMIZERS)
    fused_mean: bool = True  # FedAvg/FedProx: checks, norms and the weighted mean in one pass (FusedMean)

    def __init__(self, strategy: Strategy, settings: GuardSettings = GuardSettings(),
                 sites: RegisteredSites | None = None) -> None:
        super().__init__()
        self.strategy = strategy
        self.settings = settings
        self.sites = sites if sites is not None else RegisteredSites()   # names the sites in logs and history
        self.log = RoundLog()
        self.reference: dict[str, np.ndarray] = {}
        self.round_offset = 0  # a resumed run's strategy counts its rounds from 1 again
        self.deferred_round = 0
        self._fused: FusedMean | None = None
        self.frozen: dict[str, np.ndarray] = {}   # arrays fixed for the run: sent as they are, replies must keep them

    @property
    def weighted_by_key(self) -> str:
        return getattr(self.strategy, "weighted_by_key", "num-examples")

    def summary(self) -> None:
        log(INFO, "\t├──> Reply guard: %s", self.settings)
        log(INFO, "\t├──> Sites: %s", ", ".join(map(self.sites.label, self.sites.names)) or "any node")
        self.strategy.summary()

    def evaluates_in(self, server_round: int) -> bool:
        """Sites score the global model every `evaluate_every` rounds and always after the last one."""
        absolute, every = server_round + self.round_offset, self.settings.evaluate_every
        return absolute >= self.settings.rounds or (every > 0 and absolute % every == 0)

    # -- who is asked, whose reply counts ------------------------------------------------------------
    def _to_registered(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if self.sites.allows(m.metadata.dst_node_id)]

    def _from_registered(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """Replies of registered sites; any other is logged and never counts."""
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if self.sites.allows(node):
                self.sites.note_reply(msg)
                kept.append(msg)
            else:
                self.log.ignored.append({"site": self.sites.site_name(node), "node": node, "phase": phase,
                                         "reason": f"ignored reply from unregistered node {node}"})
        return kept

    def _entry(self, node: int, **fields) -> dict:
        """A failure or rejection for the log: the site's name (`node-<id>` where none is known), its node, and
        the reason kept short (a site chooses the names it contains)."""
        if "reason" in fields:
            fields["reason"] = short_reason(fields["reason"])
        return {"site": self.sites.site_name(node), "node": node, **fields}

    # -- training ------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.log = RoundLog()
        if self.deferred_round:
            config = ConfigRecord({**dict(config), "evaluate-first": True})
            self.log.evaluated_round, self.deferred_round = self.deferred_round, 0
        if self.frozen:
            arrays = ArrayRecord({k: Array(self.frozen[k]) if k in self.frozen else v for k, v in arrays.items()})
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        messages = self._to_registered(self.strategy.configure_train(server_round, arrays, config,
                                                                      self.sites.grid(grid)))
        self.log.started = time.perf_counter()  # after sampling: waiting for sites to connect is not round time
        self.log.sites_sampled = [m.metadata.dst_node_id for m in messages]
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = self._from_registered(replies, "train")
        if self.fused_mean and _plain_weighted_mean(self) and FusedMean.supports(self.reference):
            result = self._aggregate_train_fused(replies)
        else:
            result = self._aggregate_train_materialised(server_round, replies)
        self._aggregate_evaluation_in_train()
        return result

    def _aggregate_evaluation_in_train(self) -> None:
        """The previous model's scores that came with the train replies, aggregated as Flower's
        aggregate_evaluate would (weighted by the sites' evaluation counts)."""
        scores = [m for m in self.log.evaluate_in_train.values() if m.get("num-examples")]
        if not scores:
            return
        common = set.intersection(*(set(m) for m in scores))
        contents = [RecordDict({"metrics": MetricRecord({k: m[k] for k in common})}) for m in scores]
        self.log.aggregated_evaluate_in_train = dict(self.strategy.evaluate_metrics_aggr_fn(contents,
                                                                                            self.weighted_by_key))

    def _open_train_reply(self, msg: Message) -> tuple[int, ArrayRecord | None, dict, str | None] | None:
        """Log a failed reply (None) or count its bytes; return (node, arrays record, metrics, problem: a
        misshapen reply (no record, no metrics) or its count). Scores of the previous model come off the
        train metrics (FedAvg must not average them)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            self.log.failures.append(self._entry(node, phase="train", reason=msg.error.reason))
            return None
        self.log.bytes_received += sum(r.count_bytes() for r in msg.content.array_records.values())
        if (shape := shape_problem(msg.content, self.weighted_by_key, train=True)) is not None:
            return node, None, {}, shape      # none of its metrics is kept: they are what is wrong
        record = msg.content.array_records["arrays"]
        name, metric_record = next(iter(msg.content.metric_records.items()), (None, None))
        metrics, scores = split_evaluation(dict(metric_record or {}))
        if scores:
            if count_problem(scores, "num-examples", self.settings.max_examples) is None:
                self.log.evaluate_in_train[node] = scores
            msg.content[name] = MetricRecord(metrics)
        problem = count_problem(metrics, self.weighted_by_key, self.settings.max_examples)
        if problem is None and self.frozen:
            problem = frozen_problem(record, self.frozen)
        return node, record, metrics, problem

    def _aggregate_train_fused(self, replies: list[Message]):
        """FedAvg's weighted mean of the replies that pass the guard, in one pass over their bytes.

        The same checks, norms, rejections, log and result as `_aggregate_train_materialised` followed
        by FedAvg.aggregate_train (to float32 rounding), without materialising any update."""
        start = time.perf_counter()
        if self._fused is None:
            self._fused = FusedMean()
        fused = self._fused
        fused.prepare(self.reference)
        seen: list[FusedUpdate] = []
        for msg in replies:
            if (opened := self._open_train_reply(msg)) is None:
                continue
            node, record, metrics, problem = opened
            self.log.train[node] = metrics
            update = FusedUpdate(msg, node, reply_weight(msg, self.weighted_by_key))
            update.problem = problem or fused.read(update, record)
            if update.problem is None:
                noise = noise_problem(metrics, self.settings.min_noise_multiplier)
                if noise is not None:  # as before: NaN/Inf is named first, which needs the data
                    update.problem = update.nonfinite_problem(self.reference) or noise
            seen.append(update)
        updates = [u for u in seen if u.problem is None]
        exact = fused.first_pass(updates) if updates else True
        for update in updates:
            if update.problem is None:
                norm = math.sqrt(update.sq)
                self.log.train[update.node]["update_norm"] = norm
                update.problem = norm_problem(norm, self.settings.max_update_norm)
        self.log.rejected.extend(self._entry(u.node, reason=u.problem) for u in seen if u.problem)
        kept = self._reject_norm_outliers([u.msg for u in updates if u.problem is None])
        keep_common_metrics(kept)
        self.log.train_accepted = len(kept)
        arrays = metrics = None
        if kept:
            self.strategy._check_and_log_replies(kept, is_train=True, validate=False)  # Flower's log line
            check_consistency(kept, self.weighted_by_key)                              # and its checks
            ids = {id(m) for m in kept}
            final = [u for u in updates if id(u.msg) in ids]
            if not exact or len(final) != len(updates):  # a rejection after the first pass: sum again
                fused.weighted_pass(final)
            arrays = fused.result(final)
            metrics = self.strategy.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        else:
            fused.release()
        self.log.aggregation_seconds = time.perf_counter() - start  # checks, norms and mean: one pass
        self.log.train_phase_seconds = time.perf_counter() - self.log.started
        self.log.aggregated_train = dict(metrics) if metrics else {}
        return arrays, metrics

    def _aggregate_train_materialised(self, server_round: int, replies: list[Message]):
        """Robust and adaptive strategies (median, trimmed mean, Krum, FedAdam, FedYogi) aggregate
        materialised arrays: each reply is decoded (and half precision widened) once."""
        accepted = []
        for msg in replies:
            if (opened := self._open_train_reply(msg)) is None:
                continue
            node, record, metrics, problem = opened
            arrays = decode_arrays(record) if problem is None else {}
            problem = problem or reply_problem(arrays, self.reference) \
                or noise_problem(metrics, self.settings.min_noise_multiplier)
            if problem is None:
                metrics["update_norm"] = update_norm(arrays, self.reference)
                problem = norm_problem(metrics["update_norm"], self.settings.max_update_norm)
            self.log.train[node] = metrics
            if problem:
                self.log.rejected.append(self._entry(node, reason=problem))
                continue
            # In the global model's order: Flower's FedAvgM pairs the average with the model by position, so a
            # reply listing its arrays in another order would swap arrays of the same shape.
            if list(record.keys()) != list(self.reference) or any(record[k].dtype == "float16" for k in record.keys()):
                msg.content["arrays"] = ArrayRecord({k: Array(np.asarray(arrays[k], order="C")) for k in self.reference})
            accepted.append(msg)
        accepted = self._reject_norm_outliers(accepted)
        keep_common_metrics(accepted)
        self.log.train_accepted = len(accepted)
        start = time.perf_counter()
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted) if accepted else (None, None)
        if arrays is not None:
            arrays = self._restore_dtypes(self._average_statistics(arrays, accepted))
        self.log.aggregation_seconds = time.perf_counter() - start
        self.log.train_phase_seconds = time.perf_counter() - self.log.started
        self.log.aggregated_train = dict(metrics) if metrics else {}
        return arrays, metrics

    def _average_statistics(self, arrays: ArrayRecord, accepted: list[Message]) -> ArrayRecord:
        """`self.statistics` as the accepted replies' weighted mean (float64 sums)."""
        if not self.statistics:
            return arrays
        weights = [reply_weight(m, self.weighted_by_key) for m in accepted]
        averaged = ArrayRecord()
        for key, array in arrays.items():
            if key in self.statistics:
                total = sum(w * m.content["arrays"][key].numpy().astype(np.float64) for w, m in zip(weights, accepted))
                averaged[key] = Array(np.asarray(total / sum(weights), order="C"))
            else:
                averaged[key] = array
        return averaged

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
            node = m.metadata.src_node_id
            if median > 0 and norms[node] > self.norm_outlier_factor * median:
                self.log.rejected.append(self._entry(node, reason=f"update norm {norms[node]:.3g} > "
                                                     f"{self.norm_outlier_factor:g}x cohort median {median:.3g}"))
            else:
                keep.append(m)
        return keep

    # -- evaluation ----------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.log.evaluate_phase_started = time.perf_counter()
        if not self.evaluates_in(server_round):
            return []
        if self.settings.evaluate_with_train and server_round + self.round_offset < self.settings.rounds:
            self.deferred_round = server_round + self.round_offset   # scored in the next train task
            return []
        messages = self._to_registered(self.strategy.configure_evaluate(server_round, arrays, config,
                                                                        self.sites.grid(grid)))
        self.log.bytes_sent += sum(m.content["arrays"].count_bytes() for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = []
        for msg in self._from_registered(replies, "evaluate"):
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.log.failures.append(self._entry(node, phase="evaluate", reason=msg.error.reason))
                continue
            problem = shape_problem(msg.content, self.weighted_by_key, train=False)
            metrics = dict(next(iter(msg.content.metric_records.values()), {}))
            problem = problem or count_problem(metrics, self.weighted_by_key, self.settings.max_examples)
            if problem:
                self.log.rejected.append(self._entry(node, reason=f"evaluation reply: {problem}"))
                continue
            self.log.evaluate[node] = metrics
            valid.append(msg)
        keep_common_metrics(valid)
        metrics = self.strategy.aggregate_evaluate(server_round, valid) if valid else None
        self.log.evaluate_phase_seconds = time.perf_counter() - self.log.evaluate_phase_started
        self.log.aggregated_evaluate = dict(metrics) if metrics else {}
        return metrics
