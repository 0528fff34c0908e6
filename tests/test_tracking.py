"""--tracking: a real federation writes TensorBoard event files and an MLflow store that their own
readers read back, per round, aggregated and per site by name; bad or unavailable tracking fails in one line."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from inprocess_federation import run_federation, tracked_federation  # noqa: F401 - the shared federation fixture

from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.server.state import read_history
from leukfed.server.tracking import check_tracking, open_tracker, round_scalars


@pytest.mark.slow   # the shared in-process federation: ~20-40 s on 2 busy cores, once for three test files
def test_tensorboard_event_files_hold_every_round_aggregated_and_per_site(tracked_federation) -> None:  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state, _, folder = tracked_federation
    [run] = [p for p in folder.iterdir() if p.is_dir()]
    assert run.name == state.name                         # one TensorBoard run per state dir
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    history = read_history(state)
    for tag in ("train/train_loss", "server_evaluate/accuracy", "evaluate/eval_accuracy", "round/bytes_sent",
                "round/round_seconds", "round/aggregation_seconds", "sites/site-0/train/num-examples",
                "sites/site-1/evaluate/eval_loss"):
        assert tag in tags, tag
        assert sorted({e.step for e in events.Scalars(tag)}) == [1, 2], tag
    assert not any("1000" in tag or "1017" in tag for tag in tags)         # sites by name, not node id
    loss = {e.step: e.value for e in events.Scalars("train/train_loss")}
    assert loss[2] == pytest.approx(history[1]["train"]["train_loss"], rel=1e-6)
    sent = {e.step: e.value for e in events.Scalars("round/bytes_sent")}
    assert sent[1] == pytest.approx(history[0]["bytes_sent"])
    # Round 1's model was scored with round 2's replies: its scores are logged at step 1.
    scored = {e.step: e.value for e in events.Scalars("evaluate/eval_accuracy")}
    assert scored[1] == pytest.approx(history[0]["evaluate"]["eval_accuracy"], rel=1e-6)


@pytest.mark.slow
def test_mlflow_file_store_holds_the_run_and_its_metrics(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    state, _ = run_federation(tmp_path / "out", monkeypatch, rounds=1, tracking=f"mlflow:{tmp_path / 'mlruns'}")
    [row] = read_history(state)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("leukfed")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == state.name and run.info.status == "FINISHED"
    assert run.data.params["model"] == "tinycnn" and run.data.params["strategy"] == "fedavg"
    [loss] = client.get_metric_history(run.info.run_id, "sites/site-1/train/train_loss")
    assert loss.step == 1 and loss.value == pytest.approx(row["sites"]["site-1"]["train"]["train_loss"], rel=1e-6)
    [accuracy] = client.get_metric_history(run.info.run_id, "server_evaluate/accuracy")
    assert accuracy.value == pytest.approx(row["server_evaluate"]["accuracy"], rel=1e-6)


def test_round_scalars_are_the_rows_numbers_only() -> None:
    row = {"round": 1, "train": {"train_loss": 0.5, "note": "text"}, "evaluate": {"eval_accuracy": float("nan")},
           "server_evaluate": {}, "bytes_sent": 10, "privacy": {"max_epsilon": 2.5, "delta": 1e-5, "sites": 2},
           "sites": {"hospital-a": {"node": 3, "train": {"dp_epsilon": 2.5, "flag": True}, "evaluate": {}}},
           "failures": [], "rejected": [{"site": "b"}]}
    assert round_scalars(row) == {"train/train_loss": 0.5, "round/bytes_sent": 10.0, "privacy/max_epsilon": 2.5,
                                  "privacy/delta": 1e-5, "privacy/sites": 2.0, "sites/hospital-a/train/dp_epsilon": 2.5,
                                  "round/failures": 0.0, "round/rejected": 1.0}


def test_tracking_is_declared_once_off_by_default_and_checked(tmp_path: Path, monkeypatch) -> None:
    assert FedConfig().tracking == "" and open_tracker("", "run") is None
    monkeypatch.chdir(tmp_path)
    assert FedConfig(tracking="mlflow:./mlruns").tracking == f"mlflow:{tmp_path / 'mlruns'}"   # ServerApp's cwd differs
    assert FedConfig(tracking="mlflow:https://mlflow.example:5000").tracking == "mlflow:https://mlflow.example:5000"
    for bad in ("wandb:x", "tensorboard:", "mlflow"):
        with pytest.raises(LeukError, match="expected tensorboard:DIR or mlflow:PATH_OR_URI"):
            FedConfig(tracking=bad)
    with pytest.raises(LeukError, match="must not hold credentials"):   # the run config reaches every site
        FedConfig(tracking="mlflow:https://user:secret@mlflow.example/")
    monkeypatch.setitem(sys.modules, "tensorboard", None)          # as if the package were not installed
    with pytest.raises(LeukError, match=r"pip install 'leukfed\[tracking\]'"):
        check_tracking("tensorboard:runs")
    check_tracking("")


def test_leuk_server_and_leuk_simulate_offer_the_option() -> None:
    from typer.testing import CliRunner

    from leukfed.cli import app as leuk
    from leukfed.server.cli import app as leuk_server

    for app, args in ((leuk_server, ["--help"]), (leuk, ["simulate", "--help"])):
        result = CliRunner().invoke(app, args, terminal_width=200)
        assert result.exit_code == 0 and "--tracking" in result.output, result.output
