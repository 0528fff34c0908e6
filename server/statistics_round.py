"""The statistics round: after the last round, BatchNorm statistics recomputed by the sites under the final weights."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from torch import nn

from leukfed.common.fedconfig import FedConfig
from leukfed.common.flower.wire import encode_state
from leukfed.common.site import STATISTICS_TASK
from leukfed.common.train import batchnorm_keys
from leukfed.server.registered_sites import RegisteredSites
from leukfed.server.strategies import SERVER_OPTIMIZERS, make_strategy


def running_statistics(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's BatchNorm running means and variances."""
    return [k for k in batchnorm_keys(model) if k.rpartition(".")[2] in ("running_mean", "running_var")]


def statistics_round(grid: Grid, fed: FedConfig, model: nn.Module, sites: RegisteredSites, config: dict,
                     log: Callable[[str], None]) -> bool:
    """With --bn-statistics-round N and a BatchNorm model: one more train exchange (masked under secure
    aggregation, checked by the guard like any) in which each site recomputes the statistics under `model`'s
    weights over up to N of its training batches; the run's strategy averages them (FedAvg for a server
    optimizer, whose step would move the weights) into `model`. FedAvg's own statistics are the average of
    statistics each site computed under its own weights, which the averaged weights do not match
    (benchmarks/bn_statistics.py). The weights stay exactly as they are. True when the statistics changed."""
    keys = running_statistics(model)
    if not keys:
        return False
    if fed.bn_statistics_round <= 0:
        log(f"note: the model has {len(keys) // 2} BatchNorm layers and keeps the average of statistics each site "
            "computed under its own weights; --bn-statistics-round 50 recomputes them under the final weights "
            "(benchmarks/RESULTS.md: Inception-v3 82.7 % -> 94.5 %)")
        return False
    base = "fedavg" if fed.strategy in SERVER_OPTIMIZERS else fed.strategy
    strategy = make_strategy(dataclasses.replace(fed, strategy=base, evaluate_with_train=False))
    strategy.sites = sites
    strategy.round_offset = fed.rounds   # the sites score the model with its new statistics, as after a last round
    result = strategy.start(grid=grid, initial_arrays=encode_state(model.state_dict()), num_rounds=1,
                            timeout=fed.round_timeout,
                            train_config=ConfigRecord({**config, STATISTICS_TASK: fed.bn_statistics_round}),
                            evaluate_config=ConfigRecord({"class-names": fed.class_names}))
    accepted = strategy.log.train_accepted
    if accepted <= 0:
        log("statistics round: no reply accepted; the model keeps the averaged running statistics")
        return False
    averaged = {k: torch.from_numpy(np.array(result.arrays[k].numpy(), copy=True)) for k in keys}
    model.load_state_dict({**model.state_dict(), **averaged})
    log(f"statistics round: BatchNorm statistics of {len(keys) // 2} layers recomputed under the final weights "
        f"({accepted} accepted replies, up to {fed.bn_statistics_round} batches each)")
    return True
