"""Where approval is enforced: at `leuk-client` start (`verify`), in the guarded launcher, in every task."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from leukfed.client.approval import launcher, manifest
from leukfed.client.approval.launcher import CHECK_ONLY_ENV, CONFIG_NAME, MANIFEST_FILE, SUPEREXEC_FLAG
from leukfed.client.approval.store import latest_approval
from leukfed.common.atomic import atomic_write_bytes, atomic_write_text
from leukfed.common.errors import LeukError

__all__ = ["APPROVALS_ENV", "CHECK_ONLY_ENV", "SUPEREXEC_FLAG", "guarded_clientapp_main", "verify",
           "write_guarded_launcher"]

APPROVALS_ENV = "LEUK_APPROVALS"
LAUNCHER_NAME = "flwr-clientapp"


def verify(approvals_file: str | Path, *, root: str | Path | None = None) -> None:
    """LeukError naming every changed/added/removed file unless the installed package and the
    interpreter's start-up hooks are exactly those of the latest approval."""
    entry = latest_approval(approvals_file)
    problem = manifest.refusal(entry, manifest.code_manifest(root), manifest.startup_hooks())
    if problem:
        raise LeukError(problem)


def guarded_clientapp_main(approvals_file: str | Path | None = None) -> None:
    """Flower's `flwr-clientapp`, refusing any task whose bundle or installed code is not approved.

    The check runs where Flower installs the task's bundle, before it unpacks it or imports any app
    code; a LeukError becomes the task's error reply ("<class '...LeukError'>:<'refused app bundle ...'>").
    """
    from leukfed.client.approval.bundle import verify_fab
    from leukfed.client.approval.flower_patch import prepared_flwr_clientapp

    approvals = approvals_file or os.environ.get(APPROVALS_ENV)
    if not approvals:
        raise SystemExit(f"guarded flwr-clientapp: set {APPROVALS_ENV} to the site's approvals file")

    def check(fab_content: bytes) -> None:
        verify_fab(fab_content, approvals)
        verify(approvals)

    main = prepared_flwr_clientapp(check)
    sys.argv[0] = LAUNCHER_NAME
    main()


def write_guarded_launcher(bin_dir: str | Path, approvals_file: str | Path, *, root: str | Path | None = None) -> Path:
    """Write `bin_dir/flwr-clientapp` (launcher.py run with `python -S`) and the files it reads.

    Call it after `verify`: the copies are of the verified code. Put bin_dir first on the
    SuperNode's PATH. root: the leukfed package folder the tasks import (default: the installed one).
    """
    bin_dir = Path(bin_dir).resolve()
    config = {"root": str(manifest.resolve_root(root)), "approvals": str(Path(approvals_file).resolve())}
    atomic_write_bytes(bin_dir / MANIFEST_FILE, Path(manifest.__file__).read_bytes())
    atomic_write_text(bin_dir / CONFIG_NAME, json.dumps(config, indent=1))
    source = Path(launcher.__file__).read_text(encoding="utf-8")
    body = source.split("\n", 1)[1] if source.startswith("#!") else source
    path = bin_dir / LAUNCHER_NAME
    atomic_write_bytes(path, f"#!{sys.executable} -S\n{body}".encode())
    path.chmod(0o755)
    return path
