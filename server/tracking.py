"""Optional export of each round's metrics to TensorBoard event files or to MLflow (`--tracking`).

Only what the coordinator already holds goes out: the history row of each round (aggregated and
per-site metrics the sites sent, bytes, timings, the privacy the sites reported), keyed by site name.
Nothing leaves the machine unless the user names an http(s) MLflow tracking URI. The libraries are
imported only when tracking is on.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Protocol

from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import tracking_target

INSTALL_HINT = "pip install 'leukfed[tracking]'"
EXPERIMENT = "leukfed"
ROUND_SCALARS = ("bytes_sent", "bytes_received", "round_seconds", "train_phase_seconds", "aggregation_seconds",
                 "evaluate_phase_seconds", "server_evaluate_seconds", "slowest_site_train_seconds",
                 "slowest_site_work_seconds", "sites_sampled", "sites_replied")


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def _numbers(prefix: str, metrics: dict) -> dict[str, float]:
    return {f"{prefix}/{key}": float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def evaluation_scalars(row: dict) -> dict[str, float]:
    """The sites' scores of one round's model (they may arrive with the next round's replies)."""
    scalars = _numbers("evaluate", row.get("evaluate", {}))
    for name, site in row.get("sites", {}).items():
        scalars.update(_numbers(f"sites/{name}/evaluate", site.get("evaluate", {})))
    return scalars


def round_scalars(row: dict) -> dict[str, float]:
    """Every number of a history row worth a curve: aggregated, per site (by name), bytes, timings, epsilon."""
    scalars = {**_numbers("train", row.get("train", {})), **_numbers("server_evaluate", row.get("server_evaluate", {})),
               **_numbers("round", {k: row[k] for k in ROUND_SCALARS if k in row}),
               **_numbers("privacy", row.get("privacy") or {}), **evaluation_scalars(row)}
    for name, site in row.get("sites", {}).items():
        scalars.update(_numbers(f"sites/{name}/train", site.get("train", {})))
    scalars["round/failures"] = float(len(row.get("failures", [])))
    scalars["round/rejected"] = float(len(row.get("rejected", [])))
    return scalars


class TensorBoardTracker:
    def __init__(self, folder: Path, run_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LeukError(f"--tracking tensorboard: needs the tensorboard package ({INSTALL_HINT})") from None
        self.writer = SummaryWriter(log_dir=str(folder / run_name))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in sorted(scalars.items()):
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, uri: str, run_name: str, params: dict[str, str]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # no network the user did not ask for
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # a local folder, as the user asked
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise LeukError(f"--tracking mlflow: needs the mlflow-skinny package ({INSTALL_HINT})") from None
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(params.items())])
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
            raise LeukError(f"--tracking mlflow:{uri}: {str(exc).splitlines()[0][:200]}") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key.replace("@", "_"), value, now, step) for key, value in sorted(scalars.items())]
        for start in range(0, len(metrics), 1000):   # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_tracker(spec: str, run_name: str, params: dict | None = None) -> Tracker | None:
    """The tracker `--tracking` names (None when off); LeukError with one line when it cannot start."""
    target = tracking_target(spec)
    if target is None:
        return None
    kind, where = target
    if kind == "tensorboard":
        return TensorBoardTracker(Path(where), run_name)
    return MlflowTracker(_mlflow_uri(where), run_name, params or {})


def check_tracking(spec: str) -> None:
    """Refuse `--tracking` before anything starts when its library is missing."""
    import importlib.util

    target = tracking_target(spec)
    module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(target[0]) if target else None
    if module and importlib.util.find_spec(module) is None:
        raise LeukError(f"--tracking {target[0]}: the {module} package is not installed ({INSTALL_HINT})")


def _mlflow_uri(where: str) -> str:
    """A folder becomes a file store, `*.db` a SQLite store; a URI (http, https, file, sqlite...) stays."""
    if "://" in where or where.startswith("file:"):
        return where
    path = Path(where)
    return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()


class SafeTracker:
    """A tracker whose failures after the start cost one log line and the rest of the export, never the run."""

    def __init__(self, tracker: Tracker, log) -> None:
        self.tracker, self._log = tracker, log

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.tracker is None or not scalars:
            return
        try:
            self.tracker.log(step, scalars)
        except Exception as exc:  # noqa: BLE001 - an unreachable tracking server must not stop the federation
            self._log(f"tracking stopped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            self.tracker = None

    def close(self) -> None:
        if self.tracker is not None:
            try:
                self.tracker.close()
            except Exception:  # noqa: BLE001
                pass
