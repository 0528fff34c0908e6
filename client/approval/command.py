"""`leuk-client approve`: show the installed code and what changed since the last approval, then record it."""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

import typer

from leukfed.client.approval import manifest
from leukfed.client.approval.store import (
    DIFFABLE_MAX_BYTES,
    approve,
    diffable_text,
    flwr_version,
    last_approval,
    own_fab_digest,
    snapshot_files,
)
from leukfed.common.errors import LeukError


def show_code_summary(approvals_file: str | Path | None = None, *, root: str | Path | None = None,
                      max_diff_lines: int = 400) -> str:
    """Version, files, start-up hooks, digests and the changes since the last approval (with a text diff)."""
    root_path = manifest.resolve_root(root)
    files = manifest.code_manifest(root_path)
    hooks = manifest.startup_hooks()
    python_files = sum(p.endswith(".py") for p in files)
    lines = [f"leukfed {manifest.installed_version(root_path)} at {root_path}",
             (f"code: {len(files)} files ({python_files} Python files), "
              f"{sum((root_path / p).stat().st_size for p in files):,} bytes, digest {manifest.manifest_digest(files)}"),
             f"start-up hooks: {len(hooks)} files (.pth files of the site directories and the modules they import)"]
    own = own_fab_digest(root)
    if own:
        lines.append(f"app bundle: leukfed's own (pyproject only), FAB digest {own}")
    lines.append(f"python {sys.version.split()[0]}, flwr {flwr_version()}")
    entry = last_approval(approvals_file) if approvals_file is not None else None
    if entry is None:
        lines.append("no previous approval: every file is new")
        lines += [f"  {p}" for p in files] + [f"  hook {p}" for p in hooks]
        return "\n".join(lines)
    lines.append(f"last approval: {entry['time']} by {entry['reviewer']}"
                 + (f" ({entry['note']})" if entry.get("note") else "")
                 + f", leukfed {entry.get('leukfed_version', '?')}, digest {entry['code_digest']}")
    changes = manifest.manifest_changes(entry["files"], files)
    hook_changes = manifest.manifest_changes(entry.get("startup_hooks", {}), hooks)
    if not any(changes.values()) and not any(hook_changes.values()):
        lines.append("unchanged since the last approval")
        return "\n".join(lines)
    for kind, paths in changes.items():
        lines += [f"{kind}: {p}" for p in paths]
    for kind, paths in hook_changes.items():
        lines += [f"{kind} start-up hook: {p}" for p in paths]
    lines += _diff(Path(approvals_file), entry["code_digest"], root_path, changes, max_diff_lines)
    return "\n".join(lines)


def _diff(approvals_file: Path, code_digest: str, root: Path, changes: dict[str, list[str]],
          max_lines: int) -> list[str]:
    listed = changes["changed"] + changes["added"] + changes["removed"]
    old_files = snapshot_files(approvals_file, code_digest, changes["changed"] + changes["removed"])
    diff: list[str] = []
    not_diffed = 0
    for index, rel in enumerate(listed):
        if len(diff) > max_lines:        # past what is shown: the rest is not read
            not_diffed = len(listed) - index
            break
        old = old_files.get(rel, b"")
        new = b"" if rel in changes["removed"] else diffable_text(root / rel)
        if new is None or b"\0" in old or (rel in changes["removed"] and rel not in old_files):
            diff.append(f"(binary file or over {DIFFABLE_MAX_BYTES >> 20} MiB, {rel}: content diff not shown)\n")
            continue
        if rel in changes["changed"] and not old:
            diff.append(f"(no snapshot of the approved {rel}: content diff unavailable)\n")
            continue
        diff += difflib.unified_diff(old.decode("utf-8", "replace").splitlines(keepends=True),
                                     new.decode("utf-8", "replace").splitlines(keepends=True),
                                     f"approved/{rel}", f"installed/{rel}")
    if not diff:
        return []
    shown = ["diff against the approved code:", "".join(diff[:max_lines]).rstrip("\n")]
    if len(diff) > max_lines:
        shown.append(f"... {len(diff) - max_lines} more diff lines"
                     + (f", and {not_diffed} more files not diffed" if not_diffed else ""))
    return shown


def approve_command(
    approvals: Path = typer.Option(..., "--approvals", help="This site's approvals file (JSON)."),
    reviewer: str = typer.Option(..., "--reviewer", help="Name of the person approving."),
    note: str = typer.Option("", "--note", help="What was reviewed (release, ticket, ...)."),
    yes: bool = typer.Option(False, "--yes", help="Record the approval without asking."),
) -> None:
    """Show the installed leukfed code (and what changed since the last approval), then approve it."""
    typer.echo(show_code_summary(approvals))
    if not yes and not typer.confirm(f"Approve this code for this site as {reviewer}?", default=False):
        raise LeukError("not approved: nothing was recorded")
    entry = approve(approvals, reviewer, note)
    typer.echo(f"approved by {entry['reviewer']} at {entry['time']}: code digest {entry['code_digest']}"
               f" ({len(entry['files'])} files, {len(entry['startup_hooks'])} start-up hooks), recorded in {approvals}")
