"""Issue 13.7/13.10: approval covers every file that can run, and bundles are inspected safely.

Each attack is played against the site's real guarded launcher (`flwr-clientapp`, a separate
process) or the real bundle check on Flower's install path, and each test also shows the honest
approved install still starts.
"""
from __future__ import annotations

import io
import os
import py_compile
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
import tomli_w
from leukfed.client.approval import (
    apply_install_from_fab_patch,
    approve,
    fab_bytes,
    package_root,
    verify,
    verify_fab,
    write_guarded_launcher,
)
from leukfed.common.errors import LeukError
from leukfed.common.fab import app_project, write_app_dir

_NOT_PACKAGE = shutil.ignore_patterns(".*", "__pycache__", "tests", "benchmarks", "*.egg-info", "docs", "deploy")


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """An installed leukfed (a copy), approved, with the site's guarded launcher."""
    package = tmp_path / "site-packages" / "leukfed"
    shutil.copytree(package_root(), package, ignore=_NOT_PACKAGE)
    approvals = tmp_path / "approvals.json"
    approve(approvals, "Dr. S", root=package)
    launcher = write_guarded_launcher(tmp_path / "bin", approvals, root=package)
    return {"package": package, "approvals": approvals, "launcher": launcher, "tmp": tmp_path}


def run_launcher(site: dict[str, Path], *args: str, check_only: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site["package"].parent))
    env.pop("LEUK_GUARD_CHECK_ONLY", None)
    if check_only:
        env["LEUK_GUARD_CHECK_ONLY"] = "1"
    return subprocess.run([str(site["launcher"]), *args], env=env, capture_output=True, text=True, timeout=120)


def assert_refused(site: dict[str, Path], *named: str) -> None:
    refused = run_launcher(site)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    for name in named:
        assert name in refused.stdout, refused.stdout
    with pytest.raises(LeukError) as in_process:
        verify(site["approvals"], root=site["package"])
    assert all(name in str(in_process.value) for name in named)


def assert_approved(site: dict[str, Path]) -> None:
    ok = run_launcher(site)
    assert ok.returncode == 0 and ok.stdout.strip() == "approved", ok.stdout + ok.stderr


def write_extension(path: Path, module: str, marker: Path) -> None:
    """A real CPython extension module `module` that writes `marker` when imported."""
    source = path.parent / f"{module}_ext.c"
    source.write_text(
        "#include <Python.h>\n"
        f"static struct PyModuleDef def = {{PyModuleDef_HEAD_INIT, \"{module}\", NULL, -1, NULL}};\n"
        f"PyMODINIT_FUNC PyInit_{module}(void) {{\n"
        f"  FILE *f = fopen(\"{marker}\", \"w\"); if (f) {{ fputs(\"ran\", f); fclose(f); }}\n"
        "  return PyModule_Create(&def);\n}\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"], "-o", str(path), str(source)],
                   check=True, capture_output=True, timeout=120)
    source.unlink()


# --------------------------------------------------------------------------------------------
# The installed package
# --------------------------------------------------------------------------------------------

def test_compiled_module_beside_an_approved_module_is_refused(site: dict[str, Path]) -> None:
    assert_approved(site)
    marker = site["tmp"] / "extension-ran"
    planted = site["package"] / "common" / f"atomic{sysconfig.get_config_var('EXT_SUFFIX')}"
    if shutil.which("gcc"):
        write_extension(planted, "atomic", marker)
        # The attack is real: Python prefers the extension to the approved atomic.py beside it.
        env = dict(os.environ, PYTHONPATH=str(site["package"].parent))
        subprocess.run([sys.executable, "-c", "import leukfed.common.atomic"], env=env, capture_output=True, timeout=120)
        assert marker.exists()
        marker.unlink()
    else:                                              # no compiler: the name alone must be refused
        planted.write_bytes(b"\x7fELF not really")

    assert_refused(site, f"added: common/{planted.name}", "Dr. S")
    assert not marker.exists()                         # the launcher never imported it
    planted.unlink()
    assert_approved(site)


