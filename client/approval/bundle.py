"""Inspecting a Flower app bundle (FAB) before Flower unpacks it: size caps, safe names, exact content.

A bundle passes when a reviewer approved its digest, or when its content is exactly what this
(approved) leukfed's own `leukfed.common.fab.write_app_dir` produces: the same two files, the same
pyproject (ClientApp, ServerApp, every config key and default). Everything happens in memory:
nothing is written, so nothing is left behind whatever the bundle holds.
"""
from __future__ import annotations

import functools
import hashlib
import io
import stat
import tempfile
import tomllib
import zipfile
import zlib
from pathlib import Path
from typing import Any

from leukfed.common.errors import LeukError

MAX_FAB_BYTES = 1 << 20            # ours is under 2 KB; Flower's own cap is 10 MB
MAX_UNPACKED_BYTES = 10 << 20
MAX_FAB_FILES = 256
CONFIG_FILE = "pyproject.toml"
CONTENT_FILE = ".info/CONTENT"
# Files that hold no code (any other extra file is reported as code).
DATA_SUFFIXES = (".md", ".toml", ".json", ".yaml", ".yml", ".txt")


def fab_bytes(app: str | Path | bytes | None = None) -> bytes:
    """A FAB's bytes: given bytes, a .fab file, an app folder built with Flower's builder, or (None) ours."""
    from flwr.cli.build import build_fab_from_disk

    if isinstance(app, bytes):
        return app
    if app is None:
        from leukfed.common.fab import write_app_dir

        with tempfile.TemporaryDirectory() as tmp:
            return build_fab_from_disk(write_app_dir(Path(tmp) / "app"))
    path = Path(app)
    if path.is_dir():
        return build_fab_from_disk(path)
    if path.is_file():
        if path.stat().st_size > MAX_FAB_BYTES:
            raise LeukError(f"refused app bundle {path}: {path.stat().st_size:,} bytes, over {MAX_FAB_BYTES:,}")
        return path.read_bytes()
    raise LeukError(f"app bundle {path} does not exist")


def fab_digest(app: str | Path | bytes | None = None) -> str:
    """sha256 of a FAB (Flower's fab hash); None: the bundle this leukfed version submits."""
    return hashlib.sha256(fab_bytes(app)).hexdigest()


@functools.lru_cache(maxsize=1)
def own_fab() -> bytes:
    """The bundle this leukfed submits, built with Flower's deterministic builder."""
    return fab_bytes()


# --------------------------------------------------------------------------------------------
# Reading a bundle safely
# --------------------------------------------------------------------------------------------

def _unsafe_name(name: str) -> bool:
    parts = name.rstrip("/").split("/")
    return (not name or name.startswith("/") or "\\" in name or "\0" in name or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts))


def read_fab(fab: bytes) -> dict[str, bytes]:
    """{name: content} of a bundle, refusing oversized bundles, zip bombs, odd names and links."""
    if len(fab) > MAX_FAB_BYTES:
        raise LeukError(f"refused app bundle: {len(fab):,} bytes, over the {MAX_FAB_BYTES:,}-byte limit")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            infos = archive.infolist()
            _check_entries(infos)
            files = {}
            for info in infos:
                if info.is_dir():
                    continue
                with archive.open(info) as member:
                    content = member.read(info.file_size + 1)
                if len(content) != info.file_size:
                    raise LeukError(f"refused app bundle: {info.filename} is not the size its header declares")
                files[info.filename] = content
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as exc:
        raise LeukError(f"the app bundle is not a valid FAB ({exc})") from None
    return dict(sorted(files.items()))


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    if len(infos) > MAX_FAB_FILES:
        raise LeukError(f"refused app bundle: {len(infos)} entries, over the limit of {MAX_FAB_FILES}")
    unpacked = sum(info.file_size for info in infos)
    if unpacked > MAX_UNPACKED_BYTES:
        raise LeukError(f"refused app bundle: it unpacks to {unpacked:,} bytes, over the "
                        f"{MAX_UNPACKED_BYTES:,}-byte limit (zip bomb?)")
    names = [info.filename for info in infos]
    bad = [n for n in names if _unsafe_name(n)]
    if bad:
        raise LeukError(f"refused app bundle: unsafe file names {', '.join(map(repr, bad[:5]))}")
    links = [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]
    if links:
        raise LeukError(f"refused app bundle: it holds symbolic links: {', '.join(links[:5])}")
    if len(set(names)) != len(names):
        raise LeukError("refused app bundle: it holds the same file name twice")
    odd = [i.filename for i in infos if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)]
    if odd:
        raise LeukError(f"refused app bundle: unsupported compression for {', '.join(odd[:5])}")


