"""Checkpoints never unpickle: a crafted checkpoint.pt runs nothing, crafted safetensors/JSON give one line."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli_errors import assert_one_line_error
from leukfed.common.centralized import TrainConfig, train_centralized
from leukfed.common.checkpoint import load_checkpoint, save_checkpoint
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.state import load_resumed, resume_difference, save_round

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]
SERVER = [sys.executable, "-c", "from leukfed.server.cli import main; main()"]
TRAIN = ["--model", "tinycnn", "--image-size", "32", "--batch-size", "16", "--device", "cpu"]
CONFIG = TrainConfig(model="tinycnn", image_size=32, batch_size=16, device="cpu", epochs=3)


class TouchOnLoad:
    """Unpickling this creates `marker`: what an attacker's checkpoint.pt would run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_pickle(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": TouchOnLoad(marker), "epoch": 1}))
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "smears", per_class=12, size=36, seed=3)


@pytest.fixture(scope="module")
def two_epochs(smears: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    train_centralized(smears, run_dir, TrainConfig(**{**CONFIG.to_dict(), "epochs": 2}))
    return run_dir


def test_the_crafted_pickle_is_a_real_attack(tmp_path: Path) -> None:
    """The payload used below does run code when unpickled: the refusals are meaningful."""
    marker = tmp_path / "pwned"
    pickle.loads(crafted_pickle(tmp_path / "demo", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("resume", [True, False])
def test_train_refuses_a_pickled_checkpoint_without_opening_it(smears: Path, tmp_path: Path, resume: bool) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    crafted_pickle(run_dir, marker)
    result = run([*LEUK, "train", "--data", str(smears), "--out", str(run_dir), *TRAIN, "--epochs", "2",
                  *(["--resume"] if resume else [])])
    assert_one_line_error(result, "checkpoint.pt", "format changed")
    assert not marker.exists()


def test_server_refuses_a_pickled_checkpoint_without_opening_it(tmp_path: Path) -> None:
    state, marker = tmp_path / "state", tmp_path / "pwned"
    crafted_pickle(state, marker)
    result = run([*SERVER, "--state", str(state), "--resume", "--model", "tinycnn", "--rounds", "2", "--insecure",
                  "--port", "1"])
    assert_one_line_error(result, "checkpoint.pt", "format changed")
    with pytest.raises(LeukError, match="format changed"):  # what the ServerApp calls on --resume
        load_resumed(state, FedConfig(model="tinycnn", rounds=2, resume=True, state_dir=str(state)))
    assert not marker.exists()


def test_resumed_training_continues_exactly_as_an_uninterrupted_run(smears: Path, two_epochs: Path,
                                                                    tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    expected = train_centralized(smears, straight, CONFIG)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(two_epochs, resumed_dir)
    assert not list(resumed_dir.glob("*.pt"))
    got = train_centralized(smears, resumed_dir, CONFIG, resume=True)

    def rows(folder: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "time" and "seconds" not in k} for row in json.loads((folder / "history.json").read_text())]
    assert rows(resumed_dir) == rows(straight) and len(rows(straight)) == 3
    assert got["confusion_matrix"] == expected["confusion_matrix"] and got["log_loss"] == expected["log_loss"]
    a, b = load_checkpoint(straight / "checkpoint.safetensors"), load_checkpoint(resumed_dir / "checkpoint.safetensors")
    for key, value in a["optimizer"]["state"].items():  # Adam's moments and step counts, bit for bit
        for name, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][name]), (key, name)


def _tamper(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    ckpt = load_checkpoint(dst / "checkpoint.safetensors")
    change(ckpt)
    save_checkpoint(dst / "checkpoint.safetensors", ckpt)
    return dst


def _first_key(state: dict) -> str:
    return next(iter(state))


CONTENT_TAMPERING = [
    (lambda c: c["model"].update({_first_key(c["model"]): torch.zeros(3, 3)}), "does not fit"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(7)), "shape"),
    (lambda c: c.update(rng=torch.zeros(5, dtype=torch.uint8)), "does not fit"),
    (lambda c: c.update(epoch="two"), "malformed"),
    (lambda c: c.pop("history"), "malformed"),
]


@pytest.mark.slow
def test_crafted_checkpoint_content_is_one_error_line(smears: Path, two_epochs: Path, tmp_path: Path) -> None:
    run_dir = _tamper(two_epochs, tmp_path / "run", CONTENT_TAMPERING[0][0])
    result = run([*LEUK, "train", "--data", str(smears), "--out", str(run_dir), *TRAIN, "--epochs", "3", "--resume"])
    assert_one_line_error(result, "does not fit")


@pytest.mark.parametrize("change, needle", CONTENT_TAMPERING)
def test_crafted_checkpoint_content_is_a_leuk_error(smears: Path, two_epochs: Path, tmp_path: Path,
                                                    change, needle: str) -> None:
    run_dir = _tamper(two_epochs, tmp_path / "run", change)
    with pytest.raises(LeukError, match=needle):
        train_centralized(smears, run_dir, CONFIG, resume=True)


def _huge_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{" + b" " * 64)


def _not_json(path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(path), metadata={"leukfed-checkpoint": "{not json"})


def _foreign(path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(path))


def _tensor_missing(path: Path) -> None:
    tree = {"format": "leukfed-checkpoint/2", "tree": {"model": {"w": {"__tensor__": "/model/w"}}}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"leukfed-checkpoint": json.dumps(tree)})


def _deep(path: Path) -> None:
    tree = '{"format": "leukfed-checkpoint/2", "tree": ' + "[" * 100000 + "]" * 100000 + "}"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"leukfed-checkpoint": tree})


