"""Hospital approval of the code a site runs: the installed leukfed package and the app bundle (FAB).

What runs at a site when the coordinator starts a run:
  1. the FAB the coordinator submitted: ours is only a pyproject.toml naming
     `leukfed.client.client_app:app` plus config defaults, but Flower would just as happily run
     a FAB that carries its own Python code;
  2. the leukfed package installed at the site (the ClientApp's code).

A reviewer at the hospital runs `leuk-client approve`: it shows the installed code (version,
files, digest, what changed since the last approval, with a text diff against the snapshot kept
at that approval) and records the approval in an approvals file (JSON, atomic writes). Then:

  * `verify(approvals_file)` raises LeukError naming every changed/added/removed file when the
    installed code is not the approved code (call it at `leuk-client start`);
  * `verify_fab(fab_bytes, approvals_file)` refuses a bundle that carries code, names another
    ClientApp, or is not among the bundles the reviewer approved by digest;
  * `write_guarded_launcher` writes a drop-in `flwr-clientapp` (Flower's SubprocessExecutor starts
    every task as `flwr-clientapp ...` through PATH): for every task it hashes the installed code
    with the standard library BEFORE importing any leukfed module, then checks the task's FAB
    before Flower installs it or imports its code. A refusal reaches the coordinator as the
    task's error reason; the code in question never runs.

Flower's own `flower-supernode --trusted-entities` (ed25519 FAB signatures) cannot do this
offline: a FAB submitted with `flwr run APP_DIR` carries no verification records (they come only
from Flower Hub, online), so such a SuperNode answers every message with "The FAB could not be
verified. App verification is not supported by the connected SuperLink." And a FAB signature
would not cover the installed package, which is where our code lives.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import typer
from leukfed.common.atomic import atomic_write_bytes, atomic_write_json
from leukfed.common.errors import LeukError

FORMAT = 1
APPROVED_CLIENTAPP = "leukfed.client.client_app:app"
# Files a code-free bundle may carry besides pyproject.toml (Flower adds .info/CONTENT).
FAB_DATA_SUFFIXES = (".md", ".toml", ".json", ".yaml", ".yml", ".txt")


# --------------------------------------------------------------------------------------------
# What is installed
# --------------------------------------------------------------------------------------------

def package_root() -> Path:
    """The folder of the installed leukfed package (the repository root for an editable install)."""
    import leukfed

    return Path(leukfed.__file__).resolve().parent


def stdlib_manifest(root):
    """{relative POSIX path: sha256} of every .py file Python could import from `root` as leukfed.*.

    Standard library only: the guarded launcher embeds this function's source and runs it before
    importing any leukfed module.
    """
    import hashlib
    import os

    manifest = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "build", "dist")
                         and not d.endswith(".egg-info"))
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                manifest[os.path.relpath(path, root).replace(os.sep, "/")] = digest
    return dict(sorted(manifest.items()))


def code_manifest(root: str | Path | None = None) -> dict[str, str]:
    """{relative POSIX path: sha256} of the package's .py files (default: the installed leukfed)."""
    root = Path(root).resolve() if root is not None else package_root()
    if not root.is_dir():
        raise LeukError(f"code folder {root} does not exist")
    return stdlib_manifest(str(root))


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 for a whole manifest (sorted `path sha256` lines)."""
    text = "".join(f"{path}\t{digest}\n" for path, digest in sorted(manifest.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def installed_version(root: str | Path | None = None) -> str:
    """leukfed.__version__ as written in the package's __init__.py (no import of a copied tree)."""
    init = (Path(root) if root is not None else package_root()) / "__init__.py"
    for line in init.read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def fab_digest(app: str | Path | bytes | None = None) -> str:
    """sha256 of a FAB (Flower's fab hash): of FAB bytes, of a .fab file, or built from an app folder.

    None: the bundle this leukfed version submits (`leukfed.server.flwr_app.write_app_dir`),
    built with Flower's deterministic builder, i.e. the hash a SuperNode sees for our runs.
    """
    return hashlib.sha256(fab_bytes(app)).hexdigest()