def fab_summary(fab: bytes) -> dict[str, Any]:
    """Digest, name, version, publisher, components, config, files and code files of a bundle."""
    files = read_fab(fab)
    if CONFIG_FILE not in files:
        raise LeukError(f"the app bundle is not a valid FAB (no {CONFIG_FILE})")
    try:
        project = tomllib.loads(files[CONFIG_FILE].decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LeukError(f"the app bundle is not a valid FAB ({exc})") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    names = list(files)
    code = [n for n in names if n not in (CONFIG_FILE, CONTENT_FILE) and not n.endswith(DATA_SUFFIXES)]
    return {"digest": hashlib.sha256(fab).hexdigest(), "name": project.get("project", {}).get("name", ""),
            "version": project.get("project", {}).get("version", ""), "publisher": app.get("publisher", ""),
            "components": dict(app.get("components", {})), "config": dict(app.get("config", {})),
            "project": project, "files": names, "code_files": code,
            "config_file": files[CONFIG_FILE], "content": files.get(CONTENT_FILE, b"")}


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------

def bundle_refusal(summary: dict[str, Any], own: dict[str, Any], clientapp: str) -> str | None:
    """Why a bundle is not leukfed's own bundle for ClientApp `clientapp` (None: it is)."""
    extra = [n for n in summary["files"] if n not in own["files"]]
    if summary["code_files"]:
        shown = ", ".join(summary["code_files"][:5]) + (" ..." if len(summary["code_files"]) > 5 else "")
        return f"it carries code this hospital has not approved: {shown}"
    if extra or len(summary["files"]) != len(own["files"]):
        missing = [n for n in own["files"] if n not in summary["files"]]
        return f"its files are not leukfed's own bundle's (extra: {', '.join(extra) or '-'}; missing: {', '.join(missing) or '-'})"
    got = summary["components"].get("clientapp", "")
    if got != clientapp:
        return f"its ClientApp is {got or 'missing'}, not the approved {clientapp}"
    if summary["components"] != own["components"]:
        return f"its components {summary['components']} are not leukfed's {own['components']}"
    config = _config_differences(own["config"], summary["config"])
    if config:
        return f"its config is not leukfed {own['version']}'s ({config})"
    fields = _differing_fields(own["project"], summary["project"])
    if fields:
        return f"its pyproject differs from leukfed {own['version']}'s in {', '.join(fields)}"
    config_file = summary["config_file"]
    if summary["content"] != f"{CONFIG_FILE},{hashlib.sha256(config_file).hexdigest()},{len(config_file) * 8}".encode():
        return f"its {CONTENT_FILE} does not list exactly its {CONFIG_FILE}"
    return None


def _differing_fields(own: Any, theirs: Any, prefix: str = "") -> list[str]:
    """Dotted names of the pyproject fields where two parsed pyprojects differ."""
    if not (isinstance(own, dict) and isinstance(theirs, dict)):
        return [] if own == theirs else [prefix or "the whole file"]
    return [field for key in sorted(set(own) | set(theirs))
            for field in _differing_fields(own.get(key), theirs.get(key), f"{prefix}.{key}" if prefix else key)]


def _config_differences(own: dict[str, Any], theirs: dict[str, Any]) -> str:
    changed = [f"{k} = {theirs[k]!r} instead of {own[k]!r}" for k in sorted(own) if k in theirs and theirs[k] != own[k]]
    added = sorted(k for k in theirs if k not in own)
    removed = sorted(k for k in own if k not in theirs)
    parts = [f"changed defaults: {', '.join(changed)}"] if changed else []
    parts += [f"added keys: {', '.join(added)}"] if added else []
    parts += [f"removed keys: {', '.join(removed)}"] if removed else []
    return "; ".join(parts)


def verify_fab(fab: bytes, approvals_file: str | Path) -> dict[str, Any]:
    """LeukError unless the bundle is approved: by digest, or exactly leukfed's own bundle."""
    from leukfed.client.approval.store import latest_approval

    entry = latest_approval(approvals_file)
    summary = fab_summary(fab)
    if summary["digest"] in entry.get("approved_fabs", []):
        return summary
    from leukfed.common.fab import CLIENTAPP

    problem = bundle_refusal(summary, fab_summary(own_fab()), entry.get("clientapp", CLIENTAPP))
    if problem:
        raise LeukError(f"refused app bundle {summary['name']} {summary['version']} ({summary['digest'][:12]}): {problem}")
    return summary
