"""The site's append-only audit log: one JSON line per message answered."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, Message

from leukfed.common.flower.wire import record_digest
from leukfed.common.fedconfig import SiteConfig


def append_audit(site: SiteConfig, msg: Message, *, kind: str, metrics: dict, sent: ArrayRecord | None) -> None:
    """Record what left the site: bytes, the update's sha256, the metrics; never data."""
    if not site.audit_log:
        return
    received = msg.content.array_records.get("arrays")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "site": site.name,
        "run_id": msg.metadata.run_id,
        "message": kind,
        "round": msg.content.config_records["config"].get("server-round") if "config" in msg.content.config_records else None,
        "server_fingerprint": site.extra.get("server_fingerprint"),
        "bytes_in": received.count_bytes() if received is not None else 0,
        "bytes_out": sent.count_bytes() if sent is not None else 0,
        "update_sha256": record_digest(sent) if sent is not None else None,
        "metrics_sent": metrics,
    }
    path = Path(site.audit_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_APPEND keeps concurrent writers from interleaving within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)
