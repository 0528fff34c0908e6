"""FedAvg/FedProx aggregate in one fused pass over the reply bytes (FusedMean): the same result as Flower's
FedAvg (to float32 rounding; bit for bit when an update was rejected), the same rejections, norms and
round log as the guard's materialised path, for float32, float16 and bfloat16 replies."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from leukfed.common.flower.wire import (PACKED_KEY, NpyError, decode_arrays, encode_state, npy_header, npy_header_for,
                                    pack_record, record_digest, unpack_record)
from leukfed.common.fedconfig import FedConfig
from leukfed.server.grids import _unpacked
from leukfed.server.fused_mean import FusedMean
from leukfed.server.guard import _plain_weighted_mean
from leukfed.server.round_log import RoundLog
from leukfed.server.reply_checks import check_consistency
from leukfed.server.strategies import make_strategy

DTYPES = ["float32", "float16", "bfloat16"]
# The compiled loop (numba, installed with the test extra) and the numpy/torch loop that runs without it.
LOOPS = [pytest.param(True, id="compiled"), pytest.param(False, id="numpy")]


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model's state dict: arrays larger than a chunk, small packed ones, an int64 counter,
    an empty array."""
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 3, 5, 5, generator=g),    # 600: several 64-element chunks
            "conv.bias": torch.randn(8, generator=g),
            "bn.weight": torch.rand(8, generator=g) + 0.5,
            "bn.running_mean": torch.randn(8, generator=g),
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
            "empty": torch.zeros(0),
            "fc.weight": torch.randn(4, 37, generator=g),             # 148: not a multiple of the chunk
            "fc.bias": torch.randn(4, generator=g)}


def reply(node: int, record: ArrayRecord | None, examples: int, **metrics) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train_loss": 0.1 * node, **metrics})})
    if record is not None:
        content["arrays"] = record
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"q{node}", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type="train")
    return Message(content, metadata=metadata)


def updates(state: dict, n: int, dtype: str, seed: int = 1) -> list[Message]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        new = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + i)
               for k, v in state.items()}
        out.append(reply(100 + i, encode_state(new, dtype), examples=10 + 7 * i))
    return out


def copy_reply(msg: Message) -> Message:
    """A fresh reply per run (the materialised path replaces content["arrays"])."""
    if msg.has_error():
        return msg
    return Message(RecordDict(dict(msg.content.items())), metadata=msg.metadata)


def aggregate(strategy_name: str, state: dict, replies: list[Message], fused: bool, chunk: int = 64,
              min_noise: float = 0.0, compiled: bool | None = None):
    fed = FedConfig(strategy=strategy_name, min_sites=1, dp_min_noise_multiplier=min_noise,
                    dp_noise_multiplier=max(min_noise, 0.0))
    strategy = make_strategy(fed)
    strategy.fused_mean = fused
    strategy._fused = FusedMean(chunk=chunk, pack_below=16, compiled=compiled)    # small chunks: exercise chunking and packing
    strategy.log = RoundLog(started=time.perf_counter())
    strategy.reference = {k: v.numpy() for k, v in encode_state(state).items()}
    arrays, metrics = strategy.aggregate_train(1, [copy_reply(m) for m in replies])
    return arrays, metrics, strategy.log


def flower_fedavg(replies: list[Message], reference: dict) -> dict[str, np.ndarray]:
    """What Flower's FedAvg computes on the widened replies, integer buffers rounded back."""
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, order="C"))
                                                   for k, v in decode_arrays(m.content["arrays"]).items()}),
                            "metrics": m.content["metrics"]}) for m in replies]
    result = aggregate_arrayrecords(contents, "num-examples")
    out = {}
    for key, array in result.items():
        value = array.numpy()
        dtype = reference[key].dtype
        out[key] = (np.rint(value) if dtype.kind in "iu" else value).astype(dtype)
    return out


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def assert_same_log(fused: RoundLog, materialised: RoundLog) -> None:
    assert fused.rejected == materialised.rejected
    assert fused.failures == materialised.failures
    assert fused.bytes_received == materialised.bytes_received
    assert fused.aggregated_train == pytest.approx(materialised.aggregated_train)
    assert set(fused.train) == set(materialised.train)
    for node, metrics in materialised.train.items():
        assert set(fused.train[node]) == set(metrics)
        assert fused.train[node] == pytest.approx(metrics, rel=1e-5)


