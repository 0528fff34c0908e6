"""Robust aggregation: bad updates never reach the global model; a poisoned site does not stop learning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from simulate_cli import run_simulate

from leukfed.common.errors import LeukError
from leukfed.simulations.faults import corrupt_update, flip_labels, parse_faults
from leukfed.server.reply_checks import reply_problem, update_norm

REFERENCE = {"w": np.ones((3, 2), dtype=np.float32), "n": np.array(5, dtype=np.int64)}


def test_bad_updates_are_named() -> None:
    good = {"w": np.full((3, 2), 2, dtype=np.float32), "n": np.array(6, dtype=np.int64)}
    assert reply_problem(good, REFERENCE) is None
    assert "NaN" in reply_problem({**good, "w": np.full((3, 2), np.nan, dtype=np.float32)}, REFERENCE)
    assert "Inf" in reply_problem({**good, "w": np.full((3, 2), np.inf, dtype=np.float32)}, REFERENCE)
    assert "shape" in reply_problem({**good, "w": np.ones((2, 3), dtype=np.float32)}, REFERENCE)
    assert "dtype" in reply_problem({**good, "n": np.array(6.0)}, REFERENCE)
    assert "keys differ" in reply_problem({"w": good["w"]}, REFERENCE)
    assert update_norm(good, REFERENCE) == pytest.approx(np.sqrt(6.0))


def test_fault_injection() -> None:
    assert parse_faults("0:signflip,2:noise:3", 4) == {0: "signflip", 2: "noise:3"}
    for bad in ("9:nan", "x:nan", "1:explode"):
        with pytest.raises(LeukError):
            parse_faults(bad, 4)
    old = {"w": torch.zeros(4), "n": torch.tensor(1)}
    new = {"w": torch.ones(4), "n": torch.tensor(2)}
    assert torch.equal(corrupt_update("signflip:2", old, new, 0)["w"], torch.full((4,), -2.0))
    assert torch.isnan(corrupt_update("nan", old, new, 0)["w"]).all()
    assert corrupt_update("nan", old, new, 0)["n"] == 2  # integer buffers stay as they are
    assert torch.equal(flip_labels("labelflip", torch.tensor([0, 1, 3]), 4), torch.tensor([1, 2, 0]))


@pytest.mark.slow
def test_one_poisoning_site_of_four_does_not_stop_a_robust_strategy(tmp_path: Path) -> None:
    out = tmp_path / "robust"
    run_simulate(out, "--sites", "4", "--rounds", "4", "--model", "tinycnn", "--image-size", "24", "--batch-size", "16",
                 "--lr", "0.003", "--strategy", "fedmedian", "--no-baselines", "--faulty", "0:signflip:8",
                 "--synthetic-per-class", "60", "--partition", "iid", "--local-epochs", "1")
    results = json.loads((out / "results.json").read_text())
    partition = json.loads((out / "partition.json").read_text())
    assert partition["sites"][0]["fault"] == "signflip:8"
    method = results["methods"]["federated-fedmedian"]
    accuracy = [row["server_evaluate"]["accuracy"] for row in method["history"]]
    assert accuracy[-1] > 0.4, accuracy  # 4 balanced classes: chance is 0.25
    norms = {node: site["train"]["update_norm"] for node, site in method["history"][-1]["sites"].items()}
    assert max(norms.values()) > 3 * sorted(norms.values())[1]  # the poisoned update stands out
