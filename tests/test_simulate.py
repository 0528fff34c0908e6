"""`leuk simulate` end to end on Flower's simulation engine: report, equal compute, determinism."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["--sites", "3", "--rounds", "2", "--model", "tinycnn", "--image-size", "24", "--batch-size", "16",
        "--lr", "0.003", "--seed", "3", "--bootstrap", "200"]


def simulate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    # the small study these tests were written for, not the embedded default's (1,600 images, case mix)
    result = subprocess.run([sys.executable, "-c", "from leukfed.cli import main; main()", "simulate",
                             "--out", str(out), "--synthetic-per-class", "60", "--partition", "iid",
                             "--local-epochs", "1", *ARGS, *extra],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sim") / "out"
    return out, simulate(out)


def test_report_and_outputs(first_run) -> None:
    out, result = first_run
    assert "| federated-fedavg |" in result.stdout and "| centralized |" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"federated-fedavg", "centralized", "local-site-0", "local-site-1", "local-site-2"}
    report = (out / "report.md").read_text()
    for text in ("Accuracy", "Specificity", "Δ accuracy vs centralized", "Cross-site", "site-2-test"):
        assert text in report
    for name in ("accuracy_per_round.png", "label_distribution.png", "confusion_centralized.png",
                 "partition.json", "split.json"):
        assert (out / name).stat().st_size > 0, name
    history = results["methods"]["federated-fedavg"]["history"]
    assert [row["round"] for row in history] == [1, 2]
    assert all(row["sites_replied"] == 3 and not row["rejected"] and not row["failures"] for row in history)
    # Round 1's model is scored by the sites in round 2's train task (no second download of the same
    # model); the last round's has an evaluation message of its own.
    assert history[0]["evaluated_in_round"] == 2 and "evaluated_in_round" not in history[1]
    assert all(isinstance(row["evaluate"].get("eval_accuracy"), float) for row in history)
    assert all(site["evaluate"] and site["train"] for row in history for site in row["sites"].values())
    assert not any(key.startswith("eval_") for key in history[1]["train"])
    assert history[1]["bytes_sent"] == pytest.approx(2 * history[0]["bytes_sent"], rel=0.01)
    for method in results["methods"].values():
        assert set(method["cross_site"]) == {"global-test", "site-0-test", "site-1-test", "site-2-test"}


def test_a_run_with_a_failed_virtual_site_is_stopped_and_not_kept_as_a_result(first_run, capsys) -> None:
    """Ray kills a virtual site that runs the machine out of memory; the round would go on with the others."""
    from leukfed.common.errors import LeukError
    from leukfed.server.server_app import print_round
    from leukfed.simulations.simulate import refuse_site_failures, stop_on_site_failure

    out, _ = first_run
    history = json.loads((out / "results.json").read_text())["methods"]["federated-fedavg"]["history"]
    refuse_site_failures("fedavg", history)     # whole rounds: nothing to refuse
    capsys.readouterr()
    print_round(history[1], 2)
    for line in capsys.readouterr().out.splitlines():      # the ServerApp's own round lines pass
        stop_on_site_failure("fedavg", line[line.index("[leukfed]") + 10:])
    history[1]["failures"] = [{"site": "site-1", "node": 7, "phase": "train",
                               "reason": "Traceback ...\n<class 'ray.exceptions.OutOfMemoryError'>: 1 worker killed"}]
    print_round(history[1], 2)
    failed_line = capsys.readouterr().out.splitlines()[-1]
    with pytest.raises(LeukError, match=r"fedavg: site site-1 \(node 7\) failed in train: "
                       r"<class 'ray.exceptions.OutOfMemoryError'>.*not kept.*--cpus-per-site 2 halves"):
        stop_on_site_failure("fedavg", failed_line[failed_line.index("[leukfed]") + 10:])   # as the engine streams it
    with pytest.raises(LeukError, match=r"fedavg: 1 site failure\(s\), the first in round 2 \(site-1, train\): "
                       r"<class 'ray.exceptions.OutOfMemoryError'>.*not kept.*--cpus-per-site 2"):
        refuse_site_failures("fedavg", history)
    history[1]["failures"], history[1]["sites_replied"] = [], 2          # a site that never replied
    with pytest.raises(LeukError, match=r"fedavg: round 2: 2 of 3 sampled sites replied; the run is not kept"):
        refuse_site_failures("fedavg", history)


def test_a_kept_run_with_a_missing_site_is_trained_again_not_reused(first_run, tmp_path: Path) -> None:
    import shutil

    from leukfed.simulations.simulate import _cached, _method_file

    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    record = json.loads(_method_file(out, "federated-fedavg").read_text())
    assert _cached(out, "federated-fedavg", record["config_digest"]) == record          # whole: reused
    record["history"][0]["sites_replied"] = 2
    _method_file(out, "federated-fedavg").write_text(json.dumps(record))
    assert _cached(out, "federated-fedavg", record["config_digest"]) is None            # short: trained again


def test_equal_compute_and_partition_accounting(first_run) -> None:
    out, _ = first_run
    results = json.loads((out / "results.json").read_text())
    partition = json.loads((out / "partition.json").read_text())
    split = json.loads((out / "split.json").read_text())
    site_train = [set(site["train"]) for site in partition["sites"]]
    assert sum(len(s) for s in site_train) == len(set().union(*site_train)) == len(split["train"])
    assert not set().union(*site_train) & set(split["test"])  # the global test set is never trained on
    methods = results["methods"]
    assert methods["federated-fedavg"]["sample_passes"] == methods["centralized"]["sample_passes"] == 2 * len(split["train"])
    assert methods["local-site-0"]["sample_passes"] == 2 * len(partition["sites"][0]["train"])


def test_same_seed_same_numbers_and_resume(first_run, tmp_path: Path) -> None:
    out, _ = first_run
    again = tmp_path / "again"
    simulate(again)
    first = json.loads((out / "results.json").read_text())["methods"]
    second = json.loads((again / "results.json").read_text())["methods"]
    for name in ("centralized", "local-site-1"):
        assert first[name]["final"]["confusion_matrix"] == second[name]["final"]["confusion_matrix"]
    assert first["federated-fedavg"]["final"]["accuracy"] == pytest.approx(second["federated-fedavg"]["final"]["accuracy"], abs=0.02)
    resumed = simulate(again)  # every method is already done under the same config: nothing retrains
    assert "training" not in resumed.stderr


def test_dp_sites_report_epsilon_per_round_and_half_precision_halves_the_bytes(tmp_path: Path) -> None:
    """DP-SGD in the federated round (not only centrally), evaluation every 2nd round, float16 transfer."""
    out = tmp_path / "dp"
    simulate(out, "--no-baselines", "--dp-noise-multiplier", "1.0", "--evaluate-every", "2",
             "--transfer-dtype", "float16", "--rounds", "3")
    history = json.loads((out / "results.json").read_text())["methods"]["federated-fedavg"]["history"]
    epsilons = [row["privacy"]["max_epsilon"] for row in history]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]  # the accountant composes over rounds
    assert all(row["privacy"]["min_noise_multiplier"] == 1.0 and row["privacy"]["sites"] == 3 for row in history)
    for row in history:
        for site in row["sites"].values():
            assert site["train"]["dp_epsilon"] <= row["privacy"]["max_epsilon"]
    assert [bool(row["evaluate"]) for row in history] == [False, True, True]  # round 2, and the last one
    ledgers = sorted((out / "federated-fedavg" / "privacy").glob("*.json"))
    assert len(ledgers) == 3  # each virtual site's spending outlives its process
    model_bytes = history[0]["bytes_sent"] / 3  # float32 global model to each of 3 sites
    assert history[0]["bytes_received"] / 3 == pytest.approx(model_bytes / 2, rel=0.1)


def test_single_seed_keeps_run_directories_predictions_and_bootstrap_intervals(first_run, tmp_path: Path) -> None:
    """Every method's final model is a run directory `leuk evaluate` scores exactly as the study did; the
    study's results carry bootstrap intervals and paired differences to centralized."""
    from leukfed.common.stats import headline_keys, load_predictions

    out, _ = first_run
    results = json.loads((out / "results.json").read_text())
    keys = set(headline_keys(results["data"]["class_names"]))
    for name, method in results["methods"].items():
        assert (out / "runs" / name / "model.safetensors").stat().st_size > 0
        assert set(method["final_ci"]) == keys
        for key, (lo, hi) in method["final_ci"].items():
            assert lo <= method["final"][key] <= hi, (name, key)
        pred = load_predictions(out / "predictions" / name / "global-test.npz")
        assert len(pred.labels) == results["data"]["split"]["test"]
        assert ("paired_vs_centralized" in method) == (name != "centralized")
    paired = results["methods"]["federated-fedavg"]["paired_vs_centralized"]["accuracy"]
    assert set(paired) == {"diff", "ci", "p"} and 0 < paired["p"] <= 1
    assert "Paired difference to centralized" in (out / "report.md").read_text()
    evaluated = tmp_path / "centralized.json"
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-c", "from leukfed.cli import main; main()", "evaluate", "--model",
                    str(out / "runs" / "centralized"), "--data", results["data"]["root"], "--split",
                    str(out / "split.json"), "--out", str(evaluated)], check=True, capture_output=True, env=env, timeout=300)
    assert json.loads(evaluated.read_text())["confusion_matrix"] == results["methods"]["centralized"]["final"]["confusion_matrix"]


