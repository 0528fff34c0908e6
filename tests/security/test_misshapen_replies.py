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


def renamed_metrics(content: RecordDict) -> RecordDict:
    """Flower reads every reply's metrics under the first reply's record name: another name ended the run."""
    return RecordDict({("m" if name == "metrics" else name): record for name, record in content.items()})


def second_array_record(content: RecordDict) -> RecordDict:
    return RecordDict({**dict(content.items()), "extra": ArrayRecord({"x": Array(np.zeros(3, np.float32))})})


def with_metrics(extra: dict) -> object:
    def reshape(content: RecordDict) -> RecordDict:
        [(name, record)] = content.metric_records.items()
        return RecordDict({**dict(content.items()), name: MetricRecord({**dict(record), **extra})})
    return reshape


LIES = {
    "no count": (without_count, "no num-examples in the metrics"),
    "two metric records": (two_metric_records, "expected one metric record named 'metrics', got 2"),
    "a renamed metric record": (renamed_metrics, "expected one metric record named 'metrics', got 1"),
    "a second array record": (second_array_record, "expected one array record 'arrays'"),
    "a list for a number": (with_metrics({"train_seconds": [1.0, 2.0]}), "metric train_seconds is not a single number"),
    "a partial DP report": (with_metrics({"dp_epsilon": 0.1}), "an incomplete DP report (dp_epsilon without"),
    "a NaN noise multiplier": (with_metrics({"dp_epsilon": 0.1, "dp_delta": 1e-5, "dp_noise_multiplier": float("nan")}),
                               "dp_noise_multiplier nan is not a finite non-negative number"),
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


def test_names_a_site_chooses_are_kept_short_in_the_log() -> None:
    def long_record_name(content: RecordDict) -> RecordDict:
        return RecordDict({**dict(content.items()), "x" * 100_000: ArrayRecord({"x": Array(np.zeros(1, np.float32))})})

    outcome = one_round(InProcessGrid({11: Hospital(seed=1), 22: Hospital(seed=2, reshape=long_record_name)}),
                        strategy="fedavg", min_sites=2)
    [rejected] = outcome.strategy.log.rejected
    assert rejected["node"] == 22 and len(rejected["reason"]) <= 300


def test_a_site_error_is_kept_short_in_the_log() -> None:
    honest, failing = Hospital(seed=1), Hospital(seed=2, error="boom " * 200_000)
    outcome = one_round(InProcessGrid({11: honest, 22: failing}), strategy="fedavg", min_sites=2)
    [failure, _] = outcome.strategy.log.failures        # train and evaluate
    assert failure["node"] == 22 and failure["reason"].startswith("boom boom") and len(failure["reason"]) <= 300
    np.testing.assert_allclose(outcome.after["fc.bias"], honest.update(initial_arrays())["fc.bias"], rtol=1e-6)


def test_a_liar_cannot_discard_the_honest_sites_statistics_round() -> None:
    """The statistics round counted accepted replies as train replies minus rejections, which included
    evaluation rejections: one site rejected twice left the honest site's statistics unused."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.models import create_model
    from leukfed.server.registered_sites import RegisteredSites
    from leukfed.server.statistics_round import statistics_round

    model = create_model("tinycnn", 4, image_size=24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    honest, liar = Hospital(seed=1), Hospital(seed=2, reshape=without_count)
    printed: list[str] = []
    changed = statistics_round(InProcessGrid({11: honest, 22: liar}), FedConfig(bn_statistics_round=2, min_sites=2,
                               round_timeout=30), model, RegisteredSites(), {}, printed.append)
    assert changed and "(1 accepted replies" in printed[-1]
    moved = [k for k, v in model.state_dict().items() if not v.equal(before[k])]
    assert moved and all("running_" in k or "num_batches" in k for k in moved)   # statistics only
