"""What an approval covers and how it is hashed; standard library only (the launcher runs a copy of it).

Covered: EVERY file of the installed leukfed package (sources, compiled modules, data files: a `.so`
beside an approved module would be imported in its place), and the interpreter's start-up hooks:
each `.pth` file of the site directories, the modules in those directories its import lines name
(an editable install's `__editable__*.pth` and its finder), and `sitecustomize`/`usercustomize`.
Not covered: `__pycache__/` (the launcher compiles leukfed from its verified sources and never reads it), and
folders whose names contain a dot (`.git`, `.pytest_cache`, `*.egg-info`: no Python package can
live there). The guarded launcher loads a copy of this file before Python has processed any `.pth`
file or imported any leukfed module, so only the standard library may be imported at module level.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import site
import stat
from pathlib import Path
from typing import Any

BYTECODE_DIR = "__pycache__"
START_UP_MODULES = ("sitecustomize", "usercustomize")
_PTH_IMPORT = re.compile(r"\bimport\s+([A-Za-z_][\w.]*)|__import__\(\s*['\"]([A-Za-z_][\w.]*)['\"]")


class ApprovalMissing(Exception):
    """No usable approval: the approvals file is missing, unreadable or empty."""


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------

def file_digest(path: str) -> str:
    """sha256 of a file's bytes; a FIFO or device is never opened (it could block the check)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return hashlib.sha256(b"not a regular file").hexdigest()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError as exc:
        return hashlib.sha256(f"unreadable: {exc.strerror}".encode()).hexdigest()


def _skipped_dir(name: str) -> bool:
    return name == BYTECODE_DIR or "." in name


def stdlib_manifest(root: str | os.PathLike[str]) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `root` (symlinked folders followed once)."""
    root = os.path.realpath(root)
    manifest: dict[str, str] = {}
    seen = {root}
    for folder, dirs, names in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if not _skipped_dir(name) and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in names:
            path = os.path.join(folder, name)
            manifest[os.path.relpath(path, root).replace(os.sep, "/")] = file_digest(path)
    return dict(sorted(manifest.items()))


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 for a whole manifest (sorted `path sha256` lines)."""
    text = "".join(f"{path}\t{digest}\n" for path, digest in sorted(manifest.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Start-up hooks
# --------------------------------------------------------------------------------------------

def site_dirs() -> list[str]:
    """The site directories whose .pth files Python processes at start-up."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(os.path.realpath(d) for d in dirs) if os.path.isdir(d)]


def pth_hook_files(sitedir: str, name: str) -> dict[str, str]:
    """{absolute path: sha256} of one .pth file and of the modules in `sitedir` its import lines name."""
    path = os.path.realpath(os.path.join(sitedir, name))
    files = {path: file_digest(path)}
    try:
        with open(path, "rb") as handle:
            text = handle.read(1 << 20).decode("utf-8", errors="replace")
    except OSError:
        return files
    for line in text.splitlines():
        if not line.startswith(("import ", "import\t")):
            continue
        for match in _PTH_IMPORT.finditer(line):
            module = (match.group(1) or match.group(2)).split(".")[0]
            for candidate in (f"{module}.py", os.path.join(module, "__init__.py")):
                found = os.path.join(sitedir, candidate)
                if os.path.isfile(found):
                    files[os.path.realpath(found)] = file_digest(found)
    return files


def start_up_module_file(name: str) -> str | None:
    """Where `import sitecustomize` (or usercustomize) would load from, without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return os.path.realpath(spec.origin) if spec is not None and spec.origin else None


def startup_hooks(dirs: list[str] | None = None) -> dict[str, str]:
    """{absolute path: sha256} of every start-up hook Python runs before any program code."""
    hooks: dict[str, str] = {}
    for sitedir in site_dirs() if dirs is None else dirs:
        try:
            names = sorted(os.listdir(sitedir))
        except OSError:
            continue
        for name in names:
            if name.endswith(".pth"):
                hooks.update(pth_hook_files(sitedir, name))
    for module in START_UP_MODULES:
        origin = start_up_module_file(module)
        if origin is not None:
            hooks[origin] = file_digest(origin)
    return dict(sorted(hooks.items()))


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------

def read_approvals(path: Path) -> dict[str, Any] | None:
    """The whole approvals file (None when it does not exist); ApprovalMissing if unreadable or not one."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ApprovalMissing(f"cannot read the approvals file {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("approvals"), list):
        raise ApprovalMissing(f"{path} is not a leukfed approvals file")
    return data


def read_latest_approval(approvals_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The approval in force (the last entry); ApprovalMissing says why there is none."""
    path = Path(approvals_file)
    data = read_approvals(path)
    if data is None or not data["approvals"]:
        raise ApprovalMissing(f"no approval recorded in {path}: a reviewer must run `leuk-client approve` first")
    entry = data["approvals"][-1]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k, {}), dict) for k in ("files", "startup_hooks")):
        raise ApprovalMissing(f"{path} is not a leukfed approvals file")
    return entry


def manifest_changes(approved: dict[str, str], current: dict[str, str]) -> dict[str, list[str]]:
    return {"changed": sorted(p for p in current if p in approved and current[p] != approved[p]),
            "added": sorted(p for p in current if p not in approved),
            "removed": sorted(p for p in approved if p not in current)}


def describe_changes(changes: dict[str, list[str]]) -> str:
    return "; ".join(f"{kind}: {', '.join(paths)}" for kind, paths in changes.items() if paths)


def refusal(entry: dict[str, Any], files: dict[str, str], hooks: dict[str, str]) -> str | None:
    """Why the installed package `files` and start-up `hooks` are not what `entry` approved (None: they are)."""
    problems = []
    who = f"{entry.get('reviewer', '?')} approved on {entry.get('time', '?')}"
    if "startup_hooks" not in entry:
        return (f"the approval {who} was recorded by an older leukfed that covered only *.py files; "
                "review the installed code again with `leuk-client approve`")
    code = describe_changes(manifest_changes(entry.get("files", {}), files))
    if code:
        problems.append(f"the installed leukfed code is not the code {who} ({code})")
    started = describe_changes(manifest_changes(entry.get("startup_hooks", {}), hooks))
    if started:
        problems.append(f"the interpreter's start-up hooks are not the ones {who} ({started})")
    if not problems:
        return None
    return "; ".join(problems) + "; review it with `leuk-client approve`"


# --------------------------------------------------------------------------------------------
# The installed package (in leukfed's own processes; the launcher is given its folder)
# --------------------------------------------------------------------------------------------

def package_root() -> Path:
    """The folder of the installed leukfed package (the repository root for an editable install)."""
    import leukfed

    return Path(leukfed.__file__).resolve().parent


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root).resolve() if root is not None else package_root()


def code_manifest(root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file of the package (default: the installed leukfed)."""
    from leukfed.common.errors import LeukError

    folder = resolve_root(root)
    if not folder.is_dir():
        raise LeukError(f"code folder {folder} does not exist")
    return stdlib_manifest(folder)


def installed_version(root: str | os.PathLike[str] | None = None) -> str:
    """leukfed.__version__ as written in the package's __init__.py (no import of a copied tree)."""
    for line in (resolve_root(root) / "__init__.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