def test_seeds_repeat_the_comparison_and_aggregate_with_paired_tests(tmp_path: Path) -> None:
    """`--seeds 0,1`: one full comparison per seed on the same test images, mean/sd/CI across seeds, the
    paired t-test to centralized; running it again retrains nothing."""
    out = tmp_path / "seeds"
    fast = ("--sites", "2", "--rounds", "1", "--seeds", "0,1")
    result = simulate(out, *fast)
    assert "| centralized |" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["config"]["seed"] for r in per_seed] == [0, 1]
    partitions = [json.loads((out / f"seed-{s}" / "partition.json").read_text()) for s in (0, 1)]
    assert partitions[0]["sites"][0]["train"] != partitions[1]["sites"][0]["train"]  # each seed its own partition
    tests = [json.loads((out / f"seed-{s}" / "split.json").read_text())["test"] for s in (0, 1)]
    assert tests[0] == tests[1]  # ... and the same test images
    for name, method in results["methods"].items():
        accuracy = method["across_seeds"]["accuracy"]
        assert accuracy["values"] == [r["methods"][name]["final"]["accuracy"] for r in per_seed]
        assert accuracy["mean"] == pytest.approx(sum(accuracy["values"]) / 2)
        assert accuracy["ci"] is None or accuracy["ci"][0] <= accuracy["mean"] <= accuracy["ci"][1]
        assert (out / f"seed-1/runs/{name}/model.json").exists()
    paired = results["methods"]["federated-fedavg"]["paired_vs_centralized"]["accuracy"]
    assert paired["test"] == "paired t" and paired["n"] == 2
    assert [row["seed"] for row in paired["per_seed"]] == [0, 1] and all("p" in row for row in paired["per_seed"])
    report = (out / "report.md").read_text()
    assert "Across seeds" in report and "paired t" in report
    assert "Across 2 seeds" in (out / "report.html").read_text()  # the path the command prints
    resumed = simulate(out, *fast)
    assert "training" not in resumed.stderr
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_seed_settings_are_checked_and_do_not_invalidate_trained_methods() -> None:
    from leukfed.common.errors import LeukError
    from leukfed.simulations.config import SimulateConfig

    assert SimulateConfig(seeds=" 0, 1,2").seed_list() == (0, 1, 2) and SimulateConfig().seed_list() == ()
    for bad in ("0,x", "1,1"):
        with pytest.raises(LeukError, match="--seeds"):
            SimulateConfig(seeds=bad)
    # Statistics-only settings leave the digest that decides whether a finished method is reused.
    assert SimulateConfig(seeds="0,1", bootstrap=50).digest() == SimulateConfig().digest()
    assert SimulateConfig(seed=1).digest() != SimulateConfig().digest()
    # Settings added later leave it as it was while at their default, so that studies recorded before them
    # resume (the value below is the digest before FedAvgM's settings existed; a new setting belongs in
    # simulations.config.LATER_SETTINGS).
    assert SimulateConfig().digest() == "3f68c5a438d51dba"
    assert SimulateConfig(server_momentum=0.9).digest() != SimulateConfig().digest()
