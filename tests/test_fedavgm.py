"""FedAvgM (`--strategy fedavgm`): the server steps along a momentum of the sites' averaged updates, keeps
BatchNorm counters integral, and a resumed run continues its momentum from the checkpoint."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from inprocess_federation import run_federation
from leukfed.common.checkpoint import load_checkpoint, save_checkpoint
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.inprocess import InProcessGrid
from leukfed.common.flower.wire import encode_state
from leukfed.server.strategies import make_strategy, strategy_state


def shifting_site(by: float) -> Callable[[Message], Message]:
    """A site whose training moves every weight by `by` and adds 2 to each BatchNorm counter."""
    def answer(message: Message) -> Message:
        if message.metadata.message_type != "train":
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10})}), reply_to=message)
        new = {k: (v.numpy() + by if v.numpy().dtype.kind == "f" else v.numpy() + 2)
               for k, v in message.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}),
                                   "metrics": MetricRecord({"num-examples": 10})}), reply_to=message)
    return answer


def test_the_server_steps_along_the_momentum_and_counters_stay_integral(monkeypatch) -> None:
    for attribute in ("_task_id", "_run_id", "_node_id"):   # as inside a Flower process: replies name their run
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    lr, beta = 1.5, 0.9
    strategy = make_strategy(FedConfig(strategy="fedavgm", fedavgm_lr=lr, server_momentum=beta, min_sites=2))
    start = {"w": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(4, dtype=torch.int64)}
    result = strategy.start(grid=InProcessGrid({11: shifting_site(0.5), 12: shifting_site(1.5)}, run_id=1),
                            initial_arrays=encode_state(start), num_rounds=2, timeout=30)
    # Each round the sites' mean moves +1: round 1 steps lr * 1, round 2 lr * (beta * 1 + 1).
    final = {k: v.numpy() for k, v in result.arrays.items()}
    np.testing.assert_allclose(final["w"], [lr * (1 + beta + 1)] * 3, rtol=1e-6)
    assert final["bn.num_batches_tracked"].dtype == np.int64
    momentum = strategy_state(strategy)["momentum_vector"]
    assert [np.shape(m) for m in momentum] == [(3,), ()]
    np.testing.assert_allclose(momentum[0], [-(beta + 1)] * 3, rtol=1e-6)   # Flower's sign: old - new


def reordering_site(by: float) -> Callable[[Message], Message]:
    """A site that sends its arrays in reverse order: Flower's FedAvgM pairs arrays by position."""
    honest = shifting_site(by)

    def answer(message: Message) -> Message:
        reply = honest(message)
        if message.metadata.message_type == "train":
            arrays = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: arrays[k] for k in reversed(list(arrays.keys()))})
        return reply
    return answer


def test_a_site_sending_its_arrays_in_another_order_cannot_mix_them_up(monkeypatch) -> None:
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    strategy = make_strategy(FedConfig(strategy="fedavgm", server_momentum=0.5, min_sites=2))
    start = {"a": torch.zeros(3), "b": torch.full((3,), 10.0)}   # same shapes: a positional mix-up is silent
    result = strategy.start(grid=InProcessGrid({11: reordering_site(1.0), 12: reordering_site(1.0)}, run_id=1),
                            initial_arrays=encode_state(start), num_rounds=2, timeout=30)
    final = {k: v.numpy() for k, v in result.arrays.items()}
    assert list(final) == ["a", "b"]
    np.testing.assert_allclose(final["a"], [1 + 1.5] * 3, rtol=1e-6)       # round 2: momentum 0.5 * 1 + 1
    np.testing.assert_allclose(final["b"], [10 + 1 + 1.5] * 3, rtol=1e-6)


