"""Model zoo: one registry and one factory for every architecture leukfed trains."""

from leukfed.models.registry import (
    DataConfig,
    ModelInfo,
    list_models,
    register_model,
    resolve_data_config,
)
from leukfed.models.factory import create_model

# Importing the architecture modules registers their models.
from leukfed.models import dscnet, efficientnet_attn, efficientnet_lite, small_cnns, timm_models  # noqa: E402,F401,I001

__all__ = [
    "DataConfig",
    "ModelInfo",
    "create_model",
    "list_models",
    "register_model",
    "resolve_data_config",
]
