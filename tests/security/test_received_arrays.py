"""A malicious server's model message (huge or mis-shaped arrays) is refused from its headers, before any copy."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SType
from flwr.supercore.task_identity import TaskIdentity

from leukfed.client.client_app import app
from leukfed.common.flower.wire import encode_state, npy_header_for, pack_record
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.common.fedconfig import FedConfig
from leukfed.models import create_model
from site_policies import lenient_policy

FED = FedConfig(model="tinycnn", image_size=16, class_names="AML,APL", min_metric_examples=1)
HUGE = (200_000, 100_000)   # 80 GB of float32 if anything believed the header


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("site") / "hospital", per_class=6, size=24,
                                  classes=("AML", "APL"))


def honest() -> ArrayRecord:
    return encode_state(create_model("tinycnn", 2, image_size=16).state_dict())


def lying_array(shape: tuple[int, ...], payload: int = 64) -> Array:
    """An Array whose fields and .npy header declare `shape` but that carries only `payload` bytes."""
    data = npy_header_for(shape, np.float32) + b"\0" * payload
    return Array(dtype="float32", shape=shape, stype=SType.NUMPY, data=data)


def deliver(site: Path, arrays: ArrayRecord, tmp_path: Path, message_type: str = "evaluate",
            **node) -> tuple[Message, int]:
    """The model message through the real ClientApp; returns the reply and Python's peak allocation."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 22, 1
    context = Context(run_id=11, node_id=22, state=RecordDict(), run_config=FED.to_run_config(),
                      node_config={"data-path": str(site), "site-name": "h1", "device": "cpu",
                                   "audit-log": str(tmp_path / "audit.jsonl"),
                                   **lenient_policy(), **node})
    message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=22, message_type=message_type)
    app(Message(RecordDict(), dst_node_id=22, message_type="query"), context)  # warm: imports, model layout
    tracemalloc.start()
    try:
        reply = app(message, context)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return reply, peak


def assert_refused(reply: Message, tmp_path: Path) -> None:
    assert reply.has_error() and reply.error.reason.startswith(
        "site error 4: the received model does not match this site's model")
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "failed" and last["error_code"] == 4


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_a_header_declaring_gigabytes_is_refused_before_allocation(site: Path, tmp_path: Path, packed: bool) -> None:
    record = honest()
    record["fc.weight"] = lying_array(HUGE)
    reply, peak = deliver(site, pack_record(record) if packed else record, tmp_path)
    assert_refused(reply, tmp_path)
    assert peak < 20 * 2**20, peak          # nothing near the declared 80 GB (nor a copy of the message)


def test_a_data_header_that_contradicts_the_array_fields_is_refused(site: Path, tmp_path: Path) -> None:
    record = honest()
    shape = tuple(record["fc.weight"].shape)
    data = npy_header_for(HUGE, np.float32) + b"\0" * 64           # fields say the model's shape, bytes do not
    record["fc.weight"] = Array(dtype="float32", shape=shape, stype=SType.NUMPY, data=data)
    reply, peak = deliver(site, pack_record(record), tmp_path, "train")
    assert_refused(reply, tmp_path)
    assert peak < 20 * 2**20, peak


def test_extra_megabytes_under_an_unknown_key_are_not_copied(site: Path, tmp_path: Path) -> None:
    record = honest()
    record["padding"] = Array(np.ones(16 * 2**20, dtype=np.float32))    # 64 MB the site's model lacks
    reply, peak = deliver(site, pack_record(record), tmp_path)
    assert_refused(reply, tmp_path)
    assert peak < 16 * 2**20, peak           # unpacking would have copied all 64 MB


@pytest.mark.parametrize("change", ["three classes", "float64", "missing key", "object array"])
def test_mis_shaped_models_are_refused(site: Path, tmp_path: Path, change: str) -> None:
    if change == "three classes":
        record = encode_state(create_model("tinycnn", 3, image_size=16).state_dict())
    else:
        record = honest()
        key = next(k for k in record.keys() if k.endswith("weight"))
        if change == "float64":
            record[key] = Array(record[key].numpy().astype(np.float64))
        elif change == "missing key":
            del record[key]
        else:
            record[key] = Array(dtype="object", shape=(2,), stype=SType.NUMPY,   # np.load would unpickle
                                data=npy_header_for((2,), object) + b"\x80\x04N." * 2)
    reply, _ = deliver(site, pack_record(record), tmp_path, "train")
    assert_refused(reply, tmp_path)


def test_a_site_limit_on_model_bytes_is_kept(site: Path, tmp_path: Path) -> None:
    reply, _ = deliver(site, pack_record(honest()), tmp_path, **{"max-model-mb": 0.001})
    assert_refused(reply, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_honest_model_in_every_transfer_dtype_is_accepted(site: Path, tmp_path: Path, dtype: str) -> None:
    record = encode_state(create_model("tinycnn", 2, image_size=16).state_dict(), dtype)
    reply, _ = deliver(site, pack_record(record), tmp_path)
    assert not reply.has_error(), reply.error.reason
    assert dict(reply.content["metrics"])["num-examples"] > 0
