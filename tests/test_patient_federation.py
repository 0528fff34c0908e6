"""`--task patients`: the APL patient model federated by the product ServerApp over the product ClientApp.

Three hospitals, each its own patient folders copied from apl_aml (5 patients, 8 cells each), plus a
fourth whose policy allows the cell task only; the ServerApp's main runs in this process and every
message goes through protobuf (common/flower/inprocess.py's QueuedGrid)."""
from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from inprocess_federation import RUN_ID, run_federation
from patient_sites import make_site_folders
from leukfed.common.flower.inprocess import QueuedGrid, run_client_app
from leukfed.client.policy import SitePolicy, violations
from leukfed.client.wire_checks import expected_layout
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.patient_federated import (Moments, histogram_calibration, histogram_rates, logit_histogram,
                                              split_patients, standardisation)
from leukfed.common.patient_model import evaluate_patient_run, load_patient_model, predict_patient_folders
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli

CELLS = 8                                     # per patient: 5 patients x 8 cells = 40 cells per site
SITES = {"h0": (2, 3), "h1": (2, 3), "h2": (2, 3), "cells-only": (1, 1)}   # (APL, AML) patients per site
PATIENT_KEYS = {"query.moments": {"num-examples", "cells", "patients-negative", "patients-positive"},
                "train": {"num-examples", "client_seconds"},
                "evaluate": {"num-examples", "histogram-negative", "histogram-positive"}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory, data_root: Path) -> dict[str, Path]:
    """Each site's own patient folders (copies of a few cells) with its patients.csv."""
    return make_site_folders(data_root / "apl_aml", tmp_path_factory.mktemp("patient-sites"), SITES, CELLS)


