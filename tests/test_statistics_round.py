"""--bn-statistics-round: after the last round the sites recompute BatchNorm statistics under the final weights;
the weights leave the site and reach the exported model unchanged, only the statistics move."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from simulate_cli import run_simulate
from test_data_minimisation import deliver

from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.wire import record_digest, unpack_record
from leukfed.common.site import STATISTICS_TASK
from leukfed.models import create_model
from leukfed.server.statistics_round import running_statistics, statistics_round


def test_a_site_asked_for_statistics_returns_the_global_weights_with_new_statistics(site_data: Path, tmp_path: Path):
    reply, sent = deliver("train", site_data, tmp_path, config={STATISTICS_TASK: 2})
    returned = {k: v.numpy() for k, v in unpack_record(reply.content["arrays"]).items()}
    statistics = running_statistics(create_model("tinycnn", 2, image_size=16))
    assert set(returned) == set(sent) and statistics
    for key in sent:
        if key in statistics:
            assert not np.allclose(returned[key], sent[key]), key       # recomputed over the site's images
        elif not key.endswith("num_batches_tracked"):
            assert np.array_equal(returned[key], sent[key]), key        # no weight moved: nothing trained
    metrics = dict(reply.content["metrics"])
    assert 1 <= metrics["statistics_batches"] <= 2                          # the site's images fill one or two
    assert 0 < metrics["num-examples"] <= metrics["statistics_batches"] * FedConfig().batch_size
    assert "train_loss" not in metrics
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])   # the site's record of it
    assert entry["message"] == "train" and entry["outcome"] == "answered"
    assert entry["update_sha256"] == record_digest(unpack_record(reply.content["arrays"]))


def test_only_batchnorm_models_have_a_statistics_round() -> None:
    assert len(running_statistics(create_model("tinycnn", 4, image_size=24))) == 6     # 3 BatchNorm layers
    assert running_statistics(create_model("smallcnn", 4, image_size=50)) == []         # none: no round
    with pytest.raises(Exception, match="bn-statistics-round must be >= 0"):
        FedConfig(bn_statistics_round=-1)


def test_a_batchnorm_run_without_the_round_says_how_to_ask_for_it() -> None:
    printed: list[str] = []
    for model in ("tinycnn", "smallcnn"):      # the round is off: nothing is sent, so no grid is needed
        changed = statistics_round(None, FedConfig(), create_model(model, 4, image_size=24 if model == "tinycnn" else 50),
                                   None, {}, printed.append)
        assert changed is False
    assert printed == [printed[0]] and "3 BatchNorm layers" in printed[0] and "--bn-statistics-round 50" in printed[0]


@pytest.mark.slow
def test_the_exported_model_keeps_the_last_rounds_weights_with_recomputed_statistics(tmp_path: Path) -> None:
    """Under secure aggregation: the statistics round is masked like every train exchange."""
    out = tmp_path / "sim"
    printed = run_simulate(out, "--synthetic-per-class", "40", "--partition", "iid", "--sites", "3", "--rounds", "2",
                           "--model", "tinycnn", "--image-size", "24", "--batch-size", "16", "--bootstrap", "0",
                           "--no-baselines", "--bn-statistics-round", "3", "--secure-aggregation")
    assert "statistics round: BatchNorm statistics of 3 layers recomputed" in printed
    assert printed.count("secure aggregation 3 sampled") == 3      # 2 rounds and the statistics round, each masked
    state_dir = out / "federated-fedavg"
    last_round = {k.removeprefix("/model/"): v for k, v in load_file(state_dir / "checkpoint.safetensors").items()
                  if k.startswith("/model/")}
    exported = load_file(state_dir / "model.safetensors")
    statistics = running_statistics(create_model("tinycnn", 4, image_size=24))
    assert set(exported) == set(last_round)
    for key, value in exported.items():
        if key in statistics:
            assert not np.allclose(value, last_round[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert np.array_equal(value, last_round[key]), key
