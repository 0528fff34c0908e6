"""What a site actually sends: model arrays and numeric aggregates only; never pixels, names or IDs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.client_app import app
from leukfed.client.audit import verify_chain
from leukfed.common.flower.wire import PACKED_KEY, encode_state, record_digest, unpack_record
from leukfed.common.fedconfig import FedConfig
from leukfed.models import create_model
from site_policies import lenient_policy


def deliver(message_type: str, site_data: Path, tmp_path: Path, *, config: dict | None = None,
            min_metric_examples: int = 1) -> tuple[Message, dict]:
    """Run the real ClientApp on one message, as Flower's runtime does, and return its reply."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, 1  # as Flower sets per task
    fed = FedConfig(model="tinycnn", image_size=16, class_names="AML,APL", min_metric_examples=min_metric_examples)
    model = create_model("tinycnn", 2, image_size=16)
    content = RecordDict({"arrays": encode_state(model.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **(config or {})})})
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=fed.to_run_config(),
                      node_config={"data-path": str(site_data), "site-name": "h1",
                                   "audit-log": str(tmp_path / "audit.jsonl"), **lenient_policy()})
    reply = app(Message(content, dst_node_id=22, message_type=message_type), context)
    assert not reply.has_error(), reply.error
    return reply, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def secrets_of(site_data: Path) -> set[str]:
    """Every file name, folder name (patients, cell types) of the site's data."""
    names = set()
    for path in site_data.rglob("*"):
        names.add(path.name)
        names.add(path.stem)
    return {n for n in names if len(n) > 3}


def test_a_training_reply_holds_only_model_arrays_and_numbers(site_data: Path, tmp_path: Path) -> None:
    reply, state = deliver("train", site_data, tmp_path)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    wire = reply.content["arrays"]
    assert list(wire.keys()) == [PACKED_KEY]  # on the wire: one packed Array (client/records.py)
    arrays = unpack_record(wire)
    assert set(arrays.keys()) == set(state)  # exactly the model's tensors, nothing else
    for key, array in arrays.items():
        assert array.numpy().shape == state[key].shape
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in metrics.values())
    serialized = json.dumps(metrics) + " ".join(arrays.keys())
    for secret in secrets_of(site_data):
        assert secret not in serialized, secret
        assert secret.encode() not in wire[PACKED_KEY].data, secret  # nor anywhere in the bytes sent


def test_the_audit_log_records_what_left_the_site(site_data: Path, tmp_path: Path) -> None:
    reply, _ = deliver("train", site_data, tmp_path)
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["message"] == "train" and entry["run_id"] == 11
    assert entry["bytes_out"] > 0 and len(entry["update_sha256"]) == 64
    assert entry["metrics_sent"]["num-examples"] > 0
    assert entry["outcome"] == "answered" and entry["arrays_sent"] == len(unpack_record(reply.content["arrays"]))
    assert entry["update_sha256"] == record_digest(unpack_record(reply.content["arrays"]))  # what the server gets
    assert verify_chain(tmp_path / "audit.jsonl").ok  # hash-chained (tests/security/test_audit_chain.py)


def test_metrics_on_fewer_than_k_examples_are_suppressed(site_data: Path, tmp_path: Path) -> None:
    reply, _ = deliver("evaluate", site_data, tmp_path, min_metric_examples=10_000)
    metrics = dict(reply.content["metrics"])
    assert "eval_accuracy" not in metrics and "eval_loss" not in metrics
    assert set(metrics) <= {"num-examples", "client_seconds"}
    reply, _ = deliver("evaluate", site_data, tmp_path, min_metric_examples=1)
    assert "eval_accuracy" in dict(reply.content["metrics"])


def test_a_task_frees_the_last_tasks_records_whatever_the_cycle_collector_does(site_data: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """Flower's records sit in reference cycles; a simulation actor serving one site after another must not
    keep every past task's model-sized buffers until Python's collector happens to run."""
    import gc

    from flwr.app import Array

    from leukfed.client import client_app

    def garbage_bytes() -> int:
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = sum(len(o.data) for o in gc.garbage if isinstance(o, Array))
        gc.set_debug(0)
        gc.garbage.clear()
        return found

    def left_after(tasks: int) -> int:
        garbage_bytes()
        for _ in range(tasks):
            deliver("train", site_data, tmp_path)
        return garbage_bytes()

    gc.collect()
    gc.disable()        # the worst case: the collector does not run by itself between tasks
    try:
        small = left_after(4)                   # tinycnn's few kB: under the threshold, left to Python
        monkeypatch.setattr(client_app, "COLLECT_ABOVE_BYTES", 1)   # as if this model were VGG16's 0.54 GB
        one_task, four_tasks = left_after(1), left_after(4)
    finally:
        gc.enable()
    assert one_task > 0                     # what one task leaves to the collector (its reply's records)
    assert four_tasks == one_task           # not four tasks' worth: each task freed the one before
    assert small == 4 * one_task            # below the threshold no task pays for a full collection
