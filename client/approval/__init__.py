"""Hospital approval of the code a site runs: every file of the installed leukfed package, the
interpreter's start-up hooks, and the app bundle (FAB) of each task.

A reviewer at the hospital runs `leuk-client approve` (`command.py`): it shows the installed code
(version, files, digest, what changed since the last approval, with a diff against the snapshot
kept at that approval) and records the approval (`store.py`). What is hashed: `manifest.py`. Then:

  * `verify(approvals_file)` (`enforce.py`) refuses, naming each file, when the installed package or
    the start-up hooks differ from the latest approval (`leuk-client` calls it at start);
  * `verify_fab(fab, approvals_file)` (`bundle.py`) refuses a bundle that is neither approved by digest
    nor exactly leukfed's own bundle, after size caps and zip checks, without writing anything;
  * `write_guarded_launcher` installs `launcher.py` as the site's `flwr-clientapp`: every task process
    checks the package and start-up hooks before any of them runs, then the task's bundle before Flower
    unpacks it (`flower_patch.py`, the one change inside Flower). A refusal reaches the coordinator as
    the task's error; the code in question never runs.

Flower's own `flower-supernode --trusted-entities` (ed25519 FAB signatures) cannot do this offline: a
FAB submitted with `flwr run APP_DIR` carries no verification records (they come only from Flower Hub),
and a FAB signature would not cover the installed package, which is where our code lives.
Importing this package is light (no flwr, no torch): `leuk-client approve` uses it.
"""
from __future__ import annotations

from leukfed.client.approval.bundle import fab_bytes, fab_digest, fab_summary, read_fab, verify_fab
from leukfed.client.approval.command import approve_command, show_code_summary
from leukfed.client.approval.enforce import (
    APPROVALS_ENV,
    CHECK_ONLY_ENV,
    SUPEREXEC_FLAG,
    guarded_clientapp_main,
    verify,
    write_guarded_launcher,
)
from leukfed.client.approval.flower_patch import apply_install_from_fab_patch, prepared_flwr_clientapp
from leukfed.client.approval.manifest import (
    code_manifest,
    manifest_digest,
    package_root,
    startup_hooks,
    stdlib_manifest,
)
from leukfed.client.approval.store import approve, load_approvals
from leukfed.common.fab import CLIENTAPP as APPROVED_CLIENTAPP

__all__ = ["APPROVALS_ENV", "APPROVED_CLIENTAPP", "CHECK_ONLY_ENV", "SUPEREXEC_FLAG", "apply_install_from_fab_patch",
           "approve", "approve_command", "code_manifest", "fab_bytes", "fab_digest", "fab_summary",
           "guarded_clientapp_main", "load_approvals", "manifest_digest", "package_root", "prepared_flwr_clientapp",
           "read_fab", "show_code_summary", "startup_hooks", "stdlib_manifest", "verify", "verify_fab",
           "write_guarded_launcher"]
