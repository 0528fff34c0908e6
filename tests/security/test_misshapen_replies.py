"""A site cannot end the run for everyone with a reply Flower's strategies cannot read: a missing example
count, a second metric or array record, a list where a number goes, a partial DP report, a flood of metrics.
Each such reply is rejected with its reason; the round completes with the honest sites' updates."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from guard_harness import Hospital, InProcessGrid, initial_arrays, one_round, task_identity  # noqa: F401 (autouse)

STRATEGIES = ["fedavg", "fedmedian"]   # the fused pass and the materialised one


def without_count(content: RecordDict) -> RecordDict:
    return RecordDict({"arrays": content["arrays"], "metrics": MetricRecord({"train_loss": 0.5})}) \
        if "arrays" in content else RecordDict({"metrics": MetricRecord({"eval_accuracy": 0.9})})


def two_metric_records(content: RecordDict) -> RecordDict:
    return RecordDict({**dict(content.items()), "more": MetricRecord({"num-examples": 50})})


def second_array_record(content: RecordDict) -> RecordDict:
    return RecordDict({**dict(content.items()), "extra": ArrayRecord({"x": Array(np.zeros(3, np.float32))})})


def with_metrics(extra: dict) -> object:
    def reshape(content: RecordDict) -> RecordDict:
        [(name, record)] = content.metric_records.items()
        return RecordDict({**dict(content.items()), name: MetricRecord({**dict(record), **extra})})
    return reshape


LIES = {
    "no count": (without_count, "no num-examples in the metrics"),
    "two metric records": (two_metric_records, "expected one metric record, got 2"),
    "a second array record": (second_array_record, "expected one array record 'arrays'"),
    "a list for a number": (with_metrics({"train_seconds": [1.0, 2.0]}), "metric train_seconds is not a single number"),
    "a partial DP report": (with_metrics({"dp_epsilon": 0.1}), "an incomplete DP report (dp_epsilon without"),
    "a flood of metrics": (with_metrics({f"m{i}": 1.0 for i in range(500)}), "metrics (at most 64)"),
    "a long metric name": (with_metrics({"x" * 5000: 1.0}), "a metric name of 5000 characters"),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_a_misshapen_reply_is_rejected_and_the_round_completes(strategy: str, lie: str) -> None:
    reshape, reason = LIES[lie]
    honest, liar = Hospital(seed=1), Hospital(seed=2, reshape=reshape)
    outcome = one_round(InProcessGrid({11: honest, 22: liar}), strategy=strategy, min_sites=2)
    log = outcome.strategy.log
    rejected = [r for r in log.rejected if r["node"] == 22]
    assert rejected and reason in rejected[0]["reason"], log.rejected
    assert all(r["node"] == 22 for r in log.rejected) and log.train[22] == {}   # it replied; nothing of it is kept
    np.testing.assert_allclose(outcome.after["fc.bias"], honest.update(initial_arrays())["fc.bias"], rtol=1e-6)
    if lie != "a second array record":   # its evaluation reply is misshapen too: the scores are the honest site's
        assert outcome.evaluate["eval_accuracy"] == pytest.approx(0.1)


def test_a_site_error_is_kept_short_in_the_log() -> None:
    honest, failing = Hospital(seed=1), Hospital(seed=2, error="boom " * 200_000)
    outcome = one_round(InProcessGrid({11: honest, 22: failing}), strategy="fedavg", min_sites=2)
    [failure, _] = outcome.strategy.log.failures        # train and evaluate
    assert failure["node"] == 22 and failure["reason"].startswith("boom boom") and len(failure["reason"]) <= 300
    np.testing.assert_allclose(outcome.after["fc.bias"], honest.update(initial_arrays())["fc.bias"], rtol=1e-6)
