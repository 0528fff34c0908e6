"""The coordinator's dashboard: what the state folder says about the live run, its sites and earlier runs.

Read-only: every document is built from files (`status.json`, `history.json`, the run export), never
from the SuperLink; the page (`common/webui/static/dashboard.*`) polls `/api/live` every 2 s.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from leukfed.common.webui import ReadOnlyServer, WebApp, is_loopback, parse_listen
from leukfed.server.run_status import read_status

MAX_CARD_BYTES = 200_000
RUN_FILES = ("history.json", "model.json")
# Where `--task patients` exports (server/patient_federation.py, common/patient_model.py; named here so the
# page needs no torch: tests/test_dashboard.py checks they match).
PATIENT_EXPORT = ("patient-model", "heads.safetensors", "patient_model.json")
# (curve, metric in a site's evaluate/train scores, metric in the round's aggregate, the server's own)
CURVES = {"accuracy": ("eval_accuracy", "eval_accuracy", "accuracy"),
          "loss": ("eval_loss", "eval_loss", "loss")}


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _node_names(status: dict, history: list[dict]) -> dict[str, str]:
    """node id (text) -> site name, from the registrations in status.json and the rows themselves."""
    names = {str(node): name for name, node in (status.get("sites") or {}).items()}
    for row in history:
        for key, entry in (row.get("sites") or {}).items():
            if isinstance(entry, dict) and "node" in entry:
                names[str(entry["node"])] = key
            elif isinstance(entry, dict) and entry.get("name"):
                names[key] = entry["name"]
    return names


def row_sites(row: dict, names: dict[str, str]) -> dict[str, dict]:
    """A row's per-site scores keyed by site name, whether the row is keyed by name (with a `node`
    field) or by node id (with a `name` field)."""
    sites = {}
    for key, entry in (row.get("sites") or {}).items():
        if not isinstance(entry, dict):
            continue
        node = str(entry["node"]) if "node" in entry else key
        name = key if "node" in entry else entry.get("name") or names.get(key) or f"node {key}"
        sites[name] = {"node": node, "train": entry.get("train") or {}, "evaluate": entry.get("evaluate") or {}}
    return sites


def _who(entry: dict, names: dict[str, str]) -> str:
    node = str(entry.get("node", "?"))
    return entry.get("site") or names.get(node) or f"node {node}"


def time_split(row: dict) -> dict[str, float]:
    """A round's wall time: the slowest site's work, transfers and waiting, aggregation, evaluation."""
    train_phase = float(row.get("train_phase_seconds") or 0.0)
    aggregation = float(row.get("aggregation_seconds") or 0.0)
    training = float(row.get("slowest_site_work_seconds") or row.get("slowest_site_train_seconds") or 0.0)
    evaluation = float(row.get("evaluate_phase_seconds") or 0.0) + float(row.get("server_evaluate_seconds") or 0.0)
    return {"training": training, "transfer": max(0.0, train_phase - aggregation - training),
            "aggregation": aggregation, "evaluation": evaluation,
            "other": max(0.0, float(row.get("round_seconds") or 0.0) - train_phase - evaluation)}


def round_summaries(history: list[dict], names: dict[str, str]) -> list[dict]:
    return [{"round": row.get("round"), "time": row.get("time"), "seconds": row.get("round_seconds"),
             "split": time_split(row), "bytes_sent": row.get("bytes_sent", 0),
             "bytes_received": row.get("bytes_received", 0), "sites_replied": row.get("sites_replied"),
             "sites_sampled": row.get("sites_sampled"),
             "rejected": [{"site": _who(e, names), "reason": e.get("reason", "")} for e in row.get("rejected", [])],
             "failures": [{"site": _who(e, names), "phase": e.get("phase", ""), "reason": _last_line(e.get("reason"))}
                          for e in row.get("failures", [])],
             "privacy": row.get("privacy") or {}}
            for row in history]


def _last_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[-1] if lines else ""


def site_table(history: list[dict], names: dict[str, str], expected: dict) -> list[dict]:
    """One row per site name: last seen, rounds joined, rejected updates and failures with the last
    reason, the last DP epsilon it reported and its last accuracy."""
    table: dict[str, dict] = {name: _empty_site(name, str(node)) for name, node in expected.items()}
    for row in history:
        for name, scores in row_sites(row, names).items():
            site = table.setdefault(name, _empty_site(name, scores["node"]))
            site["last_seen"] = row.get("time")
            site["rounds_joined"] += bool(scores["train"])
            if "dp_epsilon" in scores["train"]:
                site["dp_epsilon"] = scores["train"]["dp_epsilon"]
            if isinstance(scores["evaluate"].get("eval_accuracy"), (int, float)):
                site["accuracy"] = scores["evaluate"]["eval_accuracy"]
        for kind, key in (("rejected", "rejected"), ("failures", "failures")):
            for entry in row.get(key, []):
                name = _who(entry, names)
                site = table.setdefault(name, _empty_site(name, str(entry.get("node", ""))))
                site[kind] += 1
                site[f"last_{kind}"] = {"round": row.get("round"), "reason": _last_line(entry.get("reason"))}
                if kind == "rejected":
                    site["last_seen"] = row.get("time")   # it replied, with something unusable
    return sorted(table.values(), key=lambda s: s["name"])


def _empty_site(name: str, node: str) -> dict:
    return {"name": name, "node": node, "last_seen": None, "rounds_joined": 0, "rejected": 0,
            "last_rejected": None, "failures": 0, "last_failures": None, "dp_epsilon": None, "accuracy": None}


def curves(history: list[dict], names: dict[str, str]) -> dict[str, list[dict]]:
    """Per curve: one series per site and the aggregate (and the coordinator's own test set, if any)."""
    out: dict[str, list[dict]] = {}
    for curve, (site_key, aggregate_key, server_key) in CURVES.items():
        series: dict[str, list] = {}
        for row in history:
            x = row.get("round")
            for name, scores in row_sites(row, names).items():
                _add(series, name, x, scores["evaluate"].get(site_key))
            _add(series, "aggregated", x, (row.get("evaluate") or {}).get(aggregate_key))
            _add(series, "coordinator test set", x, (row.get("server_evaluate") or {}).get(server_key))
        train = [[row.get("round"), (row.get("train") or {}).get("train_loss")] for row in history]
        if curve == "loss" and any(isinstance(y, (int, float)) for _, y in train):
            series["aggregated train loss"] = [p for p in train if isinstance(p[1], (int, float))]
        out[curve] = [{"name": name, "points": points} for name, points in series.items() if points]
    return out


def _add(series: dict[str, list], name: str, x: Any, y: Any) -> None:
    if isinstance(y, (int, float)) and not isinstance(y, bool):
        series.setdefault(name, []).append([x, y])


class Dashboard:
    """The documents of the dashboard for one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.started = time.time()

    def live(self) -> dict:
        status = read_status(self.state_dir)
        history = _read_json(self.state_dir / "history.json", [])
        history = history if isinstance(history, list) else []
        names = _node_names(status, history)
        return {"state_dir": str(self.state_dir), "now": time.time(), "status": status,
                "rounds": round_summaries(history, names),
                "sites": site_table(history, names, status.get("sites") or {}),
                "curves": curves(history, names)}

    def runs(self) -> list[dict]:
        """The state folder's run and any run folders inside it (one or two levels down)."""
        folders = [self.state_dir, *sorted(p.parent for depth in ("*/", "*/*/") for name in RUN_FILES
                                           for p in self.state_dir.glob(depth + name))]
        seen, out = set(), []
        for folder in folders:
            if folder not in seen and any((folder / name).exists() for name in RUN_FILES):
                seen.add(folder)
                out.append(run_summary(folder, self.state_dir))
        return out

    def model(self) -> dict:
        return exported_model(self.state_dir)

    def app(self) -> WebApp:
        return WebApp("dashboard.html", {"live": self.live, "runs": self.runs, "model": self.model})


def export_files(folder: Path) -> tuple[Path, Path, Path]:
    """(weights, description, model card) of the run's export: a cell model's in the folder itself, the
    patient model's in its own subfolder."""
    patient = folder / PATIENT_EXPORT[0]
    if (patient / PATIENT_EXPORT[2]).exists():
        return patient / PATIENT_EXPORT[1], patient / PATIENT_EXPORT[2], patient / "MODEL_CARD.md"
    return folder / "model.safetensors", folder / "model.json", folder / "MODEL_CARD.md"


def model_name(description: dict) -> str | None:
    recipe = description.get("recipe")
    return description.get("model") or description.get("name") or (
        f"patient model: {recipe.get('backbone')} + {recipe.get('head')} head" if isinstance(recipe, dict) else None)


def run_summary(folder: Path, state_dir: Path) -> dict:
    history = _read_json(folder / "history.json", [])
    weights, description, card = export_files(folder)
    last = history[-1] if isinstance(history, list) and history else {}
    return {"name": "." if folder == state_dir else str(folder.relative_to(state_dir)),
            "rounds": len(history) if isinstance(history, list) else 0,
            "finished": weights.exists(), "last_round_time": last.get("time"),
            "metrics": {k: v for k, v in _read_json(folder / "metrics.json", {}).items()
                        if isinstance(v, (int, float))},
            "model": model_name(_read_json(description, {})), "model_card": card.exists()}


def exported_model(folder: Path) -> dict:
    """The run export (description, metrics.json, MODEL_CARD.md) when present."""
    weights, description, card = export_files(folder)
    card_text = card.read_bytes()[:MAX_CARD_BYTES].decode("utf-8", "replace") if card.exists() else None
    return {"exported": weights.exists(), "weights_bytes": weights.stat().st_size if weights.exists() else None,
            "description": _read_json(description, {}), "metrics": _read_json(folder / "metrics.json", {}),
            "model_card": card_text}


def serve_dashboard(state_dir: Path, listen: str, say=print) -> ReadOnlyServer:
    """Start the dashboard for `state_dir` on `listen` (HOST:PORT; HOST defaults to 127.0.0.1)."""
    host, port = parse_listen(listen, "--dashboard")
    server = ReadOnlyServer(Dashboard(state_dir).app(), host, port)
    say(f"dashboard: {server.url} (read-only)")
    if not is_loopback(host):
        say(f"WARNING: the dashboard listens on {host}: anyone who reaches it reads the run's metrics and site "
            "names (no login); prefer 127.0.0.1 and an SSH tunnel")
    return server
