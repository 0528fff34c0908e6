"""The Flower app bundle (FAB) for a leukfed run: a pyproject naming the installed Server/ClientApp."""
from __future__ import annotations

from pathlib import Path

import tomli_w

from leukfed import __version__
from leukfed.common.atomic import atomic_write_text
from leukfed.common.fedconfig import FedConfig


def write_app_dir(app_dir: Path, clientapp: str = "leukfed.client.client_app:app",
                  extra_config: dict | None = None) -> Path:
    """Write the app folder `flwr run` bundles; the code itself is the installed leukfed package.

    Every FedConfig field appears under [tool.flwr.app.config], because `flwr run --run-config`
    may only override keys that the app declares.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "leukfed-app", "version": __version__,
                    "description": "leukfed federated run", "license": "Apache-2.0",
                    "dependencies": [f"leukfed=={__version__}"]},
        "tool": {"flwr": {"app": {
            "publisher": "leukfed",
            "components": {"serverapp": "leukfed.server.server_app:app",
                           "clientapp": clientapp},
            "config": {**FedConfig().to_run_config(), **(extra_config or {})},
        }}},
    }
    atomic_write_text(app_dir / "pyproject.toml", tomli_w.dumps(project))
    return app_dir


def write_run_config(path: Path, fed: FedConfig) -> Path:
    """The run's settings as a TOML file for `flwr run --run-config FILE` (no shell quoting)."""
    atomic_write_text(path, tomli_w.dumps(fed.to_run_config()))
    return path
