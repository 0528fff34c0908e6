"""The Flower app bundle (FAB) of a leukfed run: a pyproject naming the installed Server/ClientApp (no code).

Shared by the coordinator, which bundles it for `flwr run`, and by the hospitals, whose approval check
accepts only a bundle with exactly this content (`leukfed.client.approval.bundle`). No Flower import.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from leukfed import __version__
from leukfed.common.atomic import atomic_write_text
from leukfed.common.fedconfig import FedConfig

SERVERAPP = "leukfed.server.server_app:app"
CLIENTAPP = "leukfed.client.client_app:app"


def app_project(clientapp: str = CLIENTAPP, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's pyproject.toml as data (a simulation names its own ClientApp and config keys).

    Every FedConfig field appears under [tool.flwr.app.config], because `flwr run --run-config`
    may only override keys that the app declares; their defaults are FedConfig's.
    """
    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "leukfed-app", "version": __version__,
                    "description": "leukfed federated run", "license": "Apache-2.0",
                    "dependencies": [f"leukfed=={__version__}"]},
        "tool": {"flwr": {"app": {
            "publisher": "leukfed",
            "components": {"serverapp": SERVERAPP, "clientapp": clientapp},
            "config": {**FedConfig().to_run_config(), **(extra_config or {})},
        }}},
    }


def write_app_dir(app_dir: Path, clientapp: str = CLIENTAPP, extra_config: dict[str, Any] | None = None) -> Path:
    """Write the app folder `flwr run` bundles; the code itself is the installed leukfed package."""
    app_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app_dir / "pyproject.toml", tomli_w.dumps(app_project(clientapp, extra_config)))
    return app_dir


def write_run_config(path: Path, fed: FedConfig) -> Path:
    """The run's settings as a TOML file for `flwr run --run-config FILE` (no shell quoting)."""
    atomic_write_text(path, tomli_w.dumps(fed.to_run_config()))
    return path
