"""The settings of one `leuk simulate` comparison (light: no torch, so the CLI can build its options)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import STRATEGIES, STRATEGY_HELP, FedConfig
from leukfed.common.settings import inherit, setting


def _run(name: str, **default):
    """A run setting `leuk simulate` shares with leuk-server: FedConfig's help, and its default unless the
    study declares its own (`default=`)."""
    return inherit(FedConfig, name, **default)


@dataclass(frozen=True)
class SimulateConfig:
    """Everything one `leuk simulate` comparison depends on: the simulation's own settings, and the run
    settings it shares with leuk-server, declared in FedConfig (`_run`) so their defaults cannot drift."""

    out: str = setting("leuk-simulation", "Output folder (re-running resumes finished methods).", "simulation")
    data: str = setting("", "Dataset folder (default: a generated smear-like dataset, no download).", "simulation")
    sites: int = setting(3, "Number of virtual hospitals.", "simulation")
    partition: str = setting("dirichlet:1.0", "iid, dirichlet:ALPHA, patient or quantity:W1,W2,... (default: each "
                             "site its own case mix).", "simulation")
    model: str = _run("model")
    strategies: tuple[str, ...] = setting(("fedavg",), "One or more, comma-separated: " + STRATEGY_HELP + ".",
                                          "simulation", cli=False)
    rounds: int = _run("rounds", default=5)
    local_epochs: int = _run("local_epochs", default=2)
    image_size: int = _run("image_size")
    batch_size: int = _run("batch_size")
    lr: float = _run("lr")
    optimizer: str = _run("optimizer")
    weight_decay: float = _run("weight_decay")
    augment: str = _run("augment")
    bn_recalibration: int = _run("bn_recalibration")
    bn_statistics_round: int = _run("bn_statistics_round")
    local_batchnorm: bool = _run("local_batchnorm")
    local_optimizer_state: bool = _run("local_optimizer_state")
    proximal_mu: float = _run("proximal_mu")
    server_lr: float = _run("server_lr")
    fedavgm_lr: float = _run("fedavgm_lr")
    server_momentum: float = _run("server_momentum")
    pretrained: str = _run("pretrained")
    seed: int = _run("seed")
    split: str = setting("", "Split JSON (default: make one).", "simulation")
    baselines: bool = setting(True, "Also train centralized and local-only.", "simulation")
    cpus_per_site: float = setting(1.0, "CPU share of each virtual site.", "simulation")
    gpus_per_site: float = setting(0.0, "GPU share of each virtual site.", "simulation")
    synthetic_per_class: int = setting(400, "Images per class of the generated dataset (400: a test set of 240 "
                                       "images).", "simulation")
    faults: str = setting("", "Misbehaving sites for robustness studies, e.g. 0:signflip,2:nan (kinds: nan, "
                          "signflip[:SCALE], noise[:SIGMA], labelflip).", "simulation", flag="--faulty")
    evaluate_every: int = _run("evaluate_every")
    transfer_dtype: str = _run("transfer_dtype")
    secure_aggregation: bool = _run("secure_aggregation")
    dp_noise_multiplier: float = _run("dp_noise_multiplier")
    dp_max_grad_norm: float = _run("dp_max_grad_norm")
    tracking: str = _run("tracking")
    seeds: str = setting("", "Comma-separated seeds, e.g. 0,1,2: the whole comparison (partition, initialisation, "
                         "data order) once per seed under OUT/seed-K, then mean, spread and 95% CIs across seeds "
                         "(empty: once, with --seed).", "simulation")
    bootstrap: int = setting(1000, "Bootstrap resamples for the 95% confidence intervals and paired tests on the "
                             "test set (0: none).", "simulation")

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise LeukError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        if self.sites < 2:
            raise LeukError("a simulation needs at least 2 sites")
        if self.rounds < 1 or self.local_epochs < 1:
            raise LeukError("rounds and local epochs must be >= 1")
        if self.bootstrap < 0:
            raise LeukError("bootstrap resamples must be >= 0")
        self.seed_list()

    def seed_list(self) -> tuple[int, ...]:
        """The seeds of `seeds` (LeukError unless distinct integers); empty when not given."""
        parts = [p.strip() for p in self.seeds.split(",") if p.strip()]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise LeukError(f"--seeds takes comma-separated integers, not {self.seeds!r}") from None
        if len(set(values)) != len(values):
            raise LeukError(f"--seeds repeats a seed: {self.seeds!r}")
        return values

    def digest(self) -> str:
        """What trained models depend on: every setting but the statistics' own (seeds, bootstrap)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in STATISTICS_ONLY
                    and not (k in LATER_SETTINGS and v == FIELD_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


STATISTICS_ONLY = ("seeds", "bootstrap")
# Settings added after studies were recorded: at their default they leave the digest as it was, so that
# re-running such a study resumes the methods it finished.
LATER_SETTINGS = ("fedavgm_lr", "server_momentum", "bn_statistics_round")
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SimulateConfig)}
