"""Checks on one site's reply: arrays that fit the model, a bounded example count and update norm."""
from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from leukfed.common.flower.wire import BF16_SUFFIX, widen_bf16_bits


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


def frozen_problem(record: ArrayRecord, frozen: dict[str, np.ndarray]) -> str | None:
    """An update must carry the server's own values of the arrays it fixed (the patient head's center and
    scale), to the precision the site sent them in: a site must not move what the others are sent next."""
    for key, expected in frozen.items():
        name = key + BF16_SUFFIX if key + BF16_SUFFIX in record else key
        if name not in record:
            return f"array {key} is missing"
        try:
            raw = record[name].numpy()
        except Exception:  # noqa: BLE001 - untrusted bytes
            return f"array {key} is not a readable array"
        if name.endswith(BF16_SUFFIX) and raw.dtype == np.int16:
            value, sent = widen_bf16_bits(raw), torch.from_numpy(expected).to(torch.bfloat16).float().numpy()
        elif raw.dtype in (np.float16, np.float32):
            value, sent = raw.astype(np.float32), expected.astype(raw.dtype).astype(np.float32)
        else:
            return f"array {key} has dtype {raw.dtype}, expected float32"
        if value.shape != expected.shape or not np.array_equal(value, sent):
            return f"array {key} differs from the value the server sent (it is fixed for the run)"
    return None


def update_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (update - global) over the float arrays."""
    total = 0.0
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            delta = value.ravel() - reference[key].ravel()
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def norm_problem(norm: float, max_norm: float) -> str | None:
    """An update farther than `max_norm` from the global model (L2; 0: no bound) is refused, however
    few sites replied: FedAvg would otherwise take it almost whole."""
    if max_norm > 0 and not norm <= max_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_norm:g}"
    return None


MAX_METRICS = 64            # a site's reply carries ~20 metrics; more is noise written into every checkpoint
MAX_METRIC_NAME = 64
MAX_REASON_CHARS = 300      # a failed task's reason, as kept in the history
DP_REPORT = ("dp_epsilon", "dp_noise_multiplier", "dp_delta")


def shape_problem(content: RecordDict, weighted_by_key: str, *, train: bool) -> str | None:
    """Why a reply is not shaped as Flower's strategies read replies, or None: one metric record named
    `metrics` of at most MAX_METRICS single numbers with the weight among them, an epsilon only with its
    noise multiplier and delta (finite, non-negative), and for training one array record named `arrays`.
    A reply Flower's own checks would refuse would otherwise raise InconsistentMessageReplies and end the
    run for every site; one site must not be able to."""
    if train and not content.array_records:
        return "no arrays in reply"
    if train and list(content.array_records) != ["arrays"]:
        return f"expected one array record 'arrays', got {sorted(content.array_records)[:3]}"
    if list(content.metric_records) != ["metrics"]:   # Flower reads the others' records by the first reply's name
        return f"expected one metric record named 'metrics', got {len(content.metric_records)} metric record(s)"
    metrics = content.metric_records["metrics"]
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics (at most {MAX_METRICS})"
    for key, value in metrics.items():
        if len(key) > MAX_METRIC_NAME:
            return f"a metric name of {len(key)} characters (at most {MAX_METRIC_NAME})"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key} is not a single number"
    if weighted_by_key not in metrics:
        return f"no {weighted_by_key} in the metrics"
    if DP_REPORT[0] in metrics and (missing := [key for key in DP_REPORT if key not in metrics]):
        return f"an incomplete DP report (dp_epsilon without {', '.join(missing)})"
    for key in DP_REPORT:
        if key in metrics and not 0 <= metrics[key] < math.inf:   # NaN too: it would pass any comparison
            return f"{key} {metrics[key]!r} is not a finite non-negative number"
    return None


def short_reason(reason: str | None) -> str:
    """A site's error reason as kept in the history: at most MAX_REASON_CHARS characters."""
    text = (reason or "error").strip()
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


def count_problem(metrics: dict, key: str, max_count: int) -> str | None:
    """FedAvg weighs each update by the count the site reports: it must be a whole number in
    [1, max_count] (0: no upper bound). An absent count is `shape_problem`'s to refuse."""
    if key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{key} {value!r} is not a whole number"
    if value < 1:
        return f"{key} {value} is not positive"
    if max_count > 0 and value > max_count:
        return f"{key} {value} exceeds the bound {max_count} per site"
    return None


def reply_weight(msg: Message, key: str) -> float:
    """The reply's `num-examples` as FedAvg reads it; 0 when unusable (FedAvg's check then refuses it)."""
    record = next(iter(msg.content.metric_records.values()), None)
    value = record.get(key) if record is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def split_evaluation(metrics: dict) -> tuple[dict, dict]:
    """A train reply's own metrics, and the scores of the previous global model it carries (`eval_*`,
    counted by `eval_num_examples`, which becomes their `num-examples`)."""
    train = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
    scores = {k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_num_examples"}
    if "eval_num_examples" in metrics:
        scores["num-examples"] = metrics["eval_num_examples"]
    return train, scores


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


def check_consistency(messages: list[Message], weighted_by_key: str) -> None:
    """FedAvg's reply checks (it raises InconsistentMessageReplies). The ArrayRecord keys were checked
    against the global model already (with the bf16 marker removed), so only their number is left."""
    if any(len(m.content.array_records) != 1 for m in messages):
        raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies. Skipping aggregation.")
    validate_message_reply_consistency([m.content for m in messages], weighted_by_key, check_arrayrecord=False)
