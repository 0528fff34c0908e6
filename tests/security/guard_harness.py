"""An in-process federation for the guard's security tests: real ClientApps, replies through protobuf,
Flower's own `strategy.start` loop; each hospital sends what the test scripts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from leukfed.common.flower import inprocess as inprocess_grid

from leukfed.common.fedconfig import FedConfig
from leukfed.server.strategies import make_strategy


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps the run id on every Message it builds; the ServerApp process sets it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=5).astype(np.float32),
            "bn.num_batches_tracked": np.array(4, np.int64)}


@dataclass
class Hospital:
    """Adds `scale` x a small random step to the global model and reports `examples`."""

    seed: int
    examples: object = 50
    scale: float = 1.0
    asked: list[str] = field(default_factory=list)   # message types this hospital received
    reshape: Callable[[RecordDict], RecordDict] | None = None   # what a lying ClientApp makes of its replies
    error: str | None = None                                     # replies with this error instead

    def reply(self, content: RecordDict, msg: Message) -> Message:
        if self.error is not None:
            return Message(Error(0, self.error), reply_to=msg)
        return Message(self.reshape(content) if self.reshape else content, reply_to=msg)

    def update(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {k: (v + self.scale * rng.normal(scale=0.05, size=v.shape)).astype(v.dtype) if v.dtype.kind == "f"
                else v for k, v in arrays.items()}


def client_app(hospitals: dict[int, Hospital]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        hospital = hospitals[context.node_id]
        hospital.asked.append("train")
        new = hospital.update({k: v.numpy() for k, v in msg.content["arrays"].items()})
        return hospital.reply(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}),
                                          "metrics": MetricRecord({"num-examples": hospital.examples,
                                                                   "train_loss": 0.5})}), msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        hospital = hospitals[context.node_id]
        hospital.asked.append("evaluate")
        return hospital.reply(RecordDict({"metrics": MetricRecord({"num-examples": hospital.examples,
                                                                   "eval_accuracy": 0.1 * (context.node_id % 10)})}),
                              msg)

    return app


class InProcessGrid(inprocess_grid.InProcessGrid):
    """Delivers each message to its hospital's ClientApp. `online` lists the connected nodes (it may
    grow with every look); `extra_replies(message)` adds replies no site was asked for."""

    def __init__(self, hospitals: dict[int, Hospital], online=None, extra_replies=None) -> None:
        self.hospitals, self.app = hospitals, client_app(hospitals)
        super().__init__(dict.fromkeys(hospitals, self.ask), online=online, extra_replies=extra_replies)

    def ask(self, message: Message) -> Message:
        return self.app(message, Context(7, message.metadata.dst_node_id, {}, RecordDict(), {}))


@dataclass
class RoundOutcome:
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    strategy: object
    evaluate: dict


def one_round(grid: InProcessGrid, **settings) -> RoundOutcome:
    """One round of Flower's own loop with the guarded strategy; the global model before and after."""
    strategy = make_strategy(FedConfig(rounds=1, **settings))
    seen: dict[int, dict[str, np.ndarray]] = {}

    def record(current_round: int, arrays: ArrayRecord) -> None:
        seen[current_round] = {k: v.numpy() for k, v in arrays.items()}

    start = ArrayRecord({k: Array(v) for k, v in initial_arrays().items()})
    strategy.start(grid=grid, initial_arrays=start, num_rounds=1, timeout=30, evaluate_fn=record)
    return RoundOutcome(seen[0], seen[1], strategy, dict(strategy.log.aggregated_evaluate))