def test_new_changed_and_sourceless_files_are_refused_by_name(site: dict[str, Path]) -> None:
    weights = site["package"] / "models" / "weights.json"
    weights.write_text('{"threshold": 0.0}')
    assert_refused(site, "added: models/weights.json")
    weights.unlink()

    sourceless = site["package"] / "client" / "helper.pyc"   # importable as leukfed.client.helper
    py_compile.compile(str(site["package"] / "common" / "errors.py"), cfile=str(sourceless))
    assert_refused(site, "added: client/helper.pyc")
    sourceless.unlink()

    readme = site["package"] / "README.md"
    readme.write_text(readme.read_text() + "\nchanged\n")
    assert_refused(site, "changed: README.md")


def test_planted_bytecode_is_never_loaded_and_the_honest_install_starts(site: dict[str, Path]) -> None:
    """__pycache__ is outside the approval because the launcher never reads it: bytecode of other code,
    stamped with the approved source's mtime and size, is what Python would otherwise load."""
    marker = site["tmp"] / "bytecode-ran"
    approved = site["package"] / "common" / "atomic.py"
    evil = site["tmp"] / "evil_atomic.py"
    text = f"open({str(marker)!r}, 'w').write('ran')\n"
    evil.write_text(text + "#" * (approved.stat().st_size - len(text) - 1) + "\n")
    os.utime(evil, ns=(approved.stat().st_atime_ns, approved.stat().st_mtime_ns))
    cached = site["package"] / "common" / "__pycache__" / f"atomic.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(evil), cfile=str(cached), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    env = dict(os.environ, PYTHONPATH=str(site["package"].parent))
    subprocess.run([sys.executable, "-c", "import leukfed.common.atomic"], env=env, capture_output=True, timeout=120)
    assert marker.exists()                             # the attack is real outside the launcher
    marker.unlink()

    started = run_launcher(site, "--help", check_only=False)   # the approved path: imports leukfed, then Flower
    assert started.returncode == 0 and "usage" in started.stdout.lower(), started.stdout + started.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Start-up hooks (.pth) in a throw-away venv
# --------------------------------------------------------------------------------------------

