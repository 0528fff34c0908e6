"""Flower strategies by name, each wrapped in the guard; the strategy state a checkpoint carries."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum

from leukfed.common.fedconfig import FedConfig
from leukfed.server.guard import GuardedStrategy, GuardSettings
from leukfed.server.registered_sites import RegisteredSites

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
         "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}

# FedAdam/FedYogi moments (per array name) and FedAvgM's momentum (a list in the model's order): the strategy
# state a checkpoint must carry. Each strategy takes its current model from the first round's arrays.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def guard_settings(fed: FedConfig) -> GuardSettings:
    # Sites can score the model inside the train task only when every site trains every round and sees
    # the plain train message.
    with_train = fed.evaluate_with_train and fed.fraction_train >= 1.0 and not fed.secure_aggregation
    patients = fed.task == "patients"   # scored once, in the calibration round (server/patient_federation.py)
    return GuardSettings(min_noise_multiplier=fed.dp_min_noise_multiplier, max_examples=fed.max_examples_per_site,
                         max_update_norm=fed.max_update_norm, evaluate_every=0 if patients else fed.evaluate_every,
                         rounds=fed.rounds,
                         evaluate_with_train=with_train and not patients)


# Strategies that step the global model with a server optimizer (momentum, Adam): applied to BatchNorm's
# running statistics that step extrapolates them (a running variance turned negative: NaN on round 2 of
# Inception-v3 under FedAvgM), so their model statistics take the sites' weighted mean instead.
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi")


def make_strategy(fed: FedConfig, statistics: frozenset[str] = frozenset()) -> GuardedStrategy:
    """The named Flower strategy, wrapped in the guard for the run's registered sites. `statistics`: the
    model's buffers (BatchNorm running statistics and counters), averaged rather than stepped by a server
    optimizer."""
    evaluate = 0.0 if fed.task == "patients" else 1.0   # the patient task's calibration round is its own
    common = dict(fraction_train=fed.fraction_train, fraction_evaluate=evaluate, min_train_nodes=fed.min_sites,
                  min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites)
    extra = {"fedprox": {"proximal_mu": fed.proximal_mu}, "fedadam": {"eta": fed.server_lr},
             "fedavgm": {"server_learning_rate": fed.fedavgm_lr, "server_momentum": fed.server_momentum},
             "fedyogi": {"eta": fed.server_lr}, "fedtrimmedavg": {"beta": fed.trim_beta},
             "krum": {"num_malicious_nodes": fed.krum_malicious}}.get(fed.strategy, {})
    strategy = BASES[fed.strategy](**common, **extra)
    guarded = GuardedStrategy(strategy, guard_settings(fed), RegisteredSites.parse(fed.registered_sites))
    guarded.statistics = statistics if fed.strategy in SERVER_OPTIMIZERS else frozenset()
    return guarded


def strategy_state(strategy: GuardedStrategy) -> dict:
    inner = strategy.strategy
    return {k: getattr(inner, k) for k in STATE_ATTRIBUTES if getattr(inner, k, None) is not None}


def restore_strategy_state(strategy: GuardedStrategy, state: dict) -> None:
    for key, value in state.items():
        setattr(strategy.strategy, key, value)