@pytest.mark.parametrize("compiled", LOOPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clean_round_matches_flower_fedavg(dtype: str, compiled: bool) -> None:
    state = model_state()
    reference = {k: v.numpy() for k, v in encode_state(state).items()}
    replies = updates(state, 4, dtype)
    arrays, metrics, log = aggregate("fedavg", state, replies, fused=True, compiled=compiled)
    expected = flower_fedavg(replies, reference)
    got = as_numpy(arrays)
    assert list(got) == list(reference)
    for key, want in expected.items():
        assert got[key].dtype == reference[key].dtype and got[key].shape == reference[key].shape, key
        if want.dtype.kind in "iu":
            assert np.array_equal(got[key], want), key      # 7 + mean(0..3) = 8.5 -> rint: 8
        else:
            np.testing.assert_allclose(got[key], want, rtol=2e-6, atol=1e-6, err_msg=key)
    _, materialised_metrics, materialised_log = aggregate("fedavg", state, replies, fused=False)
    assert_same_log(log, materialised_log)
    assert dict(metrics) == pytest.approx(dict(materialised_metrics))
    assert not log.rejected and all("update_norm" in m for m in log.train.values())


@pytest.mark.parametrize("compiled", LOOPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_updates_are_rejected_as_before_and_the_rest_is_flowers_mean(dtype: str, compiled: bool) -> None:
    state = model_state()
    reference = {k: v.numpy() for k, v in encode_state(state).items()}
    replies = updates(state, 6, dtype)
    nan = {k: v.clone() for k, v in state.items()}
    nan["fc.weight"][3, 36] = float("nan")                      # in the last chunk of a chunked array
    inf = {k: v.clone() for k, v in state.items()}
    inf["bn.running_mean"][2] = float("inf")                     # in a packed chunk
    wrong_shape = {**state, "fc.weight": torch.zeros(37, 4)}
    outlier = {k: (v * 100.0 if v.is_floating_point() else v) for k, v in state.items()}
    for i, bad in enumerate((nan, inf, wrong_shape, outlier)):
        replies[i].content["arrays"] = encode_state(bad, dtype)
    replies.append(reply(900, None, examples=5))                 # no arrays
    replies.append(Message(Error(code=1, reason="site crashed"), reply_to=replies[0]))
    arrays, metrics, log = aggregate("fedavg", state, replies, fused=True, compiled=compiled)
    _, materialised_metrics, materialised_log = aggregate("fedavg", state, replies, fused=False)
    assert_same_log(log, materialised_log)
    reasons = {r["node"]: r["reason"] for r in log.rejected}
    assert set(reasons) == {100, 101, 102, 103, 900}
    assert "fc.weight contains NaN or Inf" in reasons[100] and "bn.running_mean contains NaN or Inf" in reasons[101]
    assert "shape" in reasons[102] and "cohort median" in reasons[103] and reasons[900] == "no arrays in reply"
    assert "update_norm" in log.train[103] and "update_norm" not in log.train[100]
    assert dict(metrics) == pytest.approx(dict(materialised_metrics))
    # A rejection after the fused pass sums the kept updates again with FedAvg's own operations.
    expected = flower_fedavg(replies[4:6], reference)
    got = as_numpy(arrays)
    for key, want in expected.items():
        assert np.array_equal(got[key], want), key


def test_fedprox_uses_the_fused_path_and_robust_strategies_do_not() -> None:
    assert _plain_weighted_mean(make_strategy(FedConfig(strategy="fedavg")))
    assert _plain_weighted_mean(make_strategy(FedConfig(strategy="fedprox")))
    for name in ("fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"):
        assert not _plain_weighted_mean(make_strategy(FedConfig(strategy=name))), name
    state = model_state()
    replies = updates(state, 3, "float32")
    fused, _, _ = aggregate("fedprox", state, replies, fused=True)
    materialised, _, _ = aggregate("fedprox", state, replies, fused=False)
    for key, value in as_numpy(materialised).items():
        np.testing.assert_allclose(as_numpy(fused)[key], value, rtol=2e-6, atol=1e-6)


def test_results_of_earlier_rounds_stay_intact() -> None:
    """Each round's result is handed over as fresh bytes: the next round must not write into them."""
    state = model_state()
    strategy = make_strategy(FedConfig(strategy="fedavg", min_sites=1))
    strategy._fused = FusedMean(chunk=64, pack_below=16)
    strategy.reference = {k: v.numpy() for k, v in encode_state(state).items()}
    strategy.log = RoundLog(started=time.perf_counter())
    first, _ = strategy.aggregate_train(1, updates(state, 3, "float32", seed=1))
    snapshot = {k: v.data for k, v in first.items()}
    copies = {k: bytes(v) for k, v in snapshot.items()}
    for rnd in (2, 3):
        strategy.log = RoundLog(started=time.perf_counter())
        later, _ = strategy.aggregate_train(rnd, updates(state, 3, "float32", seed=rnd))
        assert later["conv.weight"].data != copies["conv.weight"]
    assert all(first[k].data == copies[k] for k in copies)


def test_dp_noise_policy_and_its_order_with_nan() -> None:
    state = model_state()
    replies = updates(state, 3, "float32")
    replies[0].content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": 0.0})      # no DP noise
    nan = {k: v.clone() for k, v in state.items()}
    nan["conv.weight"][0, 0, 0, 0] = float("nan")
    replies[1].content["arrays"] = encode_state(nan)
    replies[1].content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": 0.0})      # NaN and no noise
    replies[2].content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": 0.0, "dp_noise_multiplier": 1.5})
    _, _, log = aggregate("fedavg", state, replies, fused=True, min_noise=1.0)
    _, _, materialised_log = aggregate("fedavg", state, replies, fused=False, min_noise=1.0)
    assert_same_log(log, materialised_log)
    reasons = {r["node"]: r["reason"] for r in log.rejected}
    assert "no DP noise" in reasons[100] and "NaN" in reasons[101] and 102 not in reasons


def test_a_reply_flowers_checks_would_refuse_is_rejected_not_fatal() -> None:
    """Flower raises InconsistentMessageReplies (the run ends) for a reply without its example count; the
    guard refuses that reply alone, before Flower sees it."""
    state = model_state()
    replies = updates(state, 3, "float32")
    replies[1].content["metrics"] = MetricRecord({"train_loss": 0.0})          # no num-examples
    for fused in (True, False):
        arrays, _, log = aggregate("fedavg", state, replies, fused=fused)
        assert [(r["node"], r["reason"]) for r in log.rejected] == [(101, "no num-examples in the metrics")]
        assert arrays is not None
    with pytest.raises(InconsistentMessageReplies):                           # what Flower alone would do
        check_consistency(replies, "num-examples")


def test_large_arrays_and_default_chunks() -> None:
    """The production chunk size, with an array spanning several chunks and NaN deep inside it."""
    rng = np.random.default_rng(0)
    state = {"big.weight": torch.from_numpy(rng.standard_normal(300_001, dtype=np.float32)),
             "small.bias": torch.from_numpy(rng.standard_normal(10, dtype=np.float32)),
             "bn.num_batches_tracked": torch.tensor(3)}
    reference = {k: v.numpy() for k, v in encode_state(state).items()}
    replies = updates(state, 3, "float32")
    strategy = make_strategy(FedConfig(strategy="fedavg", min_sites=1))
    strategy.reference, strategy.log = reference, RoundLog(started=time.perf_counter())
    arrays, _ = strategy.aggregate_train(1, [copy_reply(m) for m in replies])
    expected = flower_fedavg(replies, reference)
    for key, want in expected.items():
        np.testing.assert_allclose(as_numpy(arrays)[key], want, rtol=2e-6, atol=1e-6, err_msg=key)
    nan = {k: v.clone() for k, v in state.items()}
    nan["big.weight"][250_000] = float("nan")
    replies[0].content["arrays"] = encode_state(nan)
    strategy.log = RoundLog(started=time.perf_counter())
    arrays, _ = strategy.aggregate_train(2, [copy_reply(m) for m in replies])
    assert [r["node"] for r in strategy.log.rejected] == [100]
    expected = flower_fedavg(replies[1:], reference)
    assert all(np.array_equal(as_numpy(arrays)[k], v) for k, v in expected.items())


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_records_travel_as_one_array_and_unpack_to_the_same_bytes(dtype: str) -> None:
    record = encode_state(model_state(), dtype)
    packed = pack_record(record)
    assert list(packed.keys()) == [PACKED_KEY] and packed[PACKED_KEY].numpy().dtype == np.uint8
    assert packed.count_bytes() - record.count_bytes() < 60 * len(record) + 200   # the index, one header
    restored = unpack_record(packed)
    assert list(restored.keys()) == list(record.keys()) and record_digest(restored) == record_digest(record)
    for key, array in record.items():
        assert (restored[key].dtype, restored[key].shape, restored[key].stype) == (array.dtype, array.shape, array.stype)
    one = ArrayRecord({"vector": Array(np.arange(5.0))})
    assert pack_record(one) is one and unpack_record(one) is one                # nothing to gain from one array


def test_damaged_packs_are_refused_and_rejected_by_the_guard() -> None:
    state = model_state()
    data = pack_record(encode_state(state))[PACKED_KEY].data
    offset = npy_header(data)[5]                                  # where the packed payload starts

    def packed(payload: bytes) -> ArrayRecord:
        return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(payload),), stype="numpy.ndarray",
                                              data=npy_header_for((len(payload),), np.uint8) + payload)})

    payload = data[offset:]
    for bad in (payload[:-3], payload + b"\0", payload[:8] + b"{" + payload[9:], payload[:4]):
        with pytest.raises(NpyError):                              # truncated, trailing bytes, broken index
            unpack_record(packed(bad))
    replies = updates(state, 3, "float32")
    replies[0].content["arrays"] = packed(payload[:-3])
    arrived = [_unpacked(m) for m in replies]                     # what the ServerApp's grid hands on
    assert PACKED_KEY in arrived[0].content["arrays"]            # left as it came
    _, _, log = aggregate("fedavg", state, arrived, fused=True)
    assert [r["node"] for r in log.rejected] == [100]            # rejected; the round goes on with the rest
    assert "::packed" in log.rejected[0]["reason"]
