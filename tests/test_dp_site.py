"""DP wired through the site, the ClientApp and the server: metrics, audit log, budget refusal, architecture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.client_app import app
from leukfed.common.flower.wire import encode_state
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.site import build_site_model
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.server_app import initial_model
from site_policies import lenient_policy

FED = FedConfig(model="tinycnn", image_size=16, batch_size=8, class_names="Benign,Early,Pre,Pro",
                dp_noise_multiplier=1.0, min_metric_examples=1)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("site") / "hospital", per_class=12, size=24)


def deliver(site_data: Path, tmp_path: Path, server_round: int, fed: FedConfig = FED, **node) -> Message:
    """One train message through the real ClientApp, as Flower's runtime delivers it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, server_round
    content = RecordDict({"arrays": encode_state(initial_model(fed, 4).state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=fed.to_run_config(),
                      node_config={"data-path": str(site_data), "site-name": "h1", "device": "cpu",
                                   "audit-log": str(tmp_path / "audit.jsonl"),
                                   **lenient_policy(), **node})
    return app(Message(content, dst_node_id=22, message_type="train"), context)


def test_server_and_sites_build_the_same_dp_architecture() -> None:
    server, site = initial_model(FED, 4).state_dict(), build_site_model(FED, 4).state_dict()
    assert {k: v.shape for k, v in server.items()} == {k: v.shape for k, v in site.items()}
    assert not any("running_mean" in k for k in server)


def test_site_reports_epsilon_and_stops_when_its_budget_is_spent(site_data: Path, tmp_path: Path) -> None:
    first = deliver(site_data, tmp_path, 1, **{"dp-budget": 5.0})
    metrics = dict(first.content["metrics"])
    assert 0 < metrics["dp_epsilon"] <= 5.0 and metrics["dp_delta"] == 1e-5 and metrics["dp_noise_multiplier"] == 1.0
    refused = deliver(site_data, tmp_path, 2, **{"dp-budget": 5.0})  # a fresh process: the ledger remembers
    assert refused.has_error() and refused.error.reason.startswith("privacy budget spent: epsilon")
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["message"] for e in audit] == ["train", "train-refused"]
    assert audit[0]["metrics_sent"]["dp_epsilon"] == metrics["dp_epsilon"]
    ledger = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1]


def test_a_site_that_demands_dp_refuses_a_run_without_it(site_data: Path, tmp_path: Path) -> None:
    plain = FedConfig(model="tinycnn", image_size=16, class_names="Benign,Early,Pre,Pro")
    refused = deliver(site_data, tmp_path, 1, plain, **{"dp-budget": 3.0})  # an error reply: the app never raises
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert refused.has_error() and "requires differential privacy" in last.get("error", last["reason_sent"])


def test_the_server_cannot_require_more_noise_than_the_run_uses() -> None:
    with pytest.raises(LeukError, match="every update would be refused"):
        FedConfig(dp_noise_multiplier=0.5, dp_min_noise_multiplier=1.0)
    assert SiteConfig.from_node_config({"dp-budget": "2.5"}).dp_budget == 2.5
