"""A site's own policy refuses runs that would expose it, before any training or data access."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.client_app import app
from leukfed.client.policy import SitePolicy
from leukfed.common.flower.wire import encode_state
from leukfed.common.fedconfig import FedConfig
from leukfed.common.site import build_site_model
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.simulations.loopback import LoopbackFederation, wait_for

CLASSES = "Benign,Early,Pre,Pro"
COMPLIANT = dict(model="tinycnn", image_size=16, batch_size=8, class_names=CLASSES, min_sites=3,
                 min_metric_examples=10)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("site") / "hospital", per_class=12, size=24)


def deliver(site_data: Path, tmp_path: Path, run_config: dict, *, policy: SitePolicy | None = None,
            message_type: str = "train", **node) -> Message:
    """One task through the real ClientApp with a real Context, as Flower's runtime delivers it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, 1
    dp = float(run_config.get("dp-noise-multiplier", 0.0))  # the global model: tinycnn, DP-ready under DP
    model = build_site_model(FedConfig(**COMPLIANT, dp_noise_multiplier=dp), 4)
    content = RecordDict({"arrays": encode_state(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    (tmp_path / "cache").mkdir(exist_ok=True)
    node_config = {"data-path": str(site_data), "site-name": "h1", "device": "cpu",
                   "audit-log": str(tmp_path / "audit.jsonl"), "image-cache": str(tmp_path / "cache"), **node}
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy.to_toml())
        node_config["site-policy"] = str(tmp_path / "policy.toml")
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=run_config, node_config=node_config)
    return app(Message(content, dst_node_id=22, message_type=message_type), context)


def run(**changes) -> dict:
    return FedConfig(**{**COMPLIANT, **changes}).to_run_config()


def refusal(reply: Message, pattern: str = "") -> str:
    """The refusal the site sent back (the ClientApp answers every task, a refusal as an error reply)."""
    assert reply.has_error(), "the task was not refused"
    assert re.search(pattern, reply.error.reason), reply.error.reason
    return reply.error.reason


def assert_untouched(tmp_path: Path) -> None:
    """No task ran: the audit log holds only refusals, no image was decoded into the cache."""
    log = tmp_path / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert all(entry["outcome"] == "refused" for entry in entries), entries
    assert not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("run_config, rule", [
    (run(min_sites=1), "min-sites 1 is below this site's minimum of 3"),
    (run(min_sites=2), "min-sites 2 is below this site's minimum of 3"),
    (run(min_metric_examples=0, site_val_fraction=0.01), "min-metric-examples 0 is below this site's floor of 10"),
    (run(dp_noise_multiplier=1.0, dp_delta=0.5), "dp-delta 0.5 is larger than this site's delta 1e-05"),
    (run(local_epochs=500), "local-epochs 500 exceeds this site's maximum of 20"),
    (run(batch_size=100_000), "batch-size 100000 exceeds"),
    (run(model="nosuch"), "model 'nosuch' is not registered at this site"),
    (run(image_size=4096), "image-size 4096 px exceeds this site's maximum of 1024 px"),
    ({**run(), "partition-file": "/etc/shadow"}, "unknown run setting 'partition-file'"),
], ids=["min-sites-1", "min-sites-2", "min-metric-examples-0", "larger-delta", "epochs", "batch", "model",
        "image-size", "unknown-key"])
def test_a_run_breaking_the_default_policy_is_refused_before_training(site_data, tmp_path, run_config, rule) -> None:
    refusal(deliver(site_data, tmp_path, run_config, **{"dp-budget": 8.0}),
            "site h1 refused run 11 by its policy: .*" + rule.replace("(", r"\("))
    assert_untouched(tmp_path)
    for task in ("evaluate", "query"):  # every task, not only training
        refusal(deliver(site_data, tmp_path, run_config, message_type=task), "refused run 11 by its policy")
    assert_untouched(tmp_path)


def test_the_site_policy_file_refuses_less_noise_and_other_models(site_data, tmp_path) -> None:
    strict = SitePolicy(dp_min_noise_multiplier=2.0, models="resnet18")
    reason = refusal(deliver(site_data, tmp_path, run(dp_noise_multiplier=1.0), policy=strict),
                     "dp-noise-multiplier 1 is below this site's minimum of 2")
    assert "model 'tinycnn' is not among this site's models (resnet18)" in reason
    refusal(deliver(site_data, tmp_path, run(), policy=strict), "dp-noise-multiplier 0 is below")  # no DP at all
    refusal(deliver(site_data, tmp_path, run(), **{"site-policy": str(tmp_path / "missing.toml")}),
            "cannot read the site policy")  # fail closed
    assert_untouched(tmp_path)


def test_a_compliant_run_trains(site_data, tmp_path) -> None:
    reply = deliver(site_data, tmp_path, run())
    assert not reply.has_error() and "arrays" in reply.content
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [entry["message"] for entry in audit] == ["train"]
    assert any((tmp_path / "cache").iterdir())


def test_under_dp_only_accounted_numbers_leave_the_site(site_data, tmp_path) -> None:
    reply = deliver(site_data, tmp_path, run(dp_noise_multiplier=1.0), **{"dp-budget": 50.0})
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["dp_delta"] == 1e-5 and metrics["dp_epsilon"] > 0 and metrics["num-examples"] > 0
    assert not any(key.startswith(("train_loss", "train_accuracy", "eval_")) for key in metrics), metrics


@pytest.mark.slow
def test_a_site_refuses_a_run_that_would_expose_it_alone(tmp_path: Path) -> None:
    """Real leuk-server and leuk-client on loopback with TLS: the coordinator submits min-sites 1; the site
    (default policy) refuses; the refusal is one line at the site and in the server's round log."""
    federation = LoopbackFederation(tmp_path, ["a"], site_policy=())  # the default policy
    try:
        data = make_synthetic_dataset(tmp_path / "data-a", per_class=10, size=28)
        server = federation.server("--rounds", "1", "--min-sites", "1", "--classes", CLASSES, "--round-timeout", "60")
        federation.wait_submitted()
        federation.client("a", data)
        wait_for(lambda: server.poll() is not None, 240, "the server to finish")
        rule = "min-sites 1 is below this site's minimum of 3"
        round_log = federation.log("server.log")
        assert "failed in train" in round_log and rule in round_log, round_log
        site_log = (tmp_path / "site-a" / "supernode" / "supernode.log").read_text()
        assert "refused: site a refused run" in site_log and rule in site_log
        audit = [json.loads(line) for line in (tmp_path / "site-a" / "audit.jsonl").read_text().splitlines()]
        assert audit and all(e["outcome"] == "refused" and rule in e["reason_sent"] for e in audit)  # and recorded
        assert federation.history()[0]["sites_replied"] == 0
        assert not any((tmp_path / "site-a" / "image-cache").iterdir())  # the data was never read
    finally:
        federation.close()
