"""A hospital's own policy: which runs it takes part in, checked before any task touches its data."""
from __future__ import annotations

import functools
import sys
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from leukfed.common.errors import LeukError, SiteRefusal
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.settings import from_mapping, kebab, setting, unknown_keys


@dataclass(frozen=True)
class SitePolicy:
    """Decided at the hospital (leuk-client options or a TOML file); a run cannot lower any of it."""

    min_sites: int = setting(3, "Never train in a run that aggregates fewer sites (a lone update would be exposed).", "site")
    min_metric_examples: int = setting(10, "Never release a metric computed on fewer examples.", "site")
    tasks: str = setting("cells", "Comma-separated tasks this site takes part in: cells (cell classifiers) and/or "
                         "patients (the APL patient model: reads patients.csv, sends feature moments, head updates "
                         "and a validation logit histogram). Default: cells only.", "site")
    models: str = setting("", "Comma-separated models this site trains (empty: every registered model).", "site")
    max_image_size: int = setting(1024, "Largest input size in px this site accepts.", "site")
    max_model_parameters: int = setting(200_000_000, "Largest model (parameters) this site builds.", "site")
    dp_delta: float = setting(1e-5, "This site's DP delta: a run reporting epsilon at a larger delta is refused.", "site")
    dp_min_noise_multiplier: float = setting(0.0, "Refuse runs that train with less DP noise (> 0: refuse runs "
                                             "without DP).", "site")
    max_local_epochs: int = setting(20, "Most local epochs per round.", "site")
    max_local_steps: int = setting(10_000, "Most local batches per round.", "site")
    max_batch_size: int = setting(1024, "Largest local batch size.", "site")
    patient_val_fraction: float = setting(0.25, "--task patients: share of this site's patients (per diagnosis) kept "
                                          "for calibration; the site's own, so no run can move one patient "
                                          "between its training and validation sides.", "site")
    patient_split_seed: int = setting(0, "--task patients: seed of this site's own training/validation split of "
                                      "its patients.", "site")

    def __post_init__(self) -> None:
        if self.min_sites < 1 or self.min_metric_examples < 0 or not 0 < self.dp_delta < 1 \
                or not 0 <= self.patient_val_fraction < 1:
            raise LeukError("site policy: min-sites must be >= 1, min-metric-examples >= 0, dp-delta in (0, 1) and "
                            "patient-val-fraction in [0, 1)")

    @property
    def allowed_tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    @property
    def allowed_models(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.models.split(",") if m.strip())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "site policy") -> "SitePolicy":
        unknown = unknown_keys(cls, values)
        if unknown:
            raise LeukError(f"{source}: unknown setting {unknown[0]!r}; known: "
                            + ", ".join(kebab(f.name) for f in fields(cls)))
        return from_mapping(cls, values)

    @classmethod
    def load(cls, path: str | Path) -> "SitePolicy":
        try:
            return cls.from_mapping(tomllib.loads(Path(path).read_text()), source=str(path))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LeukError(f"cannot read the site policy {path}: {exc}") from None

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps({kebab(k): v for k, v in asdict(self).items()})

    def summary(self) -> str:
        return ", ".join(f"{kebab(k)} {v if v != '' else 'any'}" for k, v in asdict(self).items())


def site_policy(site: SiteConfig) -> SitePolicy:
    """The policy the site's node config names; the safe defaults when it names none. A named file that
    cannot be read refuses every task (fail closed)."""
    if not site.site_policy:
        return SitePolicy()
    try:
        return SitePolicy.load(site.site_policy)
    except LeukError as exc:
        raise SiteRefusal(f"site {site.name} refused: {exc}") from None


def violations(policy: SitePolicy, fed: FedConfig, run_config: Mapping[str, Any]) -> list[str]:
    """Every rule of `policy` the run breaks, one phrase each (names settings and limits, never data)."""
    problems = [f"unknown run setting {key!r}" for key in unknown_keys(FedConfig, run_config)]
    if fed.min_sites < policy.min_sites:
        problems.append(f"min-sites {fed.min_sites} is below this site's minimum of {policy.min_sites}")
    if fed.min_metric_examples < policy.min_metric_examples:
        problems.append(f"min-metric-examples {fed.min_metric_examples} is below this site's floor of "
                        f"{policy.min_metric_examples}")
    if fed.task not in policy.allowed_tasks:
        return problems + [f"task {fed.task!r} is not among this site's tasks ({', '.join(policy.allowed_tasks) or 'none'})"]
    if fed.task == "patients":
        return problems + _patient_violations(policy, fed) + _dp_violations(policy, fed)
    if policy.allowed_models and fed.model not in policy.allowed_models:
        problems.append(f"model {fed.model!r} is not among this site's models ({', '.join(policy.allowed_models)})")
    problems += _local_work_violations(policy, fed) + _dp_violations(policy, fed)
    if not problems:  # only a run that passed the cheap rules gets its model looked at
        problems += _model_violations(policy, fed)
    return problems


