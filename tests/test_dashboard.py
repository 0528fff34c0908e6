"""The dashboard's documents from a state folder: sites by name in either history schema, time split,
curves, earlier runs; status.json written atomically and merged."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from leukfed.server.dashboard import Dashboard, time_split
from leukfed.server.run_status import read_status, write_status

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]
REJECTION = {"node": 22, "site": "b", "reason": "num-examples 1000000000 exceeds the bound 1000000 per site"}


def row(round_: int, sites: dict, **extra) -> dict:
    return {"round": round_, "sites": sites, "failures": [], "rejected": [], "time": 1000.0 + round_,
            "train": {"train_loss": 2.0 / round_}, "evaluate": {"eval_accuracy": 0.2 * round_},
            "server_evaluate": {}, "round_seconds": 10.0, "train_phase_seconds": 8.0,
            "slowest_site_work_seconds": 5.0, "aggregation_seconds": 1.0, "evaluate_phase_seconds": 1.5,
            "server_evaluate_seconds": 0.0, "bytes_sent": 100, "bytes_received": 50, **extra}


# Histories written before site names key sites by node id with a `name`; today's rows key them by name
# and carry the node id as `node`. The dashboard reads both.
BY_NODE = [row(1, {"11": {"name": "a", "train": {"train_loss": 1.0}, "evaluate": {"eval_accuracy": 0.5}}},
               rejected=[REJECTION]),
           row(2, {"11": {"name": "a", "train": {"train_loss": 0.5, "dp_epsilon": 1.25},
                          "evaluate": {"eval_accuracy": 0.75}}},
               failures=[{"node": 22, "phase": "train", "reason": "Traceback\nTimeoutError: no reply"}])]
BY_NAME = [{**r, "sites": {entry["name"]: {"node": int(node), **{k: v for k, v in entry.items() if k != "name"}}
                           for node, entry in r["sites"].items()}} for r in BY_NODE]


@pytest.mark.parametrize("history", [BY_NODE, BY_NAME], ids=["by-node", "by-name"])
def test_sites_are_named_in_either_history_schema(tmp_path: Path, history: list[dict]) -> None:
    (tmp_path / "history.json").write_text(json.dumps(history))
    write_status(tmp_path, phase="training", round=3, total_rounds=3, sites={"a": 11, "b": 22, "c": 33})
    live = Dashboard(tmp_path).live()
    sites = {s["name"]: s for s in live["sites"]}
    assert sorted(sites) == ["a", "b", "c"] and sites["a"]["node"] == "11"
    assert sites["a"]["rounds_joined"] == 2 and sites["a"]["dp_epsilon"] == 1.25 and sites["a"]["accuracy"] == 0.75
    assert sites["b"]["rejected"] == 1 and sites["b"]["last_rejected"] == {"round": 1, "reason": REJECTION["reason"]}
    assert sites["b"]["failures"] == 1 and sites["b"]["last_failures"]["reason"] == "TimeoutError: no reply"
    assert sites["c"]["last_seen"] is None and sites["c"]["rounds_joined"] == 0
    accuracy = {s["name"]: s["points"] for s in live["curves"]["accuracy"]}
    assert accuracy == {"a": [[1, 0.5], [2, 0.75]], "aggregated": [[1, 0.2], [2, 0.4]]}
    assert live["rounds"][1]["failures"] == [{"site": "b", "phase": "train", "reason": "TimeoutError: no reply"}]


def test_a_round_splits_into_training_transfer_aggregation_and_evaluation() -> None:
    assert time_split(row(1, {})) == {"training": 5.0, "transfer": 2.0, "aggregation": 1.0, "evaluation": 1.5,
                                      "other": 0.5}


def test_runs_and_the_export_are_listed(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text(json.dumps(BY_NODE))
    earlier = tmp_path / "runs" / "study-1"
    earlier.mkdir(parents=True)
    (earlier / "model.json").write_text(json.dumps({"model": "tinycnn"}))
    (earlier / "MODEL_CARD.md").write_text("# card\n")
    dashboard = Dashboard(tmp_path)
    runs = {r["name"]: r for r in dashboard.runs()}
    assert runs["."]["rounds"] == 2 and not runs["."]["finished"]
    assert runs["runs/study-1"]["model"] == "tinycnn" and runs["runs/study-1"]["model_card"]
    assert dashboard.model()["exported"] is False


def test_status_is_merged_and_a_new_phase_or_round_restarts_its_clock(tmp_path: Path) -> None:
    first = write_status(tmp_path, run_id=7, phase="training", round=1)
    again = write_status(tmp_path, phase="training")
    assert again["phase_started"] == first["phase_started"] and again["run_id"] == 7
    later = write_status(tmp_path, round=2)
    assert later["phase_started"] >= first["phase_started"] and read_status(tmp_path) == later
    (tmp_path / "status.json").write_text("{torn")
    assert read_status(tmp_path) == {}
    assert write_status(tmp_path / "missing", phase="x")["phase"] == "x"   # never raises


def test_ids_reach_the_browser_exactly(tmp_path: Path) -> None:
    """Flower's 64-bit run and node ids would lose digits as JavaScript numbers: they travel as text."""
    from leukfed.common.webui.server import plain

    write_status(tmp_path, run_id=2810463607261981522, round=1, sites={"a": 11116868050111349780})
    document = plain(Dashboard(tmp_path).live())
    assert document["status"]["run_id"] == "2810463607261981522"
    assert document["status"]["sites"]["a"] == "11116868050111349780" and document["status"]["round"] == 1
    assert plain({"x": float("nan"), "y": (1, True)}) == {"x": None, "y": [1, True]}


def test_leuk_dashboard_serves_a_finished_state_folder_read_only(tmp_path: Path) -> None:
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    (tmp_path / "history.json").write_text(json.dumps(BY_NAME))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([*LEUK, "dashboard", str(tmp_path), "--listen",
                                f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/live", timeout=5) as reply:
                    live = json.loads(reply.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline and process.poll() is None, "the dashboard did not start"
                time.sleep(0.3)
        assert {"a", "b"} <= {s["name"] for s in live["sites"]}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/live", method="POST"))
        assert refused.value.code == 405
    finally:
        process.terminate()
        process.wait(timeout=30)
    missing = subprocess.run([*LEUK, "dashboard", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "error:" in missing.stderr and "Traceback" not in missing.stderr


def test_a_patient_federations_export_is_shown(tmp_path: Path) -> None:
    from leukfed.common.patient_heads import make_head
    from leukfed.common.patient_model import (HEADS_FILE, PATIENT_MODEL_JSON, PatientModel, recipe_named,
                                              save_patient_model)
    from leukfed.server import dashboard
    from leukfed.server.patient_federation import EXPORT_DIR

    assert dashboard.PATIENT_EXPORT == (EXPORT_DIR, HEADS_FILE, PATIENT_MODEL_JSON)   # the writer's names
    (tmp_path / "history.json").write_text(json.dumps(BY_NODE))
    recipe = recipe_named("lite0-meanprob")
    export = tmp_path / EXPORT_DIR
    save_patient_model(export, PatientModel(recipe, [make_head("meanprob", 4)], (), 1.0, 0.4,
                                            {"recipe": {"backbone": "efficientnet_lite0", "head": "meanprob"}}))
    (export / "MODEL_CARD.md").write_text("# Model card: federated patient model\n")
    board = Dashboard(tmp_path)
    model = board.model()
    assert model["exported"] and model["weights_bytes"] > 0 and model["model_card"].startswith("# Model card")
    assert board.runs()[0]["finished"] and board.runs()[0]["model"] == "patient model: efficientnet_lite0 + meanprob head"