@pytest.fixture(scope="module")
def federation(site_folders: dict[str, Path], tmp_path_factory) -> tuple[Path, list[str], dict[str, Path]]:
    """One patient federation: (state dir, the coordinator's log lines, each site's audit log)."""
    from leukfed.server import patient_federation, server_app

    root = tmp_path_factory.mktemp("patient-federation")
    nodes = {2000 + 31 * k: name for k, name in enumerate(SITES)}
    fed = FedConfig(task="patients", state_dir=str(root / "state"), rounds=3, local_epochs=2, lr=0.1,
                    batch_size=64, min_sites=3, min_metric_examples=1, site_val_fraction=0.4, round_timeout=60,
                    registered_sites=",".join(f"{name}={node}" for node, name in nodes.items()))   # as leuk-server sets it
    run_config = fed.to_run_config()
    audits = {name: root / f"audit-{name}.jsonl" for name in SITES}
    contexts = {}
    for node, name in nodes.items():
        tasks = "cells" if name == "cells-only" else "cells,patients"
        policy = root / f"policy-{name}.toml"
        policy.write_text(SitePolicy(min_metric_examples=1, tasks=tasks, patient_val_fraction=0.4).to_toml())
        node_config = {"data-path": str(site_folders[name]), "site-name": name, "site-policy": str(policy),
                       "audit-log": str(audits[name]), "image-cache": str(root / f"cache-{name}")}
        contexts[node] = Context(RUN_ID, node, node_config, RecordDict(), run_config)
    from leukfed.client.client_app import app

    grid = QueuedGrid({n: partial(run_client_app, app, context=contexts[n]) for n in nodes}, run_id=RUN_ID)
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
        monkeypatch.setattr(TaskIdentity, "_node_id", 1)
        monkeypatch.setattr(server_app, "log", lines.append)
        monkeypatch.setattr(patient_federation, "log", lines.append)
        server_app.main(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    return Path(fed.state_dir), lines, audits


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_federated_patient_model_loads_and_scores_patient_folders(federation, site_folders) -> None:
    state, lines, _ = federation
    model = load_patient_model(state / "patient-model")
    assert len(model.heads) == 1 and model.recipe.head == "meanprob" and model.temperature > 0
    assert 0.0 <= model.threshold <= 1.0 and model.description["threshold"] == model.threshold
    described = model.description["federation"]
    assert set(described["sites"]) == {"h0", "h1", "h2"} and described["train_patients"] == 9
    assert model.description["validation"]["num_patients"] == 6   # 2 per site (one of each diagnosis)
    rows = json.loads((state / "history.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["sites_replied"] == 3 for r in rows)
    card = (state / "patient-model" / "MODEL_CARD.md").read_text()
    assert "ONE FedAvg federation" in card and "--task patients" in card
    folders = sorted(p for p in site_folders["h0"].iterdir() if p.is_dir())[:2]
    predicted = predict_patient_folders(state / "patient-model", folders)
    assert all(0.0 <= r["decision"]["probability"] <= 1.0 and r["decision"]["threshold"] == model.threshold
               for r in predicted)
    scored = evaluate_patient_run(state / "patient-model", site_folders["h1"])   # what `leuk evaluate` runs
    assert scored["num_patients"] == 5 and scored["threshold"] == model.threshold
    assert any("calibration: 6 validation patients from 3 sites" in line for line in lines), lines


def test_sites_send_aggregates_only(federation) -> None:
    """Moments, head updates and one histogram: no per-patient value in any reply (from the audit logs,
    which record exactly what left each site)."""
    _, _, audits = federation
    for name in ("h0", "h1", "h2"):
        entries = audit(audits[name])
        kinds = [e["message_type"] for e in entries]
        assert kinds == ["query", "query.moments", "train", "train", "train", "evaluate"], kinds
        for entry in entries[1:]:
            assert entry["outcome"] == "answered", entry
            assert set(entry["metrics_sent"]) == PATIENT_KEYS[entry["message_type"]], entry
        histogram = entries[-1]["metrics_sent"]
        assert entries[-1]["arrays_sent"] == 0 and histogram["num-examples"] == 2
        assert len(histogram["histogram-positive"]) == 50 and sum(histogram["histogram-positive"]) == 1
        assert entries[1]["arrays_sent"] == 2 and entries[2]["arrays_sent"] == 4   # sums; the head's 4 tensors


def test_a_site_that_does_not_allow_the_patient_task_refuses_it(federation) -> None:
    _, lines, audits = federation
    entries = audit(audits["cells-only"])
    refused = [e for e in entries if e["outcome"] == "refused"]
    assert refused and len(refused) == len(entries)   # every task, the class query included
    assert all("task 'patients' is not among this site's tasks (cells)" in e["reason_sent"] for e in refused)
    assert any("moments: ignored the reply of" in line and "cells-only" in line for line in lines), lines
    policy = SitePolicy()
    fed = FedConfig(state_dir="x", task="patients")
    assert policy.allowed_tasks == ("cells",) and violations(policy, fed, fed.to_run_config())
    assert violations(SitePolicy(tasks="patients"), fed, fed.to_run_config()) == []


def test_task_cells_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    assert FedConfig(state_dir="x").task == "cells"
    fed = FedConfig(state_dir="x", model="tinycnn", image_size=24)
    assert "linear.weight" not in expected_layout(fed, 4)
    patients = expected_layout(FedConfig(state_dir="x", task="patients"), 2)
    assert patients == {"center": ((1280,), "float32"), "scale": ((1280,), "float32"),
                        "linear.weight": ((1, 1280), "float32"), "linear.bias": ((1,), "float32")}
    state, _ = run_federation(tmp_path / "out", monkeypatch, rounds=1)
    assert (state / "model.safetensors").is_file() and not (state / "patient-model").exists()


def test_secure_aggregation_is_supported_for_the_patient_task() -> None:
    assert FedConfig(state_dir="x", task="patients", secure_aggregation=True, min_sites=3).secure_aggregation


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "krum"}, "does not support strategy krum"),
    ({"secure_aggregation": True, "min_sites": 3, "dp_noise_multiplier": 1.0}, "does not support DP-SGD"),
    ({"patient_recipe": "nope"}, "unknown recipe 'nope'"),
    ({"task": "slides"}, "unknown task 'slides'"),
])
def test_unsupported_patient_runs_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(LeukError, match=message) as caught:
        FedConfig(state_dir="x", **({"task": "patients"} | settings))
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_leuk_server_and_leuk_client_processes_train_and_export_the_patient_model(site_folders, tmp_path) -> None:
    """The deployment path: real leuk-server and three leuk-client processes (TLS, site keys, approvals,
    forked tasks) under secure aggregation (moments, head rounds and calibration masked), then `leuk
    evaluate` on the export."""
    fed = LoopbackFederation(tmp_path, ["h0", "h1", "h2"],
                             site_policy=("--min-sites", "2", "--min-metric-examples", "1", "--tasks", "cells,patients"))
    try:
        server = fed.server("--task", "patients", "--rounds", "2", "--local-epochs", "2", "--lr", "0.1",
                            "--batch-size", "64", "--min-sites", "3", "--site-val-fraction", "0.4",
                            "--secure-aggregation")
        fed.wait_submitted()
        clients = [fed.client(site, site_folders[site]) for site in ("h0", "h1", "h2")]
        assert fed.wait_server(server, clients, 400) == 0, fed.log("server.log")
    finally:
        fed.close()
    assert "patient model exported to" in fed.log("server.log")
    federation = json.loads((fed.state / "patient-model" / "patient_model.json").read_text())["federation"]
    assert federation["secure_aggregation"] and federation["histograms_released"] == 3
    assert [s["train"] for s in federation["sites"].values()] == [None] * 3   # only the sum of their moments
    assert (tmp_path / "site-h0" / "image-cache" / "patient-features-efficientnet_lite0-160.npz").is_file()
    evaluated = subprocess.run([*cli("cli"), "evaluate", "--model", str(fed.state / "patient-model"),
                                "--data", str(site_folders["h2"])], capture_output=True, text=True, env=ENV)
    assert evaluated.returncode == 0 and "sensitivity" in evaluated.stdout, evaluated.stderr


def test_moments_histograms_and_split_are_plain_aggregates() -> None:
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(30, 4))
    parts = [Moments(n, c.sum(0), (c ** 2).sum(0), (1, 1)) for n, c in ((10, cells[:10]), (20, cells[10:]))]
    mean, std = standardisation(parts[0] + parts[1])
    assert np.allclose(mean.numpy(), cells.mean(0), atol=1e-6) and np.allclose(std.numpy(), cells.std(0, ddof=1), atol=1e-5)
    y = np.array([0, 0, 0, 1, 1, 1])
    h = logit_histogram(np.array([-3.0, -2, 1, 2, 3, 4]), y)
    threshold, _ = histogram_calibration([h])
    sens, spec = histogram_rates(h, threshold)
    assert sens >= 0.9 and 0 <= spec <= 1
    val = split_patients(np.array([0] * 5 + [1] * 3), 0.4, seed=1)
    assert val.sum() == 3 and val[:5].sum() == 2 and val[5:].sum() == 1
    assert (split_patients(np.array([0, 1]), 0.4, seed=1) == [False, False]).all()   # keeps a training patient


def test_the_coordinator_is_told_when_the_schedule_is_not_the_measured_one():
    from leukfed.common.patient_federated import MEASURED_SCHEDULE, schedule_advice

    assert schedule_advice(**MEASURED_SCHEDULE) is None
    advice = schedule_advice(rounds=3, local_epochs=1, lr=1e-3, batch_size=32)   # the cell classifiers' defaults
    assert "--rounds 100 --local-epochs 2 --lr 0.1 --batch-size 256" in advice and "--lr 0.001" in advice