def test_start_up_hooks_must_be_approved(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                                   check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    (site_dir / "site_finder.py").write_text("def install():\n    pass\n")      # like an editable install's
    (site_dir / "site_finder.pth").write_text("import site_finder; site_finder.install()\n")
    package = tmp_path / "site-packages" / "leukfed"
    shutil.copytree(package_root(), package, ignore=_NOT_PACKAGE)
    approvals, bin_dir = tmp_path / "approvals.json", tmp_path / "bin"
    env = dict(os.environ, PYTHONPATH=str(package.parent))
    subprocess.run([str(python), "-c", "import sys; from leukfed.client.approval import approve, write_guarded_launcher; "
                    "approve(sys.argv[1], 'Dr. P', root=sys.argv[3]); write_guarded_launcher(sys.argv[2], sys.argv[1], "
                    "root=sys.argv[3])", str(approvals), str(bin_dir), str(package)], env=env, check=True, timeout=120)
    launcher = bin_dir / "flwr-clientapp"
    check = dict(env, LEUK_GUARD_CHECK_ONLY="1")

    def launch() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(launcher)], env=check, capture_output=True, text=True, timeout=120)

    assert launch().stdout.strip() == "approved"
    marker = tmp_path / "hook-ran"
    (site_dir / "evil_hook.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (site_dir / "zz_evil.pth").write_text("import evil_hook\n")
    subprocess.run([str(python), "-c", "pass"], env=env, check=True, timeout=60)
    assert marker.exists()                             # any plain start of this interpreter runs it
    marker.unlink()
    refused = launch()
    assert refused.returncode == 3 and "start-up hooks" in refused.stdout, refused.stdout + refused.stderr
    assert f"added: {site_dir / 'evil_hook.py'}" in refused.stdout and str(site_dir / "zz_evil.pth") in refused.stdout
    assert not marker.exists()                         # the launcher never executed the hook

    (site_dir / "zz_evil.pth").unlink()
    (site_dir / "evil_hook.py").unlink()
    (site_dir / "site_finder.py").write_text(f"def install():\n    open({str(marker)!r}, 'w').write('ran')\n")
    refused = launch()
    assert refused.returncode == 3 and f"changed: {site_dir / 'site_finder.py'}" in refused.stdout, refused.stdout
    assert not marker.exists()

    (site_dir / "site_finder.py").write_text("def install():\n    pass\n")
    assert launch().stdout.strip() == "approved"


# --------------------------------------------------------------------------------------------
# App bundles
# --------------------------------------------------------------------------------------------

def bundle_with(tmp_path: Path, name: str, *, project: dict | None = None, extra: dict[str, str] | None = None) -> bytes:
    app = write_app_dir(tmp_path / name)
    if project is not None:
        (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    for rel, text in (extra or {}).items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    return fab_bytes(app)


def test_only_leukfeds_own_bundle_passes(site: dict[str, Path], tmp_path: Path) -> None:
    approvals = site["approvals"]
    assert verify_fab(fab_bytes(), approvals)["name"] == "leukfed-app"           # honest
    with pytest.raises(LeukError, match=r"extra: README.md"):
        verify_fab(bundle_with(tmp_path, "readme", extra={"README.md": "# hello\n"}), approvals)
    with pytest.raises(LeukError, match=r"carries code .*leukfed/client/client_app.py"):
        verify_fab(bundle_with(tmp_path, "code", extra={"leukfed/client/client_app.py": "app = None\n"}), approvals)

    other = app_project()
    other["tool"]["flwr"]["app"]["components"]["clientapp"] = "leukfed.client.fork_exec:main"
    with pytest.raises(LeukError, match="its ClientApp is leukfed.client.fork_exec:main, not the approved"):
        verify_fab(bundle_with(tmp_path, "other", project=other), approvals)

    weaker = app_project()
    weaker["tool"]["flwr"]["app"]["config"]["min-metric-examples"] = 1
    weaker["tool"]["flwr"]["app"]["config"]["dp-budget"] = 1e9
    with pytest.raises(LeukError) as refused:
        verify_fab(bundle_with(tmp_path, "weaker", project=weaker), approvals)
    assert "min-metric-examples = 1 instead of 10" in str(refused.value) and "added keys: dp-budget" in str(refused.value)

    older = app_project()
    older["project"]["dependencies"] = ["leukfed==0.0.1"]
    with pytest.raises(LeukError, match="pyproject differs .* in project.dependencies"):
        verify_fab(bundle_with(tmp_path, "older", project=older), approvals)

    # Same files and pyproject, but a CONTENT that lists something else.
    ours = zipfile.ZipFile(io.BytesIO(fab_bytes()))
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("pyproject.toml", ours.read("pyproject.toml"))
        archive.writestr(".info/CONTENT", b"pyproject.toml,00,8\nother.py,00,8")
    with pytest.raises(LeukError, match="CONTENT does not list exactly"):
        verify_fab(forged.getvalue(), approvals)


def zip_of(entries: dict[str, bytes], **info: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            entry = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            for key, value in info.items():
                setattr(entry, key, value)
            archive.writestr(entry, content, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def test_oversized_bombs_and_traversal_are_refused_before_flower_unpacks(site: dict[str, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp as runtime

    scratch, home = tmp_path / "tmp", tmp_path / "flwr-home"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)   # restored afterwards
    apply_install_from_fab_patch(lambda fab: verify_fab(fab, site["approvals"]))
    ours = zipfile.ZipFile(io.BytesIO(fab_bytes()))
    pyproject = ours.read("pyproject.toml")

    attacks = {
        "over the 1,048,576-byte limit": zip_of({"pyproject.toml": pyproject, "noise.bin": os.urandom(1_200_000)}),
        "unpacks to .* over the 10,485,760-byte limit": zip_of({"pyproject.toml": pyproject, "bomb.txt": bytes(50 << 20)}),   # ~50 KB packed
        "unsafe file names '../../evil.py'": zip_of({"pyproject.toml": pyproject, "../../evil.py": b"x"}),
        "unsafe file names '/etc/evil'": zip_of({"pyproject.toml": pyproject, "/etc/evil": b"x"}),
        "symbolic links": zip_of({"pyproject.toml": pyproject, "link": b"/etc/passwd"}, external_attr=0o120777 << 16),
        "not a valid FAB": b"PK\x03\x04 truncated",
    }
    assert len(attacks["unpacks to .* over the 10,485,760-byte limit"]) < 100_000      # a bomb
    for reason, bundle in attacks.items():
        with pytest.raises(LeukError, match=reason):
            runtime.install_from_fab(bundle, skip_prompt=True)                  # Flower's call, patched
    assert list(scratch.iterdir()) == [] and not home.exists()                   # nothing unpacked, nothing left

    installed = runtime.install_from_fab(fab_bytes(), skip_prompt=True)        # the honest bundle installs
    assert (Path(installed) / "pyproject.toml").is_file() and list(scratch.iterdir()) == []
