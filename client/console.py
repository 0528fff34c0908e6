"""The hospital's console: approvals, the audit log and its check, the policy, DP budget and data check.

Served by `leuk-client --console PORT` on loopback only, read-only; every document is read from the
site's own files (STATE/approvals.json, audit.jsonl, site-policy.toml, privacy-ledger.json) when asked.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from leukfed.client.audit import ChainReport, verify_chain
from leukfed.client.policy import SitePolicy
from leukfed.common.atomic import read_tail
from leukfed.common.errors import LeukError
from leukfed.common.settings import kebab
from leukfed.common.webui import ReadOnlyServer, WebApp, is_loopback, parse_listen

AUDIT_SHOWN = 50
AUDIT_TAIL_BYTES = 512 * 1024   # the shown entries come from the log's end: ~2 KB each
INSTALLED_CHECK_EVERY_S = 30.0
# What an audit line shows in the console (the full line stays in the file).
AUDIT_FIELDS = ("seq", "time", "run_id", "round", "message", "outcome", "bytes_in", "bytes_out", "update_sha256",
                "reason_sent", "error_code_sent", "hash")


def console_address(listen: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` with a loopback HOST; anything else is refused."""
    host, port = parse_listen(listen, "--console")
    if not is_loopback(host):
        raise LeukError(f"--console serves on loopback only (127.0.0.1, ::1 or localhost), not {host}: "
                        "reach it from elsewhere through an SSH tunnel")
    return host, port


@dataclass
class SiteFiles:
    """Where one site keeps what the console shows."""

    site: str
    state: Path
    approvals: Path
    data: Path
    data_report: dict = field(default_factory=dict)
    dp_budget: float = 0.0

    @property
    def audit_log(self) -> Path:
        return self.state / "audit.jsonl"

    @property
    def policy(self) -> Path:
        return self.state / "site-policy.toml"

    @property
    def ledger(self) -> Path:
        return self.state / "privacy-ledger.json"


def approval_summary(entry: dict) -> dict:
    """An approval without its per-file digests: who, when, which code and bundles."""
    return {"time": entry.get("time"), "reviewer": entry.get("reviewer"), "note": entry.get("note", ""),
            "leukfed_version": entry.get("leukfed_version"), "code_digest": entry.get("code_digest"),
            "files": len(entry.get("files") or {}), "startup_hooks": len(entry.get("startup_hooks") or {}),
            "clientapp": entry.get("clientapp"), "fab_digest": entry.get("fab_digest"),
            "approved_fabs": entry.get("approved_fabs") or [], "python": entry.get("python"), "flwr": entry.get("flwr")}