CRAFTED_FILES = [_huge_header, _not_json, _foreign, _tensor_missing, _deep, lambda p: p.write_bytes(b"")]


@pytest.mark.slow
def test_crafted_safetensors_file_is_one_error_line(smears: Path, two_epochs: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    _huge_header(run_dir / "checkpoint.safetensors")
    result = run([*LEUK, "train", "--data", str(smears), "--out", str(run_dir), *TRAIN, "--epochs", "3", "--resume"])
    assert_one_line_error(result, "checkpoint", "unreadable")


@pytest.mark.parametrize("write", CRAFTED_FILES)
def test_crafted_safetensors_file_is_a_leuk_error(smears: Path, two_epochs: Path, tmp_path: Path, write) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    write(run_dir / "checkpoint.safetensors")
    with pytest.raises(LeukError, match="checkpoint .* is unreadable"):
        train_centralized(smears, run_dir, CONFIG, resume=True)
    state = tmp_path / "state"
    state.mkdir()
    write(state / "checkpoint.safetensors")
    with pytest.raises(LeukError, match="checkpoint .* is unreadable"):
        load_resumed(state, FedConfig(model="tinycnn", rounds=2, resume=True, state_dir=str(state)))


# ---------------------------------------------------------------- federated state


def _fedadam_state(seed: int) -> tuple[dict[str, np.ndarray], dict]:
    from leukfed.server.strategies import make_strategy, strategy_state

    rng = np.random.default_rng(seed)
    model = {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
             "fc.bias": rng.standard_normal(5).astype(np.float32),
             "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    strategy = make_strategy(FedConfig(model="tinycnn", strategy="fedadam", rounds=4))
    strategy.strategy.m_t = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.items()}
    strategy.strategy.v_t = {k: rng.random(v.shape).astype(np.float32) for k, v in model.items()}
    return model, strategy_state(strategy)


def test_federated_state_round_trip_keeps_fedadam_moments(tmp_path: Path) -> None:
    from leukfed.server.strategies import make_strategy, restore_strategy_state, strategy_state

    fed = FedConfig(model="tinycnn", strategy="fedadam", rounds=4, state_dir=str(tmp_path), resume=True)
    model, moments = _fedadam_state(0)
    history = [{"round": 1, "loss": float("nan")}, {"round": 2, "loss": 0.5}]
    save_round(tmp_path, round_=2, state=model, strategy_state=moments, fed=fed, class_names=["a", "b"],
               history=history)
    assert not list(tmp_path.glob("*.pt"))
    assert resume_difference(tmp_path, fed) == []
    resumed = load_resumed(tmp_path, fed)
    assert resumed.round == 2 and resumed.class_names == ("a", "b")
    assert resumed.history[1] == history[1] and np.isnan(resumed.history[0]["loss"])
    for key, value in model.items():
        assert torch.equal(resumed.state[key], torch.from_numpy(value)), key
    strategy = make_strategy(fed)
    restore_strategy_state(strategy, resumed.strategy_state)
    again = strategy_state(strategy)
    for moment in ("m_t", "v_t"):
        for key, value in moments[moment].items():
            restored = again[moment][key]
            assert isinstance(restored, np.ndarray) and restored.dtype == value.dtype
            assert np.array_equal(restored, value), (moment, key)


def test_federated_moments_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    fed = FedConfig(model="tinycnn", strategy="fedadam", rounds=4, state_dir=str(tmp_path), resume=True)
    model, moments = _fedadam_state(1)
    moments["v_t"]["fc.bias"] = np.zeros(9, dtype=np.float32)
    save_round(tmp_path, round_=1, state=model, strategy_state=moments, fed=fed, class_names=["a", "b"],
               history=[{"round": 1}])
    with pytest.raises(LeukError, match="strategy state for fc.bias has shape"):
        load_resumed(tmp_path, fed)
    result = run([*SERVER, "--state", str(tmp_path), "--resume", "--model", "tinycnn", "--rounds", "4",
                  "--strategy", "fedadam", "--insecure", "--port", "1"])
    assert_one_line_error(result, "fc.bias")


def test_a_crafted_pretrained_weights_file_runs_nothing(tmp_path: Path) -> None:
    """`--weights FILE.pt` goes through torch.load(weights_only=True): the payload is refused, not run."""
    from leukfed.models.weights import read_state_dict

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({"model": TouchOnLoad(marker)}, weights)
    with pytest.raises(LeukError, match="cannot read weights file"):
        read_state_dict(weights)
    assert not marker.exists()
