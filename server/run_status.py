"""The live run's phase between rounds, in STATE/status.json, for the dashboard (history.json has the rounds)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from leukfed.common.atomic import atomic_write_json

STATUS_JSON = "status.json"


def read_status(state_dir: str | Path) -> dict[str, Any]:
    """The last status written ({} when none, or while it cannot be parsed)."""
    try:
        status = json.loads((Path(state_dir) / STATUS_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(state_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` (run_id, round, total_rounds, phase, sites_expected, ...) into status.json,
    atomically; a new phase or round restarts `phase_started`. Never raises: a dashboard must not stop a run."""
    status = read_status(state_dir)
    if any(key in fields and fields[key] != status.get(key) for key in ("phase", "round")):
        status["phase_started"] = time.time()
    status.update(fields, updated=time.time())
    try:
        atomic_write_json(Path(state_dir) / STATUS_JSON, status)
    except OSError:
        pass
    return status
