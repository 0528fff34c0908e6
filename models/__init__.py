"""Model zoo: one registry and one factory for every architecture leukfed trains."""

# Importing the architecture modules registers their models.
from leukfed.models import dscnet, efficientnet_attn, efficientnet_lite, small_cnns, timm_models  # noqa: F401
from leukfed.models.factory import create_model
from leukfed.models.registry import DataConfig, ModelInfo, list_models, register_model, resolve_data_config

__all__ = [
    "DataConfig",
    "ModelInfo",
    "create_model",
    "list_models",
    "register_model",
    "resolve_data_config",
]
