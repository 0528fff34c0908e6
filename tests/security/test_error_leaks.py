"""A failing task tells the coordinator a site error code and a generic text; paths and names stay local."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.client_app import app
from leukfed.common.flower.wire import encode_state
from leukfed.common.fedconfig import FedConfig
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.models import create_model
from site_policies import lenient_policy

PATIENT_FILE = "Patient_SMITH_JOHN_1970-01-01.jpg"
SECRETS = ("SMITH", "JOHN", "1970-01-01", "Patient_")
FED = FedConfig(model="tinycnn", image_size=16, class_names="AML,APL", min_metric_examples=1)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A hospital folder whose AML images include a corrupt file named like a patient record."""
    root = tmp_path_factory.mktemp("hospital-records")
    data = make_synthetic_dataset(root / "Ward_7_leukemia", per_class=6, size=24, classes=("AML", "APL"))
    (data / "AML" / PATIENT_FILE).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG: truncated scan")
    return data


def deliver(message_type: str, data: Path, log: Path, fed: FedConfig = FED, run_config: dict | None = None) -> Message:
    """One message through the real ClientApp (what Flower's runtime calls) and the reply it returns."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, 1
    content = RecordDict()
    if message_type != "query":
        content["arrays"] = encode_state(create_model("tinycnn", 2, image_size=16).state_dict())
        content["config"] = ConfigRecord({"server-round": 1})
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=run_config or fed.to_run_config(),
                      node_config={"data-path": str(data), "site-name": "h1", "audit-log": str(log), "device": "cpu",
                                   **lenient_policy()})
    return app(Message(content, dst_node_id=22, message_type=message_type), context)  # never raises


def wire_bytes(reply: Message) -> bytes:
    """Everything Flower sends back for the reply: every object it deflates, metadata included."""
    return b"".join(obj.deflate() for obj in get_all_nested_objects(reply).values()) + repr(reply).encode()


def assert_nothing_leaks(reply: Message, *secrets: str) -> None:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason.startswith("site error 3: data could not be read; see the site's local log")
    sent = wire_bytes(reply)
    for secret in secrets:
        assert secret.encode() not in sent, secret


def test_a_corrupt_patient_image_is_named_only_in_the_site_log(site: Path, tmp_path: Path, capfd) -> None:
    log = tmp_path / "audit.jsonl"
    for message_type in ("train", "evaluate"):
        reply = deliver(message_type, site, log)
        assert_nothing_leaks(reply, *SECRETS, str(site), "Ward_7", "hospital-records")
    local = capfd.readouterr().err
    assert PATIENT_FILE in local and str(site) in local          # the site's operator sees the cause
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["outcome"] for e in entries] == ["failed", "failed"]
    assert all(PATIENT_FILE in e["error"] and e["error_code"] == 3 for e in entries)
    assert all(e["ref"] in e["reason_sent"] for e in entries)    # the coordinator's line points to this entry


def test_a_partition_file_in_the_run_config_is_refused_unread(site: Path, tmp_path: Path) -> None:
    missing = tmp_path / "site-secrets" / "Patient_DOE_JANE_records.json"
    run_config = {**FED.to_run_config(), "partition-file": str(missing)}  # a coordinator probing the disk
    reply = deliver("train", site, tmp_path / "audit.jsonl", run_config=run_config)
    assert reply.has_error() and "unknown run setting 'partition-file'" in reply.error.reason  # refused unread
    for secret in (str(missing), "site-secrets", "DOE_JANE", "FileNotFoundError"):
        assert secret.encode() not in wire_bytes(reply), secret
    assert not missing.parent.exists()


def test_a_query_on_unreadable_data_sends_no_path(tmp_path: Path, capfd) -> None:
    gone = tmp_path / "Patient_SMITH_JOHN_scans"
    reply = deliver("query", gone, tmp_path / "audit.jsonl")
    assert reply.has_error() and reply.error.reason.startswith("site error ")
    assert b"SMITH" not in wire_bytes(reply) and str(gone).encode() not in wire_bytes(reply)
    assert str(gone) in capfd.readouterr().err


def test_an_honest_site_still_answers(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "clean", per_class=6, size=24, classes=("AML", "APL"))
    reply = deliver("train", data, tmp_path / "audit.jsonl")
    assert not reply.has_error() and dict(reply.content["metrics"])["num-examples"] > 0


@pytest.mark.slow
def test_in_a_real_federation_the_coordinator_sees_only_the_code(tmp_path: Path) -> None:
    """leuk-server and two leuk-clients on loopback (TLS); site b's image turns corrupt after its data check."""
    from leukfed.simulations.loopback import LoopbackFederation, read_history, wait_for

    federation = LoopbackFederation(tmp_path, ["a", "b"])
    data = {s: make_synthetic_dataset(tmp_path / f"Ward_{s}_records", per_class=8, size=28, seed=20 + "ab".index(s))
            for s in "ab"}
    try:
        server = federation.server("--rounds", "1", "--min-sites", "2", "--round-timeout", "120", "--batch-size", "16")
        federation.wait_submitted()
        federation.client("a", data["a"])
        federation.client("b", data["b"])
        wait_for(lambda: "data ok" in federation.log("client-b.log"), 180, "site b's data check")
        first_class = sorted(p for p in data["b"].iterdir() if p.is_dir())[0]
        (first_class / PATIENT_FILE).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG: truncated scan")
        assert server.wait(timeout=600) == 0, federation.log("server.log")
    finally:
        federation.close()
    failures = [f for row in read_history(federation.state) for f in row["failures"]]
    assert failures and all(f["reason"].startswith("site error 3: data could not be read") for f in failures)
    seen_by_coordinator = federation.log("server.log") + (federation.state / "history.json").read_text()
    for secret in (*SECRETS, str(data["b"]), "Ward_b"):
        assert secret not in seen_by_coordinator, secret
    site_log = (tmp_path / "site-b" / "supernode" / "supernode.log").read_text()
    assert PATIENT_FILE in site_log                                  # the hospital's own log names the file
    audit = [json.loads(line) for line in (tmp_path / "site-b" / "audit.jsonl").read_text().splitlines()]
    assert any(e["outcome"] == "failed" and PATIENT_FILE in e["error"] for e in audit)
