"""The site's approvals file: who approved which code and bundles, when (JSON, atomic writes).

The last entry is the approval in force; earlier entries stay as history. Beside the file, a
snapshot of every approved text file up to 1 MiB (`<name>.snapshots/<digest>.zip`) lets the next
review show a diff; larger and binary files are covered by their digests only.
"""
from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from leukfed.client.approval import manifest
from leukfed.common.atomic import atomic_write_json, atomic_write_stream
from leukfed.common.errors import LeukError

FORMAT = 2   # 2: every file of the package and the start-up hooks (1: *.py only)
DIFFABLE_MAX_BYTES = 1 << 20   # a review diffs text files up to this size; an editable install's tree can hold
                               # gigabytes of run outputs, which a snapshot must neither copy nor load


def load_approvals(approvals_file: str | Path) -> dict[str, Any]:
    """The whole approvals file (an empty history when it does not exist yet)."""
    try:
        data = manifest.read_approvals(Path(approvals_file))
    except manifest.ApprovalMissing as exc:
        raise LeukError(str(exc)) from None
    return {"format": FORMAT, "approvals": []} if data is None else data


def latest_approval(approvals_file: str | Path) -> dict[str, Any]:
    """The approval in force; LeukError when there is none."""
    try:
        return manifest.read_latest_approval(approvals_file)
    except manifest.ApprovalMissing as exc:
        raise LeukError(str(exc)) from None


def last_approval(approvals_file: str | Path) -> dict[str, Any] | None:
    approvals = load_approvals(approvals_file)["approvals"]
    return approvals[-1] if approvals else None


def approve(approvals_file: str | Path, reviewer: str, note: str = "", *, root: str | Path | None = None,
            fabs: list[str | Path | bytes] | None = None) -> dict[str, Any]:
    """Record that `reviewer` approved the installed code (and optionally app bundles) now.

    `fabs`: bundles that may carry code and are approved by digest (e.g. a connectivity-test app).
    """
    from leukfed.client.approval.bundle import fab_bytes, fab_digest, read_fab

    if not reviewer.strip():
        raise LeukError("an approval needs the reviewer's name (--reviewer)")
    path = Path(approvals_file)
    root_path = manifest.resolve_root(root)
    files = manifest.code_manifest(root_path)
    bundles = [fab_bytes(f) for f in fabs or []]
    for bundle in bundles:
        read_fab(bundle)                      # size caps and safe names hold for approved bundles too
    data = load_approvals(path)
    data["format"] = FORMAT
    digest = manifest.manifest_digest(files)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reviewer": reviewer.strip(),
        "note": note,
        "leukfed_version": manifest.installed_version(root_path),
        "code_digest": digest,
        "files": files,
        "startup_hooks": manifest.startup_hooks(),
        "clientapp": _clientapp(),
        "fab_digest": own_fab_digest(root),
        "approved_fabs": sorted({fab_digest(b) for b in bundles}),
        "python": sys.version.split()[0],
        "flwr": flwr_version(),
    }
    _write_snapshot(snapshot_path(path, digest), root_path, files)
    data["approvals"].append(entry)
    atomic_write_json(path, data)
    return entry


def _clientapp() -> str:
    from leukfed.common.fab import CLIENTAPP

    return CLIENTAPP


def own_fab_digest(root: str | Path | None) -> str | None:
    """The digest of the bundle this leukfed submits (None when looking at a copied tree)."""
    if root is not None and Path(root).resolve() != manifest.package_root():
        return None
    try:
        from leukfed.client.approval.bundle import fab_digest

        return fab_digest()
    except Exception:  # noqa: BLE001 - informational only
        return None


def flwr_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001
        return "unknown"


# --------------------------------------------------------------------------------------------
# Snapshots of the approved files (for the next review's diff)
# --------------------------------------------------------------------------------------------

def snapshot_path(approvals_file: Path, code_digest: str) -> Path:
    return approvals_file.parent / f"{approvals_file.stem}.snapshots" / f"{code_digest[:16]}.zip"


def diffable_text(path: Path) -> bytes | None:
    """The file's bytes when a review can show them as a diff: a regular text file (no NUL byte) of at most
    DIFFABLE_MAX_BYTES; None otherwise (and never a FIFO or device opened: reading it could block)."""
    try:
        if not path.is_file() or path.stat().st_size > DIFFABLE_MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return None if b"\0" in data else data


def _write_snapshot(path: Path, root: Path, files: dict[str, str]) -> None:
    def write(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for rel in sorted(files):
                text = diffable_text(root / rel)
                if text is not None:
                    archive.writestr(zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0)), text)

    atomic_write_stream(path, write)


def snapshot_files(approvals_file: Path, code_digest: str, names: Iterable[str]) -> dict[str, bytes]:
    """The approved contents of `names` that the snapshot holds."""
    path = snapshot_path(approvals_file, code_digest)
    if not path.exists():
        return {}
    with zipfile.ZipFile(path) as archive:
        small = {i.filename for i in archive.infolist() if i.file_size <= DIFFABLE_MAX_BYTES}  # older snapshots
        return {n: archive.read(n) for n in names if n in small}                             # held every file