def _patient_violations(policy: SitePolicy, fed: FedConfig) -> list[str]:
    """The patient task: the recipe's frozen backbone and its input size, the head's local work."""
    from leukfed.common.patient_model import recipe_named

    recipe = recipe_named(fed.patient_recipe)   # FedConfig checked it can be federated
    problems = []
    if policy.allowed_models and recipe.backbone not in policy.allowed_models:
        problems.append(f"backbone {recipe.backbone!r} of recipe {fed.patient_recipe} is not among this site's "
                        f"models ({', '.join(policy.allowed_models)})")
    if recipe.image_size > policy.max_image_size:
        problems.append(f"image-size {recipe.image_size} px exceeds this site's maximum of {policy.max_image_size} px")
    return problems + _local_work_violations(policy, fed)


def _local_work_violations(policy: SitePolicy, fed: FedConfig) -> list[str]:
    """Local epochs, local steps and batch size against the site's maxima (the patient head uses no steps)."""
    asked = (("local-epochs", fed.local_epochs, policy.max_local_epochs),
             ("local-steps", fed.local_steps, policy.max_local_steps),
             ("batch-size", fed.batch_size, policy.max_batch_size))
    return [f"{name} {value} exceeds this site's maximum of {limit}" for name, value, limit in asked if value > limit]


def _dp_violations(policy: SitePolicy, fed: FedConfig) -> list[str]:
    problems = []
    if policy.dp_min_noise_multiplier > 0 and fed.dp_noise_multiplier < policy.dp_min_noise_multiplier:
        problems.append(f"dp-noise-multiplier {fed.dp_noise_multiplier:g} is below this site's minimum of "
                        f"{policy.dp_min_noise_multiplier:g}")
    if fed.dp and fed.dp_delta > policy.dp_delta:
        problems.append(f"dp-delta {fed.dp_delta:g} is larger than this site's delta {policy.dp_delta:g}")
    return problems


def _model_violations(policy: SitePolicy, fed: FedConfig) -> list[str]:
    from leukfed.models import list_models, resolve_data_config

    if fed.model not in list_models():
        return [f"model {fed.model!r} is not registered at this site"]
    try:
        size = resolve_data_config(fed.model, fed.image_size or None).input_size[1]
    except LeukError as exc:
        return [str(exc)]
    if size > policy.max_image_size:
        return [f"image-size {size} px exceeds this site's maximum of {policy.max_image_size} px"]
    parameters = _parameter_count(fed.model, size, max(len(fed.classes), 2))
    if parameters > policy.max_model_parameters:
        return [f"model {fed.model} has {parameters:,} parameters, above this site's maximum of "
                f"{policy.max_model_parameters:,}"]
    return []


@functools.lru_cache(maxsize=8)
def _parameter_count(model: str, image_size: int, num_classes: int) -> int:
    """Counted on the meta device: no memory, no random initialisation."""
    import torch

    from leukfed.models import create_model

    with torch.device("meta"):
        built = create_model(model, num_classes, pretrained=False, image_size=image_size)
    return sum(p.numel() for p in built.parameters())


def node_violations(fed: FedConfig, site: SiteConfig, context) -> list[str]:
    """The patient task against the site's node config: without --secure-aggregation its moments, head
    updates and calibration histogram travel in the clear, and it has no DP, so a site that requires secure
    aggregation refuses a run without it, and a site that requires DP refuses all of it."""
    from leukfed.client.secagg import secagg_required

    if fed.task != "patients":
        return []
    if secagg_required(context) and not fed.secure_aggregation:
        return ["task 'patients' without --secure-aggregation sends its moments and calibration histogram in the "
                "clear, and this site requires secure aggregation (node config secure-aggregation)"]
    if site.dp_budget > 0 or site.dp_noise_multiplier > 0:
        return ["task 'patients' has no differential privacy, which this site requires (dp-budget or "
                "dp-noise-multiplier in its node config)"]
    return []


def check_task(context) -> None:
    """Refuse (SiteRefusal) a task of a run that breaks this site's policy, before its data is touched.
    Call first in every ClientApp handler; `context` is Flower's Context (run and node config)."""
    site = SiteConfig.from_node_config(context.node_config)
    policy = site_policy(site)
    try:
        fed = FedConfig.from_run_config(context.run_config)
    except LeukError as exc:
        problems = [f"invalid run config: {exc}"]
    else:
        problems = violations(policy, fed, context.run_config) + node_violations(fed, site, context)
    if problems:
        message = f"site {site.name} refused run {context.run_id} by its policy: " + "; ".join(problems)
        print(f"refused: {message}", file=sys.stderr, flush=True)  # the one line at the site
        raise SiteRefusal(message)
