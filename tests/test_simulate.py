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
        "--lr", "0.003", "--seed", "3"]


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
