"""Federated settings, each with one home: run-wide (run config), per site (node config), per round."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from leukfed.common.errors import LeukError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class FedConfig:
    """Run-wide settings, identical for every site; travels as Flower's run config."""

    model: str = "tinycnn"
    class_names: str = ""              # comma-separated; empty: asked from the sites
    image_size: int = 0                # 0: the model's default
    pretrained: str = "auto"
    rounds: int = 3
    strategy: str = "fedavg"
    local_epochs: int = 1
    local_steps: int = 0               # > 0: a fixed number of batches per round instead of epochs
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    loss: str = "ce"
    label_smoothing: float = 0.0
    augment: str = "paper002"
    proximal_mu: float = 0.01          # FedProx only
    server_lr: float = 0.01            # FedAdam / FedYogi eta
    trim_beta: float = 0.2             # FedTrimmedAvg
    krum_malicious: int = 1            # Krum's assumed number of malicious sites
    min_sites: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    transfer_dtype: str = "float32"
    min_metric_examples: int = 5       # suppress metrics computed on fewer examples
    seed: int = 0
    state_dir: str = ""                # where the ServerApp writes checkpoints and history
    resume: bool = False
    eval_data: str = ""                # optional server-side held-out data (simulation: global test)
    eval_split: str = ""
    partition_file: str = ""           # simulation: which samples each virtual site holds
    site_val_fraction: float = 0.15
    evaluate_every: int = 1            # sites score the global model every N rounds and after the last; 0: last only
    evaluate_with_train: bool = True   # round r's model is scored at the start of round r+1's train task
                                       # (one model download per round); the last round's alone
    secure_aggregation: bool = False   # the server sees only the sum of the sites' updates
    secagg_threshold: int = 0          # 0: a majority of the sites, at least 2
    secagg_clip: float = 1024.0        # per-element bound on a site's update (new - global)
    dp_noise_multiplier: float = 0.0   # > 0: sites train with DP-SGD (Opacus) at this noise, or more
    dp_max_grad_norm: float = 1.0      # DP-SGD per-example clipping bound
    dp_delta: float = 1e-5             # epsilons are reported at this delta (keep it below 1/site size)
    dp_min_noise_multiplier: float = 0.0  # server policy: refuse updates that report less noise
    sites: str = ""                    # coordinator only: "name=node_id,..." of the sites leuk-server registered; "" in simulation
    max_examples_per_site: int = 1_000_000  # refuse an update whose num-examples is not in [1, this] (0: no upper bound)
    max_update_norm: float = 1e4       # refuse an update farther than this from the global model (L2; 0: no bound)

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.transfer_dtype not in TRANSFER_DTYPES:
            problems.append(f"transfer dtype must be one of {', '.join(TRANSFER_DTYPES)}")
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        if self.min_sites < 1:
            problems.append("min-sites must be >= 1")
        if self.evaluate_every < 0:
            problems.append("evaluate-every must be >= 0")
        if self.local_epochs < 1 and self.local_steps < 1:
            problems.append("local work must be >= 1 epoch or >= 1 step")
        if self.dp_noise_multiplier < 0 or self.dp_max_grad_norm <= 0 or not 0 < self.dp_delta < 1:
            problems.append("DP needs noise multiplier >= 0, max grad norm > 0 and delta in (0, 1)")
        if self.dp_min_noise_multiplier > self.dp_noise_multiplier:
            problems.append(f"dp-min-noise-multiplier {self.dp_min_noise_multiplier:g} exceeds the run's "
                            f"dp-noise-multiplier {self.dp_noise_multiplier:g}: every update would be refused")
        if self.secure_aggregation and self.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi"):
            problems.append(f"strategy {self.strategy} needs each site's own update; with secure aggregation "
                            "use fedavg, fedprox, fedadam or fedyogi")
        if self.secure_aggregation and self.min_sites < 2:
            problems.append("secure aggregation needs min-sites >= 2 (>= 3 to survive a dropout)")
        if problems:
            raise LeukError("; ".join(problems))

    @property
    def dp(self) -> bool:
        """Sites train with DP-SGD, and server and sites build the model with dp_compatible."""
        return self.dp_noise_multiplier > 0

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.class_names.split(",") if c)

    def to_run_config(self) -> dict[str, Any]:
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedConfig":
        return _from_mapping(cls, run_config)

    def training_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint."""
        ignore = {"rounds", "round_timeout", "resume", "state_dir", "min_sites", "sites",
                  "max_examples_per_site", "max_update_norm"}   # coordinator policy, may change on resume
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}


@dataclass(frozen=True)
class SiteConfig:
    """Facts about one hospital; travels as the SuperNode's node config (never leaves the site)."""

    data_path: str = ""
    site_name: str = ""
    audit_log: str = ""
    device: str = "auto"
    partition_id: int = -1             # simulation: which virtual site this node is
    num_partitions: int = 0
    dp_budget: float = 0.0             # lifetime epsilon on this site's data (at the run's delta); 0: none
    dp_ledger: str = ""                # the site's privacy ledger (JSON); default: next to the audit log
    dp_noise_multiplier: float = 0.0   # the site may demand more noise than the run's, never less
    image_cache: str = ""              # folder for decoded copies of the site's images ("": decode every task)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SiteConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k.replace("-", "_"): v for k, v in node_config.items()}
        site = _from_mapping(cls, {k: v for k, v in node_config.items() if k.replace("-", "_") in known})
        return dataclasses.replace(site, extra={k: v for k, v in values.items() if k not in known})

    @property
    def name(self) -> str:
        if self.site_name:
            return self.site_name
        return f"site-{self.partition_id}" if self.partition_id >= 0 else "site"


def _from_mapping(cls, mapping: Mapping[str, Any]):
    """Build a dataclass from kebab- or snake-case keys, converting scalar types."""
    kinds = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in mapping.items():
        name = key.replace("-", "_")
        if name not in kinds or name == "extra":
            continue
        kind = kinds[name]
        try:
            if kind == "bool":
                values[name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif kind == "int":
                values[name] = int(raw)
            elif kind == "float":
                values[name] = float(raw)
            else:
                values[name] = str(raw)
        except (TypeError, ValueError):
            raise LeukError(f"setting {key!r} must be {kind}, got {raw!r}") from None
    return cls(**values)
