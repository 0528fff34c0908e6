"""The console's audit page on a long log: the newest entries from the log's end, the check redone on any change."""
from __future__ import annotations

import os
from pathlib import Path

from leukfed.client.audit import append_entry
from leukfed.client.console import AUDIT_SHOWN, AUDIT_TAIL_BYTES, Console, SiteFiles


def test_a_long_log_shows_its_newest_entries_and_an_edit_with_its_time_put_back_is_found(tmp_path: Path) -> None:
    files = SiteFiles(site="h1", state=tmp_path, approvals=tmp_path / "approvals.json", data=tmp_path / "data")
    padding = "x" * 900
    for task in range(800):                          # ~0.8 MB: more than the tail the page reads
        append_entry(files.audit_log, {"message": "train", "round": task, "outcome": padding})
    assert files.audit_log.stat().st_size > AUDIT_TAIL_BYTES
    console = Console(files)

    page = console.audit()
    assert page["verified"] and page["count"] == 800
    assert [e["round"] for e in page["entries"]] == list(range(799, 799 - AUDIT_SHOWN, -1))
    assert not any(e.get("unreadable") for e in page["entries"])
    assert console.audit()["summary"] == page["summary"]

    stat = files.audit_log.stat()
    text = files.audit_log.read_text()
    files.audit_log.write_text(text.replace('"round":3,', '"round":4,', 1))   # same size, an old line
    os.utime(files.audit_log, ns=(stat.st_atime_ns, stat.st_mtime_ns))       # and its time put back
    edited = console.audit()
    assert edited["verified"] is False and edited["broken_line"] == 4, edited["summary"]