class Console:
    """The console's JSON documents for one site."""

    def __init__(self, files: SiteFiles) -> None:
        self.files = files
        self._installed: tuple[float, dict] = (0.0, {})
        self._audit: tuple[tuple, ChainReport | None] = ((), None)

    def overview(self) -> dict:
        return {"site": self.files.site, "state": str(self.files.state), "data": str(self.files.data),
                "now": time.time()}

    def approvals(self) -> dict:
        from leukfed.client.approval.store import load_approvals

        entries = [e for e in load_approvals(self.files.approvals)["approvals"] if isinstance(e, dict)]
        history = []
        for previous, entry in zip([None, *entries], entries):
            changes = _changes(previous, entry) if previous else None
            history.append({**approval_summary(entry), "changes_since_previous": changes})
        return {"file": str(self.files.approvals), "approvals": history[::-1],
                "installed": self._installed_against(entries[-1]) if entries else None}

    def _installed_against(self, entry: dict) -> dict:
        """What changed in the installed code and start-up hooks since the approval in force (cached 30 s:
        hashing the package takes a fraction of a second)."""
        from leukfed.client.approval import manifest

        checked, result = self._installed
        stale = time.monotonic() - checked > INSTALLED_CHECK_EVERY_S
        if stale or result.get("code_digest") != entry.get("code_digest"):
            files, hooks = manifest.code_manifest(), manifest.startup_hooks()
            result = {"code_digest": entry.get("code_digest"), "installed_digest": manifest.manifest_digest(files),
                      "changes": manifest.manifest_changes(entry.get("files") or {}, files),
                      "hook_changes": manifest.manifest_changes(entry.get("startup_hooks") or {}, hooks),
                      "checked": time.time()}
            result["matches"] = not any(result["changes"].values()) and not any(result["hook_changes"].values())
            self._installed = (time.monotonic(), result)
        return result

    def audit(self) -> dict:
        path = self.files.audit_log
        if not path.exists():
            return {"file": str(path), "exists": False, "entries": [], "verified": None}
        report = self._chain_report(path)
        entries = _tail_entries(path, AUDIT_SHOWN)
        return {"file": str(path), "exists": True, "verified": report.ok, "summary": report.summary(),
                "count": report.entries, "head": report.head, "broken_line": report.line, "problem": report.problem,
                "entries": entries[::-1]}

    def _chain_report(self, path: Path) -> ChainReport:
        """The chain check, done again only when the file changed (the page asks every 3 s; the log grows
        by a few lines a round and is read whole to check it). ctime is in the key: no one can set it back."""
        stat = path.stat()
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if self._audit[0] != signature:
            self._audit = (signature, verify_chain(path))
        return self._audit[1]

    def policy(self) -> dict:
        path = self.files.policy
        policy = SitePolicy.load(path) if path.exists() else SitePolicy()
        values = asdict(policy)
        return {"file": str(path), "in_force": path.exists(),
                "settings": [{"name": kebab(f.name), "value": values[f.name], "help": f.metadata.get("help", ""),
                              "default": f.default} for f in fields(SitePolicy)],
                "dp_budget": self.files.dp_budget}

    def privacy(self) -> dict:
        from leukfed.common.dp_accounting import PrivacyLedger

        ledger = PrivacyLedger(self.files.ledger)
        entries = ledger.entries()
        policy = SitePolicy.load(self.files.policy) if self.files.policy.exists() else SitePolicy()
        spent = ledger.epsilon(policy.dp_delta) if entries else 0.0
        budget = self.files.dp_budget or None
        runs: dict[str, int] = {}
        for entry in entries:
            runs[str(entry.get("run_id", "?"))] = runs.get(str(entry.get("run_id", "?")), 0) + 1
        return {"file": str(self.files.ledger), "entries": len(entries), "delta": policy.dp_delta,
                "epsilon_spent": spent, "budget": budget, "fraction": spent / budget if budget else None,
                "runs": runs, "last": entries[-1] if entries else None}

    def data_check(self) -> dict:
        report = dict(self.files.data_report)
        report.pop("duplicates", None)   # file lists can be long; the counts stay
        return report

    def app(self) -> WebApp:
        return WebApp("console.html", {"overview": self.overview, "approvals": self.approvals, "audit": self.audit,
                                       "policy": self.policy, "privacy": self.privacy, "data": self.data_check})


def _changes(previous: dict, entry: dict) -> dict:
    from leukfed.client.approval import manifest

    return {**manifest.manifest_changes(previous.get("files") or {}, entry.get("files") or {}),
            "hooks": manifest.describe_changes(manifest.manifest_changes(previous.get("startup_hooks") or {},
                                                                         entry.get("startup_hooks") or {}))}


def _tail_entries(path: Path, count: int) -> list[dict]:
    import json

    tail = read_tail(path, AUDIT_TAIL_BYTES)
    lines = tail.splitlines()[int(len(tail) == AUDIT_TAIL_BYTES):][-count:]   # the first may be cut
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            out.append({"unreadable": True})
            continue
        if isinstance(entry, dict):
            out.append({key: entry.get(key) for key in AUDIT_FIELDS if key in entry}
                       | {"metrics_sent": sorted(entry.get("metrics_sent") or {})})
    return out


def serve_console(files: SiteFiles, listen: str, say=print) -> ReadOnlyServer:
    host, port = console_address(listen)
    server = ReadOnlyServer(Console(files).app(), host, port)
    say(f"console: {server.url} (read-only, this machine only)")
    return server
