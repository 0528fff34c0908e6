"""Issue 13.8: a site cannot overweight its update. An example count that is not a whole number in
[1, max-examples-per-site], or an update farther than max-update-norm from the global model, is
rejected (never clamped), however few sites reply; the global model is then the honest sites' alone."""
from __future__ import annotations

import numpy as np
import pytest
from guard_harness import Hospital, InProcessGrid, initial_arrays, one_round, task_identity  # noqa: F401 (autouse)
from poisoned_nodes import Federation

# FedAvg runs the fused pass, FedMedian the materialised one: both must refuse.
STRATEGIES = ["fedavg", "fedmedian"]
BAD_COUNTS = [10**9, 1e9, 0, -30, 12.5]


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("examples", BAD_COUNTS, ids=["1e9", "1e9-float", "zero", "minus30", "fraction"])
def test_an_out_of_range_example_count_is_rejected_and_the_honest_update_is_the_model(strategy, examples) -> None:
    honest, cheat = Hospital(seed=1), Hospital(seed=2, examples=examples)
    outcome = one_round(InProcessGrid({11: honest, 22: cheat}), strategy=strategy, min_sites=2)
    rejected = {r["node"]: r["reason"] for r in outcome.strategy.log.rejected}
    assert set(rejected) == {22}
    assert "num-examples" in rejected[22]
    assert_same(outcome.after, honest.update(initial_arrays()))
    # Its evaluation reply carries the same count: refused too, so the scores are the honest site's.
    assert outcome.evaluate["eval_accuracy"] == pytest.approx(0.1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_lone_site_with_a_huge_count_does_not_move_the_model(strategy) -> None:
    outcome = one_round(InProcessGrid({5: Hospital(seed=3, examples=10**9)}), strategy=strategy, min_sites=1)
    assert "exceeds the bound 1000000" in outcome.strategy.log.rejected[0]["reason"]
    assert_same(outcome.after, outcome.before)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sites", [1, 2])
def test_an_update_over_the_norm_bound_is_rejected_with_one_or_two_sites(strategy, sites) -> None:
    hospitals = {7: Hospital(seed=4, scale=1e6)}          # norm ~ 1e6 * 0.05 * sqrt(221) >> 1e4
    if sites == 2:
        hospitals[8] = Hospital(seed=5)
    outcome = one_round(InProcessGrid(hospitals), strategy=strategy, min_sites=sites)
    log = outcome.strategy.log
    assert [r["node"] for r in log.rejected] == [7] and "exceeds the bound 10000" in log.rejected[0]["reason"]
    assert log.train[7]["update_norm"] > 1e4
    want = hospitals[8].update(initial_arrays()) if sites == 2 else outcome.before
    assert_same(outcome.after, want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_bounds_let_honest_updates_through_and_can_be_lifted(strategy) -> None:
    hospitals = {1: Hospital(seed=6, examples=20), 2: Hospital(seed=7, examples=1_000_000)}
    outcome = one_round(InProcessGrid(hospitals), strategy=strategy, min_sites=2)
    assert not outcome.strategy.log.rejected and sorted(outcome.strategy.log.train) == [1, 2]
    lifted = one_round(InProcessGrid({3: Hospital(seed=8, scale=1e6, examples=10**9)}), strategy=strategy,
                       min_sites=1, max_update_norm=0.0, max_examples_per_site=0)
    assert not lifted.strategy.log.rejected
    assert_same(lifted.after, Hospital(seed=8, scale=1e6).update(initial_arrays()))


@pytest.mark.slow
def test_a_registered_site_claiming_a_billion_examples_over_the_network_is_rejected(tmp_path) -> None:
    """Site b holds a registered key but runs a lying ClientApp (stock flower-supernode): its honest-looking
    update claims 1e9 examples. It is rejected every round; the global model is site a's alone."""
    federation = Federation(tmp_path, ["a", "b"])
    try:
        server = federation.server("--batch-size", "16", "--rounds", "1", "--min-sites", "2",
                                   "--round-timeout", "60")
        federation.wait_submitted()
        sites = federation.registered_sites()
        federation.client("a", tmp_path / "data-a")
        liar = federation.stock_node("b", federation.certs / "sites" / "b", scale=1.0, examples=10**9)
        assert server.wait(timeout=600) == 0, federation.log("server.log")
        [row] = federation.history()
        assert (tmp_path / "b-was-asked").exists() and liar.poll() is None     # it took part, and lied
        a, b = "a", "b"   # history names sites; the node id is a detail
        assert row["sites"][a]["node"] == sites["a"]
        assert [(r["node"], r["site"]) for r in row["rejected"]] == [(sites["b"], "b"), (sites["b"], "b")]
        assert "num-examples 1000000000 exceeds the bound 1000000" in row["rejected"][0]["reason"]
        assert row["rejected"][1]["reason"].startswith("evaluation reply: num-examples 1000000000")
        assert row["train"]["train_loss"] == pytest.approx(row["sites"][a]["train"]["train_loss"])
        assert row["evaluate"]["eval_accuracy"] == pytest.approx(row["sites"][a]["evaluate"]["eval_accuracy"])
        assert b not in row["sites"] or not row["sites"][b]["evaluate"]
    finally:
        federation.close()