def fab_bytes(app: str | Path | bytes | None = None) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    if isinstance(app, bytes):
        return app
    if app is None:
        from leukfed.server.flwr_app import write_app_dir

        with tempfile.TemporaryDirectory() as tmp:
            return build_fab_from_disk(write_app_dir(Path(tmp) / "app"))
    path = Path(app)
    if path.is_dir():
        return build_fab_from_disk(path)
    if path.is_file():
        return path.read_bytes()
    raise LeukError(f"app bundle {path} does not exist")


def fab_summary(fab: bytes) -> dict[str, Any]:
    """Files, components and code files of a FAB (a zip with pyproject.toml and .info/CONTENT)."""
    import tomllib

    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = sorted(archive.namelist())
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LeukError(f"the app bundle is not a valid FAB ({exc})") from None
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    code = [n for n in names if n not in ("pyproject.toml", ".info/CONTENT") and not n.endswith(FAB_DATA_SUFFIXES)]
    return {"digest": hashlib.sha256(fab).hexdigest(), "name": project.get("project", {}).get("name", ""),
            "version": project.get("project", {}).get("version", ""), "publisher": app.get("publisher", ""),
            "components": dict(app.get("components", {})), "files": names, "code_files": code}


# --------------------------------------------------------------------------------------------
# Approvals file
# --------------------------------------------------------------------------------------------

