"""What the server saw in one round: filled in by the guarded strategy, read by the ServerApp's hooks."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundLog:
    """Per-site metrics, failures, rejections, bytes and timings of one round."""

    started: float = 0.0
    aggregation_seconds: float = 0.0
    train_phase_seconds: float = 0.0
    evaluate_phase_started: float = 0.0
    evaluate_phase_seconds: float = 0.0
    sites_sampled: list[int] = field(default_factory=list)
    train: dict[int, dict] = field(default_factory=dict)       # node id -> metrics
    evaluate: dict[int, dict] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)         # train and evaluation replies
    train_accepted: int = 0                                     # train replies that reached the aggregate
    ignored: list[dict] = field(default_factory=list)          # replies from nodes the coordinator did not register
    bytes_sent: int = 0
    bytes_received: int = 0
    aggregated_train: dict = field(default_factory=dict)
    aggregated_evaluate: dict = field(default_factory=dict)
    evaluated_round: int = 0    # the earlier round whose model the sites scored in this round's train task
    evaluate_in_train: dict[int, dict] = field(default_factory=dict)   # node id -> those metrics
    aggregated_evaluate_in_train: dict = field(default_factory=dict)
