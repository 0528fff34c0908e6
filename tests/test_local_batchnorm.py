"""FedBN (`--local-batchnorm`): each site keeps its own BatchNorm entries between rounds, the rest is averaged."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from inprocess_federation import run_federation
from leukfed.client.client_app import LOCAL_BATCHNORM, with_local_batchnorm
from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.wire import decode_state, encode_state
from leukfed.common.train import batchnorm_keys
from leukfed.models import create_model


def test_sites_keep_their_own_batchnorm_and_share_the_rest(tmp_path: Path, monkeypatch) -> None:
    contexts: dict = {}
    state_dir, lines = run_federation(tmp_path / "out", monkeypatch, rounds=2, contexts_out=contexts,
                                      local_batchnorm=True)
    exported = json.loads((state_dir / "model.json").read_text())
    assert exported["config"]["local-batchnorm"] is True and exported["rounds_completed"] == 2
    expected = set(batchnorm_keys(create_model("tinycnn", num_classes=4)))
    kept = [decode_state(c.state[LOCAL_BATCHNORM]) for c in contexts.values()]
    assert len(kept) == 2 and all(set(own) == expected for own in kept)  # BatchNorm entries only
    means = [k for k in expected if k.endswith("running_mean")]
    assert any(not torch.equal(kept[0][k], kept[1][k]) for k in means)  # each site its own statistics


def test_without_the_setting_sites_keep_nothing(tmp_path: Path, monkeypatch) -> None:
    contexts: dict = {}
    run_federation(tmp_path / "out", monkeypatch, rounds=1, contexts_out=contexts)
    assert all(LOCAL_BATCHNORM not in c.state.array_records for c in contexts.values())


def test_a_site_trains_from_its_own_batchnorm_and_the_global_rest() -> None:
    model = create_model("tinycnn", num_classes=4)
    received = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}   # the server's average
    own = {k: torch.ones_like(received[k]) for k in batchnorm_keys(model)}      # this site's last round
    context = Context(1, 2, {}, RecordDict({LOCAL_BATCHNORM: encode_state(own)}), {})
    fed = FedConfig(state_dir="unused", local_batchnorm=True)
    used = with_local_batchnorm(fed, context, received)
    assert all(torch.equal(used[k], own[k]) for k in own)
    assert all(torch.equal(used[k], received[k]) for k in received if k not in own)
    off = with_local_batchnorm(FedConfig(state_dir="unused"), context, received)
    assert all(torch.equal(off[k], received[k]) for k in received)