def load_approvals(approvals_file: str | Path) -> dict[str, Any]:
    path = Path(approvals_file)
    if not path.exists():
        return {"format": FORMAT, "approvals": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LeukError(f"cannot read the approvals file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("approvals"), list):
        raise LeukError(f"{path} is not a leukfed approvals file")
    return data


def last_approval(approvals_file: str | Path) -> dict[str, Any] | None:
    approvals = load_approvals(approvals_file)["approvals"]
    return approvals[-1] if approvals else None


def _snapshot_path(approvals_file: Path, code_digest: str) -> Path:
    return approvals_file.parent / f"{approvals_file.stem}.snapshots" / f"{code_digest[:16]}.zip"


def _write_snapshot(path: Path, root: Path, manifest: dict[str, str]) -> None:
    """The approved sources, so the next review can show a real diff."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in sorted(manifest):
            archive.writestr(zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0)), (root / rel).read_bytes())
    atomic_write_bytes(path, buffer.getvalue())


def approve(approvals_file: str | Path, reviewer: str, note: str = "", *, root: str | Path | None = None,
            fabs: list[str | Path | bytes] | None = None) -> dict[str, Any]:
    """Record that `reviewer` approved the installed code (and optionally app bundles) now.

    The new entry becomes the one in force; earlier entries stay as history. `fabs`: bundles
    that may carry code and are approved by digest (e.g. a connectivity-test app).
    """
    if not reviewer.strip():
        raise LeukError("an approval needs the reviewer's name (--reviewer)")
    path = Path(approvals_file)
    root_path = Path(root).resolve() if root is not None else package_root()
    manifest = code_manifest(root_path)
    data = load_approvals(path)
    digest = manifest_digest(manifest)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reviewer": reviewer.strip(),
        "note": note,
        "leukfed_version": installed_version(root_path),
        "code_digest": digest,
        "files": manifest,
        "clientapp": APPROVED_CLIENTAPP,
        "fab_digest": _own_fab_digest(root),
        "approved_fabs": sorted({fab_digest(f) for f in (fabs or [])}),
        "python": sys.version.split()[0],
        "flwr": _flwr_version(),
    }
    _write_snapshot(_snapshot_path(path, digest), root_path, manifest)
    data["approvals"].append(entry)
    atomic_write_json(path, data)
    return entry


def _own_fab_digest(root: str | Path | None) -> str | None:
    """The digest of the bundle this leukfed submits (None when checking a copied tree)."""
    if root is not None and Path(root).resolve() != package_root():
        return None
    try:
        return fab_digest()
    except Exception:  # noqa: BLE001 - informational only
        return None


def _flwr_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001
        return "unknown"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def manifest_changes(approved: dict[str, str], current: dict[str, str]) -> dict[str, list[str]]:
    return {"changed": sorted(p for p in current if p in approved and current[p] != approved[p]),
            "added": sorted(p for p in current if p not in approved),
            "removed": sorted(p for p in approved if p not in current)}


def describe_changes(changes: dict[str, list[str]]) -> str:
    return "; ".join(f"{kind}: {', '.join(paths)}" for kind, paths in changes.items() if paths)


def verify(approvals_file: str | Path, *, root: str | Path | None = None) -> None:
    """LeukError unless the installed code is exactly the code of the latest approval."""
    entry = last_approval(approvals_file)
    if entry is None:
        raise LeukError(f"no approval recorded in {approvals_file}: a reviewer must run `leuk-client approve` first")
    current = code_manifest(root)
    if manifest_digest(current) == entry["code_digest"] and current == entry["files"]:
        return
    changes = describe_changes(manifest_changes(entry["files"], current))
    raise LeukError(f"the installed leukfed code is not the code {entry['reviewer']} approved on {entry['time']} "
                    f"({changes}); review it with `leuk-client approve`")


def verify_fab(fab: bytes, approvals_file: str | Path) -> dict[str, Any]:
    """LeukError unless the bundle is approved: by digest, or code-free and naming our ClientApp."""
    entry = last_approval(approvals_file)
    if entry is None:
        raise LeukError(f"no approval recorded in {approvals_file}: a reviewer must run `leuk-client approve` first")
    summary = fab_summary(fab)
    if summary["digest"] in entry.get("approved_fabs", []):
        return summary
    if summary["code_files"]:
        shown = ", ".join(summary["code_files"][:5]) + (" ..." if len(summary["code_files"]) > 5 else "")
        raise LeukError(f"refused app bundle {summary['name']} {summary['version']} ({summary['digest'][:12]}): "
                        f"it carries code this hospital has not approved: {shown}")
    clientapp = summary["components"].get("clientapp", "")
    if clientapp != entry.get("clientapp", APPROVED_CLIENTAPP):
        raise LeukError(f"refused app bundle {summary['name']} {summary['version']}: its ClientApp is "
                        f"{clientapp or 'missing'}, not the approved {entry.get('clientapp', APPROVED_CLIENTAPP)}")
    return summary


# --------------------------------------------------------------------------------------------
# What `leuk-client approve` prints
# --------------------------------------------------------------------------------------------

def _snapshot_sources(approvals_file: Path, code_digest: str) -> dict[str, str]:
    path = _snapshot_path(approvals_file, code_digest)
    if not path.exists():
        return {}
    with zipfile.ZipFile(path) as archive:
        return {n: archive.read(n).decode("utf-8", errors="replace") for n in archive.namelist()}


def show_code_summary(approvals_file: str | Path | None = None, *, root: str | Path | None = None,
                      max_diff_lines: int = 400) -> str:
    """Version, files, digests and the changes since the last approval (with a text diff)."""
    root_path = Path(root).resolve() if root is not None else package_root()
    manifest = code_manifest(root_path)
    lines = [f"leukfed {installed_version(root_path)} at {root_path}",
             (f"code: {len(manifest)} Python files, {sum((root_path / p).stat().st_size for p in manifest):,} bytes, "
              f"digest {manifest_digest(manifest)}")]
    own = _own_fab_digest(root)
    if own:
        lines.append(f"app bundle: ClientApp {APPROVED_CLIENTAPP}, FAB digest {own}")
    lines.append(f"python {sys.version.split()[0]}, flwr {_flwr_version()}")
    entry = last_approval(approvals_file) if approvals_file is not None else None
    if entry is None:
        lines.append("no previous approval: every file is new")
        lines += [f"  {p}" for p in sorted(manifest)]
        return "\n".join(lines)
    lines.append(f"last approval: {entry['time']} by {entry['reviewer']}"
                 + (f" ({entry['note']})" if entry.get("note") else "")
                 + f", leukfed {entry.get('leukfed_version', '?')}, digest {entry['code_digest']}")
    changes = manifest_changes(entry["files"], manifest)
    if not any(changes.values()):
        lines.append("unchanged since the last approval")
        return "\n".join(lines)
    for kind, paths in changes.items():
        lines += [f"{kind}: {p}" for p in paths]
    old_sources = _snapshot_sources(Path(approvals_file), entry["code_digest"])
    diff: list[str] = []
    for rel in changes["changed"] + changes["added"] + changes["removed"]:
        old = old_sources.get(rel, "").splitlines(keepends=True)
        new = (root_path / rel).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True) \
            if rel in manifest else []
        if rel in changes["changed"] and not old:
            diff.append(f"(no snapshot of the approved {rel}: content diff unavailable)\n")
            continue
        diff += difflib.unified_diff(old, new, f"approved/{rel}", f"installed/{rel}")
    if diff:
        lines.append("diff against the approved code:")
        shown = "".join(diff[:max_diff_lines]).rstrip("\n")
        lines.append(shown)
        if len(diff) > max_diff_lines:
            lines.append(f"... {len(diff) - max_diff_lines} more diff lines")
    return "\n".join(lines)


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
               f" ({len(entry['files'])} files), recorded in {approvals}")


# --------------------------------------------------------------------------------------------
# Enforcement inside Flower: a checked `flwr-clientapp`
# --------------------------------------------------------------------------------------------

APPROVALS_ENV = "LEUK_APPROVALS"
SUPEREXEC_FLAG = "--leuk-superexec"   # launcher: run leuk-client's forking SuperExec (client/fork_exec.py)
CHECK_ONLY_ENV = "LEUK_GUARD_CHECK_ONLY"   # launcher: print the verdict and exit (0 approved, 3 refused)


def guarded_clientapp_main(approvals_file: str | Path | None = None) -> None:
    """Flower's `flwr-clientapp`, refusing any task whose bundle or installed code is not approved.

    Flower pulls the task (message, context, run, FAB) and calls `install_from_fab(fab.content)`
    before importing any app code; the check runs there. A LeukError becomes the task's error
    reply ("<class 'leukfed.common.errors.LeukError'>:<'refused app bundle ...'>").
    """
    approvals = approvals_file or os.environ.get(APPROVALS_ENV)
    if not approvals:
        raise SystemExit(f"guarded flwr-clientapp: set {APPROVALS_ENV} to the site's approvals file")
    _run_flwr_clientapp(lambda fab_content: (verify_fab(fab_content, approvals), verify(approvals)))


def _run_flwr_clientapp(check) -> None:
    """Flower's flwr-clientapp main with `check(fab_bytes)` run before the FAB is installed."""
    main = prepared_flwr_clientapp(check)
    sys.argv[0] = "flwr-clientapp"
    main()


def prepared_flwr_clientapp(check):
    """Flower's flwr-clientapp main function, patched in this process: `check(fab_bytes)` runs before
    the FAB is installed, and the message's arrays are pulled promptly (the SuperNode hands out the
    task before they have arrived from the SuperLink; Flower would first wait a whole second)."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    from leukfed.common.flower.patches import LOCAL_PULL_BACKOFF_S, prompt_object_pulls

    real_install = runtime.install_from_fab

    def checked_install(fab_content: bytes, *args, **kwargs):
        check(fab_content)
        return real_install(fab_content, *args, **kwargs)

    runtime.install_from_fab = checked_install
    prompt_object_pulls(runtime, "pull_and_inflate_object_from_tree", LOCAL_PULL_BACKOFF_S)
    return flwr_clientapp


_LAUNCHER = """#!{python}
# leukfed's guarded flwr-clientapp (written by leukfed.client.approval.write_guarded_launcher).
# It checks the installed leukfed code against the site's latest approval BEFORE importing any
# leukfed module, then runs Flower's flwr-clientapp, checking each task's app bundle (FAB)
# before Flower installs it or imports its code.
import sys
sys.pycache_prefix = {pycache!r}   # never load __pycache__/*.pyc from the package (not in the manifest)
import json
import os

ROOT = {root!r}
APPROVALS = {approvals!r}

{stdlib_manifest}

{manifest_changes}

{describe_changes}

def _verdict():
    try:
        with open(APPROVALS, encoding="utf-8") as handle:
            approvals = json.load(handle)["approvals"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"cannot read the approvals file {{APPROVALS}}: {{exc}}"
    if not approvals:
        return f"no approval recorded in {{APPROVALS}}: a reviewer must run `leuk-client approve` first"
    entry, current = approvals[-1], stdlib_manifest(ROOT)
    if current != entry["files"]:
        return (f"the installed leukfed code is not the code {{entry['reviewer']}} approved on {{entry['time']}} "
                f"({{describe_changes(manifest_changes(entry['files'], current))}}); "
                "review it with `leuk-client approve`")
    return None


refusal = _verdict()
if os.environ.get({check_env!r}):
    print(refusal or "approved")
    sys.exit(3 if refusal else 0)
if sys.argv[1:2] == [{superexec_flag!r}]:
    # leuk-client's SuperExec, which forks every task from a process holding the imported code: only
    # for approved code. Otherwise Flower's own SuperExec, whose fresh task processes (this launcher,
    # found first on PATH) refuse each task with the reason.
    if refusal is None:
        from leukfed.client.fork_exec import main   # verified code only
        main(sys.argv[2:])
    else:
        print("leuk-superexec: not preparing processes:", refusal, flush=True)
        args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
        import shutil
        superexec = shutil.which("flower-superexec") or os.path.join(os.path.dirname(sys.executable), "flower-superexec")
        os.execv(superexec, [superexec, "--insecure", "--runtime-api-address", args["--runtime-api-address"],
                             "--parent-pid", args["--parent-pid"]])
if refusal is None:
    from leukfed.client.approval import guarded_clientapp_main   # verified code only
    guarded_clientapp_main(APPROVALS)
else:
    class CodeNotApproved(RuntimeError):
        pass

    def _refuse(fab_content, *args, **kwargs):
        raise CodeNotApproved(refusal)

    # Flower's runner without any leukfed import: the refusal becomes the task's error reply.
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime
    runtime.install_from_fab = _refuse
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()
"""


def write_guarded_launcher(bin_dir: str | Path, approvals_file: str | Path, *,
                           pycache_dir: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Write `bin_dir/flwr-clientapp`; put bin_dir first on the SuperNode's PATH to use it.

    Flower's SubprocessExecutor starts every task as `flwr-clientapp ...` through PATH.
    pycache_dir: where task processes keep compiled bytecode (default: bin_dir/../pycache).
    root: the leukfed package folder the tasks import (default: the installed one).
    """
    import inspect

    bin_dir = Path(bin_dir).resolve()
    pycache = Path(pycache_dir).resolve() if pycache_dir else bin_dir.parent / "pycache"
    script = _LAUNCHER.format(
        python=sys.executable, pycache=str(pycache),
        root=str(Path(root).resolve() if root is not None else package_root()),
        approvals=str(Path(approvals_file).resolve()), check_env=CHECK_ONLY_ENV, superexec_flag=SUPEREXEC_FLAG,
        stdlib_manifest=inspect.getsource(stdlib_manifest),
        manifest_changes=inspect.getsource(manifest_changes),
        describe_changes=inspect.getsource(describe_changes))
    path = bin_dir / "flwr-clientapp"
    atomic_write_bytes(path, script.encode())
    path.chmod(0o755)
    return path
