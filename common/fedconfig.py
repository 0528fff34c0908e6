"""Federated settings, each with one home: run-wide (run config), per site (node config), per round."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from leukfed.common.errors import LeukError
from leukfed.common.settings import from_mapping, kebab, setting

STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
# Strategies that only combine the weighted average can run on the secure sum; the others must
# see each site's update (median, trimmed mean, Krum) and would silently degrade to plain FedAvg.
COMPATIBLE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
STRATEGY_HELP = ", ".join(STRATEGIES[:-1]) + " or " + STRATEGIES[-1]
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")
TASKS = ("cells", "patients")


@dataclass(frozen=True)
class FedConfig:
    """Run-wide settings, identical for every site; travels as Flower's run config. Each field is
    declared once (type, default, help, owner); leuk-server's and leuk simulate's options derive from it."""

    task: str = setting("cells", "What the run trains: cells (a cell-image classifier; --model ...) or patients (the "
                        "APL patient model: a linear head over frozen ImageNet features of each patient's cells, "
                        "FedAvg over the head, threshold and temperature from the sites' logit histograms).")
    patient_recipe: str = setting("lite0-meanprob", "--task patients: the `leuk train-patients` recipe whose head is "
                                  "federated (lite0-meanprob, lite0-meanpool, lite0-96-...; linear heads only). The "
                                  "head's L2 penalty is the recipe's; --lr, --batch-size, --rounds and --local-epochs "
                                  "drive its local SGD (measured: --lr 0.1 --batch-size 256 --rounds 100 "
                                  "--local-epochs 2).")
    positive: str = setting("APL", "--task patients: the diagnosis the patient model flags (patients.csv).")
    model: str = setting("tinycnn", "Model name (see `leuk models`).")
    class_names: str = setting("", "Comma-separated class names (default: asked from the sites).", flag="--classes")
    image_size: int = setting(0, "Input size in px (0: the model's default).")
    pretrained: str = setting("auto", "Initial weights: auto, none, hub, package or a weights file.")
    rounds: int = setting(3, "Federated rounds.")
    strategy: str = setting("fedavg", STRATEGY_HELP + ".")
    local_epochs: int = setting(1, "Local epochs per round.")
    local_steps: int = setting(0, "Local batches per round instead of epochs (0: use epochs).")
    batch_size: int = setting(32, "Local batch size.")
    lr: float = setting(1e-3, "Local learning rate.")
    optimizer: str = setting("adam", "Local optimizer: adam, adamw or sgd.")
    weight_decay: float = setting(0.0, "Local weight decay.")
    loss: str = setting("ce", "ce (cross-entropy) or kl (KL-divergence, as DSCNet).")
    label_smoothing: float = setting(0.0, "Label smoothing.")
    class_weights: bool = setting(False, "Weight each site's loss by the inverse class frequency of its training images.")
    augment: str = setting("paper002", "Training augmentation: paper002, flip or none.")
    local_batchnorm: bool = setting(False, "FedBN: each site keeps its own BatchNorm weights and statistics from "
                                    "round to round (Flower's per-site state); the exported model's are the average.")
    local_optimizer_state: bool = setting(
        False, "Each site keeps its optimizer's state (Adam's moments and step count, SGD's momentum) from round "
        "to round in Flower's per-site state instead of starting it afresh every round; it never leaves the "
        "site. Not with DP-SGD.")
    bn_recalibration: int = setting(0, "After local training, recompute BatchNorm statistics over up to N training "
                                    "batches with the new weights (0: off; steadies DSCNet).")
    bn_statistics_round: int = setting(
        0, "After the last round, each site recomputes the model's BatchNorm statistics under the final global "
        "weights over up to N of its training batches and the server averages them into the exported model (0: "
        "off). Otherwise the model keeps the average of statistics each site computed under its own weights "
        "(Inception-v3 FedAvg: 82.7 % with those, 94.0 % with recomputed ones; benchmarks/bn_statistics.py).")
    proximal_mu: float = setting(0.01, "FedProx mu.")
    server_lr: float = setting(0.01, "FedAdam/FedYogi server learning rate.")
    fedavgm_lr: float = setting(1.0, "FedAvgM server learning rate (the step along the averaged update; 1: FedAvg's).")
    server_momentum: float = setting(0.5, "FedAvgM server momentum: the global model moves along a running sum of "
                                     "past averaged updates (0: plain FedAvg at --fedavgm-lr). 0.5 with rate 1 was "
                                     "best of 5 on smallcnn's site validation; 0.9 with rate 1 swung (benchmarks/server_momentum.py).")
    trim_beta: float = setting(0.2, "FedTrimmedAvg: fraction trimmed at each end.")
    krum_malicious: int = setting(1, "Krum: assumed number of malicious sites.")
    min_sites: int = setting(3, "Sites needed before a round starts (and to keep going).")
    fraction_train: float = setting(1.0, "Fraction of the connected sites asked to train each round.")
    round_timeout: float = setting(600.0, "Seconds to wait for sites in a round.")
    transfer_dtype: str = setting("float32", "float32, float16 or bfloat16 updates.")
    min_metric_examples: int = setting(10, "Metrics computed on fewer examples are not released.")
    seed: int = setting(0, "Random seed.")
    state_dir: str = setting("", "State directory: checkpoints, history, final model.", flag="--state", required=True)
    resume: bool = setting(False, "Continue from the last completed round in --state.")
    eval_data: str = setting("", "Optional held-out data at the coordinator.")
    eval_split: str = setting("", "Split JSON of --eval-data: score its test side only (default: all images).")
    site_val_fraction: float = setting(0.15, "Fraction of each site's images kept for its local validation "
                                      "(--task cells; with --task patients each site's policy sets its own split).")
    site_group_by: str = setting("auto", "How each site splits off its validation images: auto, image, patient, block:N.")
    evaluate_every: int = setting(1, "Sites score the global model every N rounds and after the last (0: after the last only).")
    evaluate_with_train: bool = setting(
        True, "Sites score round r's model at the start of round r+1's train task (one model download per round); "
        "--evaluate-separately sends it again in an evaluation message of its own.",
        flag="--evaluate-with-train/--evaluate-separately")
    secure_aggregation: bool = setting(False, "Masked updates: the server sees only the sum of the sites' updates "
                                       "(" + ", ".join(COMPATIBLE_STRATEGIES) + ").")
    secagg_threshold: int = setting(0, "Sites needed to unmask (0: a majority, at least 2).")
    secagg_clip: float = setting(1024.0, "Secure aggregation: per-element bound on a site's update (new - global).")
    dp_noise_multiplier: float = setting(0.0, "> 0: sites train with DP-SGD at this noise multiplier.")
    dp_max_grad_norm: float = setting(1.0, "DP-SGD per-example clipping bound.")
    dp_delta: float = setting(1e-5, "Delta at which sites report epsilon (each site refuses one above its own).")
    dp_min_noise_multiplier: float = setting(0.0, "Refuse updates trained with less noise.")
    registered_sites: str = setting("", "Coordinator only: name=node_id,... of the sites leuk-server registered (set by "
                                    "leuk-server itself; empty in simulation): other nodes' replies are ignored.", cli=False)
    max_examples_per_site: int = setting(1_000_000, "Refuse an update whose example count is not in [1, this] "
                                         "(0: no upper bound).")
    max_update_norm: float = setting(1e4, "Refuse an update farther than this from the global model (L2 over all "
                                     "float tensors; 0: no bound).")
    tracking: str = setting("", "Export each round's metrics: tensorboard:DIR (event files) or mlflow:PATH_OR_URI (a "
                            "local folder, a .db file, or a tracking URI; only an http(s) URI uses the network). "
                            "Off by default.")

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
        if self.batch_size < 1 or self.lr <= 0:
            problems.append("batch size must be >= 1 and learning rate > 0")
        if self.evaluate_every < 0:
            problems.append("evaluate-every must be >= 0")
        if self.local_epochs < 1 and self.local_steps < 1:
            problems.append("local work must be >= 1 epoch or >= 1 step")
        if self.bn_recalibration < 0 or self.bn_statistics_round < 0:
            problems.append("bn-recalibration and bn-statistics-round must be >= 0")
        if self.dp_noise_multiplier < 0 or self.dp_max_grad_norm <= 0 or not 0 < self.dp_delta < 1:
            problems.append("DP needs noise multiplier >= 0, max grad norm > 0 and delta in (0, 1)")
        if self.dp_min_noise_multiplier > self.dp_noise_multiplier:
            problems.append(f"dp-min-noise-multiplier {self.dp_min_noise_multiplier:g} exceeds the run's "
                            f"dp-noise-multiplier {self.dp_noise_multiplier:g}: every update would be refused")
        if self.local_optimizer_state and self.dp:
            problems.append("local-optimizer-state is not available with DP-SGD (its optimizer starts afresh "
                            "every round)")
        if self.secure_aggregation and self.strategy not in COMPATIBLE_STRATEGIES:
            problems.append(f"strategy {self.strategy} needs each site's own update; with secure aggregation "
                            f"use one of {', '.join(COMPATIBLE_STRATEGIES)}")
        if self.fedavgm_lr <= 0 or not 0 <= self.server_momentum < 1:
            problems.append("FedAvgM needs fedavgm-lr > 0 and server-momentum in [0, 1)")
        if self.secure_aggregation and self.min_sites < 2:
            problems.append("secure aggregation needs min-sites >= 2 (>= 3 to survive a dropout)")
        if self.task not in TASKS:
            problems.append(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        elif self.task == "patients":
            problems += _patient_task_problems(self)
        try:
            object.__setattr__(self, "tracking", _absolute_tracking(self.tracking))   # the ServerApp's cwd differs
        except LeukError as exc:
            problems.append(str(exc))
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
        return {kebab(k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedConfig":
        """Parse once; unknown keys are ignored here and refused by every site's policy."""
        return from_mapping(cls, run_config)

    def training_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint."""
        ignore = {"rounds", "round_timeout", "resume", "state_dir", "min_sites", "registered_sites",
                  "max_examples_per_site", "max_update_norm", "tracking"}   # coordinator policy, may change on resume
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}


def _patient_task_problems(fed: FedConfig) -> list[str]:
    """What --task patients does not support (one phrase each)."""
    from leukfed.common.patient_federated import federable_recipe

    problems = []
    try:
        federable_recipe(fed.patient_recipe)
    except LeukError as exc:
        problems.append(str(exc))
    unsupported = {"strategy " + fed.strategy: fed.strategy != "fedavg", "DP-SGD": fed.dp,
                   "local-batchnorm": fed.local_batchnorm, "local-optimizer-state": fed.local_optimizer_state,
                   "resume": fed.resume, "eval-data": bool(fed.eval_data)}
    problems += [f"--task patients does not support {what} (FedAvg of the head only)"
                 for what, used in unsupported.items() if used]
    return problems


TRACKING_KINDS = ("tensorboard", "mlflow")


def tracking_target(spec: str) -> tuple[str, str] | None:
    """`--tracking KIND:WHERE` as (kind, where); None when off; LeukError when malformed."""
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    if kind not in TRACKING_KINDS or not where:
        raise LeukError(f"tracking {spec!r}: expected tensorboard:DIR or mlflow:PATH_OR_URI")
    if "://" in where and "@" in where.split("://", 1)[1].split("/", 1)[0]:
        # The run config reaches every site: credentials go in MLflow's own environment variables.
        raise LeukError("tracking URI must not hold credentials (the run config reaches every site); set "
                        "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead")
    return kind, where


def _absolute_tracking(spec: str) -> str:
    """A local folder or file made absolute; URIs (scheme://..., file:...) unchanged."""
    target = tracking_target(spec)
    if target is None or "://" in target[1] or target[1].startswith("file:"):
        return spec
    return f"{target[0]}:{Path(target[1]).expanduser().resolve()}"


@dataclass(frozen=True)
class SiteConfig:
    """Facts about one hospital; travels as the SuperNode's node config (never leaves the site)."""

    data_path: str = setting("", "This hospital's image folder.", "site")
    site_name: str = setting("", "This site's name.", "site")
    audit_log: str = setting("", "The site's audit log (JSON lines).", "site")
    device: str = setting("auto", "auto (GPU when present), cpu, cuda or cuda:N.", "site")
    site_policy: str = setting("", "The site's policy file (TOML, written by leuk-client); empty: the safe defaults.", "site")
    dp_budget: float = setting(0.0, "Lifetime epsilon on this site's data (at the site's delta); 0: none.", "site")
    dp_ledger: str = setting("", "The site's privacy ledger (JSON); default: next to the audit log.", "site")
    dp_noise_multiplier: float = setting(0.0, "The site may demand more noise than the run's, never less.", "site")
    dp_clear_metrics: bool = setting(False, "Under DP, also send training loss/accuracy and validation scores "
                                     "(not covered by the privacy accounting).", "site")
    image_cache: str = setting("", "Folder for decoded copies of the site's images and their hashes (\"\": decode and hash "
                                    "every task).", "site")
    partition_id: int = setting(-1, "Which virtual site this node is.", "simulation")
    num_partitions: int = setting(0, "How many virtual sites there are.", "simulation")
    partition_file: str = setting("", "Which samples each virtual site holds (partition.json).", "simulation")
    site_key: str = setting("", "The site's private key (OpenSSH); signs its secure-aggregation keys.", "site")
    peer_keys: str = setting("", "Folder of the federation's site public keys (<name>.pub), pinned.", "site")
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SiteConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k.replace("-", "_"): v for k, v in node_config.items()}
        site = from_mapping(cls, {k: v for k, v in node_config.items() if k.replace("-", "_") in known})
        return dataclasses.replace(site, extra={k: v for k, v in values.items() if k not in known})

    @property
    def name(self) -> str:
        if self.site_name:
            return self.site_name
        return f"site-{self.partition_id}" if self.partition_id >= 0 else "site"
