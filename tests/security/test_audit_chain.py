"""The site's audit log is evidence: every task (answered, refused, failed) is chained; tampering is found."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.audit import GENESIS, append_entry, canonical_json, verify_chain
from leukfed.client.client_app import app
from leukfed.common.flower.wire import encode_state, record_digest, unpack_record
from leukfed.common.fedconfig import FedConfig
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.server_app import initial_model
from site_policies import lenient_policy

CLASSES = "AML,APL"


def deliver(message_type: str, node: dict, fed: FedConfig, server_round: int = 1) -> Message:
    """One message through the real ClientApp, as Flower's runtime delivers it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, server_round
    content = RecordDict()
    if message_type != "query":
        content["arrays"] = encode_state(initial_model(fed, 2).state_dict())  # the server's model
        content["config"] = ConfigRecord({"server-round": server_round})
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=fed.to_run_config(),
                      node_config={**lenient_policy(), **node})
    return app(Message(content, dst_node_id=22, message_type=message_type), context)


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory) -> tuple[Path, list[Message]]:
    """A real log: a query, a train and an evaluate answered, a train refused (budget), one failed."""
    root = tmp_path_factory.mktemp("site")
    data = make_synthetic_dataset(root / "hospital", per_class=8, size=24, classes=("AML", "APL"))
    log = root / "audit.jsonl"
    node = {"data-path": str(data), "site-name": "h1", "audit-log": str(log), "device": "cpu"}
    plain = FedConfig(model="tinycnn", image_size=16, class_names=CLASSES, min_metric_examples=1)
    private = FedConfig(model="tinycnn", image_size=16, class_names=CLASSES, dp_noise_multiplier=1.0,
                        min_metric_examples=1)
    replies = [deliver("query", node, plain), deliver("train", node, plain), deliver("evaluate", node, plain),
               deliver("train", {**node, "dp-budget": 1e-6}, private, 2),
               deliver("evaluate", {**node, "data-path": str(root / "gone")}, plain, 3)]
    return log, replies


def entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def leuk_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from leukfed.client.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_every_task_is_logged_with_what_left_the_site(audit_log) -> None:
    log, replies = audit_log
    logged = entries(log)
    assert [e["message"] for e in logged] == ["query", "train", "evaluate", "train-refused", "evaluate-failed"]
    assert [e["outcome"] for e in logged] == ["answered", "answered", "answered", "refused", "failed"]
    assert [e["seq"] for e in logged] == [1, 2, 3, 4, 5] and logged[0]["prev"] == GENESIS
    assert all(e["prev"] == p["hash"] for p, e in zip(logged, logged[1:]))
    plain = FedConfig(model="tinycnn", image_size=16, class_names=CLASSES, min_metric_examples=1).to_run_config()
    assert logged[1]["run_config_sha256"] == hashlib.sha256(canonical_json(plain).encode()).hexdigest()
    assert logged[0]["run_config_sha256"] == logged[1]["run_config_sha256"] != logged[3]["run_config_sha256"]
    assert all(e["run_id"] == 11 and e["site"] == "h1" for e in logged)
    query, train, evaluate, refused, failed = logged
    assert query["config_sent"] == {"info": {"class-names": ["AML", "APL"]}}
    sent = unpack_record(replies[1].content["arrays"])  # what the server receives, unpacked
    assert train["update_sha256"] == record_digest(sent) and train["arrays_sent"] == len(sent)
    assert train["round"] == 1 and train["bytes_out"] > 0 and train["seconds"] > 0
    assert train["metrics_sent"] == dict(replies[1].content["metrics"])  # names and values, exactly
    assert evaluate["metrics_sent"]["num-examples"] > 0 and evaluate["update_sha256"] is None
    assert refused["reason_sent"] == replies[3].error.reason and "privacy budget" in refused["reason_sent"]
    assert failed["reason_sent"] == replies[4].error.reason and failed["error_code"] == 3
    assert "gone" in failed["error"] and "gone" not in failed["reason_sent"]  # the detail stays at the site


def test_the_intact_log_verifies(audit_log) -> None:
    log, _ = audit_log
    report = verify_chain(log)
    assert report.ok and report.entries == 5 and report.head == entries(log)[-1]["hash"]
    result = leuk_client("audit", "verify", "--audit-log", str(log))
    assert result.returncode == 0, result.stderr
    assert "OK: 5 entries" in result.stdout


def tampered(log: Path, tmp_path: Path, change) -> Path:
    lines = log.read_text().splitlines(keepends=True)
    copy = tmp_path / "audit.jsonl"
    copy.write_text("".join(change(lines)))
    return copy


def edit_value(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["metrics_sent"]["eval_accuracy"] = 0.99  # a nicer score, written in the log's own format
    return lines[:2] + [json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"] + lines[3:]


@pytest.mark.parametrize("change, line, words", [
    (lambda lines: lines[:2] + lines[3:], 3, "entry 3 removed"),
    (lambda lines: lines[1:], 1, "entry 1 removed"),
    (edit_value, 3, "edited"),
    (lambda lines: lines[:1] + [lines[2], lines[1]] + lines[3:], 2, "reordered"),
    (lambda lines: lines[:-1] + [lines[-1][:40]], 5, "truncated"),
    (lambda lines: lines[:-1] + [lines[-1][:40] + "\n"], 5, "not a complete audit entry"),
], ids=["delete", "delete-first", "edit", "swap", "truncate-last", "cut-last"])
def test_tampering_names_the_first_broken_line(audit_log, tmp_path: Path, change, line: int, words: str) -> None:
    copy = tampered(audit_log[0], tmp_path, change)
    report = verify_chain(copy)
    assert not report.ok and report.line == line and words in report.problem, report.summary()
    result = leuk_client("audit", "verify", "--audit-log", str(copy))
    assert result.returncode == 1 and f"line {line}" in result.stdout and words in result.stdout


def test_a_rehashed_edit_is_found_at_the_next_line(audit_log, tmp_path: Path) -> None:
    from leukfed.client.audit import canonical_json, entry_hash

    def rehash(lines: list[str]) -> list[str]:
        entry = json.loads(lines[1])
        entry["bytes_out"] = 1
        entry["hash"] = entry_hash(entry)
        return lines[:1] + [canonical_json(entry) + "\n"] + lines[2:]

    report = verify_chain(tampered(audit_log[0], tmp_path, rehash))
    assert not report.ok and report.line == 3 and "line 2 was replaced" in report.problem


def test_concurrent_tasks_keep_one_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    script = ("import sys; from leukfed.client.audit import append_entry\n"
              "for i in range(25): append_entry(sys.argv[1], {'worker': sys.argv[2], 'i': i})")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(log), str(w)]) for w in range(4)]
    assert all(w.wait(timeout=120) == 0 for w in workers)
    report = verify_chain(log)
    assert report.ok and report.entries == 100, report.summary()


def test_a_damaged_last_line_stays_visible_after_new_entries(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    append_entry(log, {"task": 1})
    log.write_bytes(log.read_bytes()[:-10])   # a crash mid-line, then the site keeps working
    append_entry(log, {"task": 2})
    report = verify_chain(log)
    assert not report.ok and report.line == 1
