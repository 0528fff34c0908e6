"""The site's audit log: one hash-chained JSON line per task (answered, refused or failed), and its check."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leukfed.common.errors import LeukError

if TYPE_CHECKING:  # the verify command stays light: no flwr or torch import at run time
    from flwr.app import Context, Message

# Every entry carries its number (`seq`, from 1), the previous entry's hash (`prev`; the first links to
# GENESIS) and its own `hash`: sha256 of its canonical JSON without the `hash` field.
GENESIS = hashlib.sha256(b"leukfed audit log v1").hexdigest()
_TAIL_CHUNK = 1 << 16


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"}).encode()).hexdigest()


def append_entry(path: str | Path, entry: dict) -> dict:
    """Chain `entry` to the log's last line and append it as one fsync'd line, under an exclusive
    lock (concurrent tasks of one site append one after the other). Returns the entry as written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        seq, prev = _chain_tail(fd)
        chained = {**entry, "seq": seq, "prev": prev}
        chained["hash"] = entry_hash(chained)
        size = os.fstat(fd).st_size
        start = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""  # end a damaged last line
        os.write(fd, start + (canonical_json(chained) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if created:
        _fsync_dir(path.parent)
    return chained


def _chain_tail(fd: int) -> tuple[int, str]:
    """(seq, prev) for the next entry, from the last line of the open log."""
    last = _last_line(fd)
    if last is None:
        return 1, GENESIS
    try:
        entry = json.loads(last)
        return int(entry["seq"]) + 1, str(entry["hash"])
    except (ValueError, KeyError, TypeError):  # a damaged or pre-chain last line: link to its bytes
        return _count_lines(fd) + 1, hashlib.sha256(last).hexdigest()


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    end = size
    while end > 0 and os.pread(fd, 1, end - 1) == b"\n":
        end -= 1
    if end == 0:
        return None
    start, chunk = end, _TAIL_CHUNK
    while start > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1:]
        chunk *= 2
    return os.pread(fd, end, 0)


def _count_lines(fd: int) -> int:
    count, offset = 0, 0
    while data := os.pread(fd, 1 << 20, offset):
        count += data.count(b"\n")
        offset += len(data)
    return count + (1 if offset and os.pread(fd, 1, offset - 1) != b"\n" else 0)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ChainReport:
    entries: int
    head: str              # the last entry's hash: write it down elsewhere to detect removed LAST lines
    line: int = 0          # the first broken line (1-based); 0: intact
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def summary(self) -> str:
        if self.ok:
            return f"audit log OK: {self.entries} entries, chain head {self.head}"
        return f"audit log BROKEN at line {self.line}: {self.problem}"


def verify_chain(path: str | Path) -> ChainReport:
    """Check every line's hash, number and link; report the first line that is not what was written."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LeukError(f"cannot read audit log {path}: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    complete = lines[:-1]          # the text after the last newline is an unfinished (truncated) line
    parsed = [_parse(line) for line in complete]
    seqs = {entry["seq"]: number for number, entry in enumerate(parsed, 1)
            if entry is not None and type(entry.get("seq")) is int}
    prev = GENESIS
    for number, entry in enumerate(parsed, 1):
        if entry is None:
            return ChainReport(number - 1, prev, number, "not a complete audit entry (edited or damaged)")
        if entry.get("hash") != entry_hash(entry):
            return ChainReport(number - 1, prev, number, "edited: its content does not match its hash")
        if entry.get("seq") != number:
            return ChainReport(number - 1, prev, number, _misplaced(entry.get("seq"), number, seqs))
        if entry.get("prev") != prev:
            problem = (f"does not link to line {number - 1}: line {number - 1} was replaced, or edited and rehashed"
                       if number > 1 else "does not link to the chain's start: entries before it were removed")
            return ChainReport(number - 1, prev, number, problem)
        prev = entry["hash"]
    if lines[-1]:
        return ChainReport(len(complete), prev, len(complete) + 1, "truncated: the last line is incomplete")
    return ChainReport(len(complete), prev)


def _parse(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _misplaced(seq: Any, number: int, seqs: dict) -> str:
    if number in seqs:
        return (f"holds entry {seq} where entry {number} belongs: lines were reordered "
                f"(entry {number} is on line {seqs[number]})")
    if isinstance(seq, int) and seq > number:
        gap = f"entry {number}" if seq == number + 1 else f"entries {number}-{seq - 1}"
        return f"holds entry {seq} where entry {number} belongs: {gap} removed"
    return f"holds entry {seq!r} where entry {number} belongs: lines were copied or renumbered"


# ---- what a task's entry records (the ClientApp calls these; Flower objects are read, not imported) ----

def task_entry(message: Message, context: Context, *, outcome: str, started_wall: float, seconds: float,
               reply: Message | None = None, detail: dict | None = None) -> dict:
    """One task's record: who asked what, under which run config, and exactly what left the site."""
    message_type = _safe(lambda: str(message.metadata.message_type), "?")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "seconds": round(seconds, 6),
        "site": str(context.node_config.get("site-name", "")),
        "run_id": _safe(lambda: int(message.metadata.run_id)),
        "message_id": _safe(lambda: str(message.metadata.message_id)),
        "message_type": message_type,
        "message": message_type if outcome == "answered" else f"{message_type}-{outcome}",
        "outcome": outcome,
        "round": _safe(lambda: _round(message)),
        "run_config_sha256": hashlib.sha256(canonical_json(dict(context.run_config)).encode()).hexdigest(),
        "server_fingerprint": context.node_config.get("server-fingerprint") or None,
        "bytes_in": _safe(lambda: _bytes(message), 0),
        **_sent(reply),
        **(detail or {}),
    }
    return entry


def _sent(reply: Message | None) -> dict:
    """What the reply carries: array digest and sizes, metric names and values, config values, error."""
    from leukfed.client.wire_checks import record_sha256

    if reply is None:
        return {"bytes_out": 0, "update_sha256": None, "arrays_sent": 0, "metrics_sent": {}}
    if reply.has_error():
        return {"bytes_out": 0, "update_sha256": None, "arrays_sent": 0, "metrics_sent": {},
                "reason_sent": reply.error.reason, "error_code_sent": reply.error.code}
    arrays = list(reply.content.array_records.values())
    metrics: dict = {}
    for record in reply.content.metric_records.values():
        metrics.update(dict(record))
    configs = {name: {k: _plain(v) for k, v in record.items()} for name, record in reply.content.config_records.items()}
    return {"bytes_out": sum(r.count_bytes() for r in arrays),
            "update_sha256": record_sha256(arrays[0]) if len(arrays) == 1 else
            ([record_sha256(r) for r in arrays] or None),
            "arrays_sent": sum(_array_count(r) for r in arrays), "metrics_sent": metrics,
            **({"config_sent": configs} if configs else {})}


def _array_count(record) -> int:
    from leukfed.client.wire_checks import array_entries

    return sum(1 for _ in array_entries(record))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest(), "bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _round(message: Message) -> int | None:
    config = message.content.config_records.get("config")
    if config is None or "server-round" not in config:
        return None
    return int(config["server-round"]) + int(config.get("round-offset", 0))


def _bytes(message: Message) -> int:
    return sum(r.count_bytes() for r in message.content.array_records.values())


def _safe(read, default=None):
    """A field read from the message: the server controls it, so garbage must not stop the record."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - any malformed field is recorded as unknown
        return default