def test_batchnorm_statistics_take_the_sites_mean_not_the_servers_step(monkeypatch) -> None:
    """Momentum extrapolates: a running variance falling from 1.0 to 0.1 would be stepped to 1 - 1.5 x 0.9
    = -0.35 (NaN in the next forward pass). The model's statistics take the sites' weighted mean instead."""
    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    start = {"w": torch.zeros(3), "bn.running_var": torch.ones(3), "bn.num_batches_tracked": torch.tensor(4)}

    def variance_site(message: Message) -> Message:
        reply = shifting_site(1.0)(message)
        if message.metadata.message_type == "train":
            reply.content["arrays"]["bn.running_var"] = Array(np.full(3, 0.1, dtype=np.float32))
        return reply

    for name in ("fedavgm", "fedadam"):
        statistics = frozenset({"bn.running_var", "bn.num_batches_tracked"})
        strategy = make_strategy(FedConfig(strategy=name, fedavgm_lr=1.5, server_momentum=0.9, min_sites=2),
                                 statistics=statistics)
        result = strategy.start(grid=InProcessGrid({11: variance_site, 12: variance_site}, run_id=1),
                                initial_arrays=encode_state(start), num_rounds=2, timeout=30)
        final = {k: v.numpy() for k, v in result.arrays.items()}
        np.testing.assert_allclose(final["bn.running_var"], [0.1] * 3, rtol=1e-6, err_msg=name)
        assert final["bn.running_var"].dtype == np.float32 and final["bn.num_batches_tracked"] == 8, name
        assert final["w"][0] > (2.0 if name == "fedavgm" else 0.0), name      # the weights still take the step
    fedavg = make_strategy(FedConfig(strategy="fedavg"), statistics=frozenset({"bn.running_var"}))
    assert fedavg.statistics == frozenset()   # its mean already is one


def test_bad_fedavgm_settings_are_refused_in_one_line() -> None:
    for bad in (dict(server_momentum=1.0), dict(server_momentum=-0.1), dict(fedavgm_lr=0.0)):
        with pytest.raises(LeukError, match="FedAvgM needs"):
            FedConfig(strategy="fedavgm", **bad)


def final_weights(state_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(state_dir / "checkpoint.safetensors")["model"]


def test_a_resumed_run_continues_the_momentum(tmp_path: Path, monkeypatch) -> None:
    settings = dict(strategy="fedavgm", server_momentum=0.9, fedavgm_lr=1.0)
    straight, _ = run_federation(tmp_path / "straight", monkeypatch, rounds=3, **settings)
    run_federation(tmp_path / "resumed", monkeypatch, rounds=2, **settings)
    saved = load_checkpoint(tmp_path / "resumed" / "federated-fedavgm" / "checkpoint.safetensors")["strategy_state"]
    assert len(saved["momentum_vector"]) == len(final_weights(straight))
    resumed, lines = run_federation(tmp_path / "resumed", monkeypatch, rounds=3, resume=True, **settings)
    assert not any("all 3 rounds are already complete" in line for line in lines)
    for key, value in final_weights(straight).items():
        torch.testing.assert_close(final_weights(resumed)[key], value, msg=key)


def test_restoring_a_momentum_of_another_shape_is_refused(tmp_path: Path, monkeypatch) -> None:
    state_dir, _ = run_federation(tmp_path / "run", monkeypatch, rounds=1, strategy="fedavgm")
    ckpt = load_checkpoint(state_dir / "checkpoint.safetensors")
    ckpt["strategy_state"]["momentum_vector"][0] = np.zeros((1, 2, 3), dtype=np.float32)
    save_checkpoint(state_dir / "checkpoint.safetensors", ckpt)
    with pytest.raises(LeukError, match="strategy state"):
        run_federation(tmp_path / "run", monkeypatch, rounds=2, strategy="fedavgm", resume=True)


def test_a_checkpoint_written_before_these_settings_existed_resumes(tmp_path: Path, monkeypatch) -> None:
    state_dir, _ = run_federation(tmp_path / "run", monkeypatch, rounds=1)
    path = state_dir / "checkpoint.safetensors"
    ckpt = load_checkpoint(path)
    older = {k: v for k, v in ckpt["settings"].items() if k not in ("fedavgm_lr", "server_momentum")}
    save_checkpoint(path, {**ckpt, "settings": {**older, "server_momentum": 0.9}})
    with pytest.raises(LeukError, match="server_momentum: checkpoint has 0.9, now 0.5"):
        run_federation(tmp_path / "run", monkeypatch, rounds=2, resume=True)
    save_checkpoint(path, {**ckpt, "settings": older})   # as written before the settings existed
    run_federation(tmp_path / "run", monkeypatch, rounds=2, resume=True)
    assert load_checkpoint(path)["round"] == 2
