"""Hospital approval: the installed code and the app bundle must be what a reviewer approved."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import typer
from leukfed.client.approval import (
    APPROVED_CLIENTAPP,
    apply_install_from_fab_patch,
    approve,
    approve_command,
    code_manifest,
    fab_bytes,
    fab_digest,
    fab_summary,
    load_approvals,
    manifest_digest,
    package_root,
    show_code_summary,
    verify,
    verify_fab,
    write_guarded_launcher,
)
from leukfed.common.errors import LeukError
from typer.testing import CliRunner

ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"
_NOT_PACKAGE = shutil.ignore_patterns(".*", "__pycache__", "tests", "benchmarks", "*.egg-info", "docs", "deploy",
                                      "build", "dist")


def copy_package(dst_parent: Path) -> Path:
    """A snapshot of the installed leukfed package as `dst_parent/leukfed` (importable via PYTHONPATH)."""
    dst = dst_parent / "leukfed"
    shutil.copytree(package_root(), dst, ignore=_NOT_PACKAGE)
    return dst


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return copy_package(tmp_path / "site-packages")


def test_manifest_covers_the_package_code(package: Path) -> None:
    manifest = code_manifest(package)
    for must in ("__init__.py", "client/client_app.py", "server/strategies.py", "common/errors.py",
                 "client/approval/launcher.py", "pyproject.toml"):      # every file, not only *.py
        assert must in manifest
    assert all("__pycache__" not in p for p in manifest)
    assert all(len(h) == 64 for h in manifest.values())
    assert code_manifest(package) == manifest                       # deterministic
    assert "client/client_app.py" in code_manifest()                # the installed package by default


def test_approve_then_verify(package: Path, tmp_path: Path) -> None:
    approvals = tmp_path / "site" / "approvals.json"
    entry = approve(approvals, "Dr. A. Hematologist", "release 0.1.0 reviewed", root=package)
    verify(approvals, root=package)
    stored = load_approvals(approvals)["approvals"]
    assert len(stored) == 1 and stored[0]["reviewer"] == "Dr. A. Hematologist"
    assert stored[0]["code_digest"] == manifest_digest(code_manifest(package)) == entry["code_digest"]
    assert stored[0]["leukfed_version"] and stored[0]["time"].endswith("Z") and stored[0]["note"]
    assert stored[0]["clientapp"] == APPROVED_CLIENTAPP
    assert not list(approvals.parent.glob(".*.tmp"))                 # atomic write left no temp file
    with pytest.raises(LeukError, match="reviewer"):
        approve(approvals, "  ", root=package)


def test_modified_added_and_removed_files_are_named(package: Path, tmp_path: Path) -> None:
    approvals = tmp_path / "approvals.json"
    approve(approvals, "Dr. B", root=package)
    client_app = package / "client" / "client_app.py"
    client_app.write_text(client_app.read_text() + "\nimport os  # exfiltrate\n")
    with pytest.raises(LeukError) as refused:
        verify(approvals, root=package)
    message = str(refused.value)
    assert "changed: client/client_app.py" in message and "Dr. B" in message and "leuk-client approve" in message

    (package / "client" / "evil.py").write_text("print('hello')\n")
    (package / "common" / "plots.py").unlink()
    (package / "server" / "strategies.py").write_text("# replaced\n")
    with pytest.raises(LeukError) as refused:
        verify(approvals, root=package)
    message = str(refused.value)
    assert "changed: client/client_app.py, server/strategies.py" in message
    assert "added: client/evil.py" in message and "removed: common/plots.py" in message

    # Re-approval puts the new code in force; the old entry stays as history.
    approve(approvals, "Dr. C", "reviewed the patch", root=package)
    verify(approvals, root=package)
    assert [a["reviewer"] for a in load_approvals(approvals)["approvals"]] == ["Dr. B", "Dr. C"]


def test_no_approval_is_refused(package: Path, tmp_path: Path) -> None:
    with pytest.raises(LeukError, match="no approval recorded"):
        verify(tmp_path / "missing.json", root=package)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LeukError, match="cannot read"):
        verify(tmp_path / "bad.json", root=package)
    older = tmp_path / "format1.json"                     # an approval that covered only *.py files
    older.write_text(json.dumps({"format": 1, "approvals": [{"reviewer": "Dr. Z", "time": "then", "files": {}}]}))
    with pytest.raises(LeukError, match="older leukfed that covered only"):
        verify(older, root=package)


def test_summary_shows_version_files_digest_and_diff(package: Path, tmp_path: Path) -> None:
    approvals = tmp_path / "approvals.json"
    first = show_code_summary(approvals, root=package)
    assert "leukfed " in first and "Python files" in first and manifest_digest(code_manifest(package)) in first
    assert "no previous approval" in first and "client/client_app.py" in first
    approve(approvals, "Dr. D", root=package)
    assert "unchanged since the last approval" in show_code_summary(approvals, root=package)
    target = package / "server" / "guard.py"
    target.write_text(target.read_text().replace("norm_outlier_factor: float = 10.0",
                                                 "norm_outlier_factor: float = 1e9"))
    (package / "client" / "extra.py").write_text("SECRET_ENDPOINT = 'http://example.invalid'\n")
    summary = show_code_summary(approvals, root=package)
    assert "last approval:" in summary and "Dr. D" in summary
    assert "changed: server/guard.py" in summary and "added: client/extra.py" in summary
    assert "-    norm_outlier_factor: float = 10.0" in summary and "+    norm_outlier_factor: float = 1e9" in summary
    assert "+SECRET_ENDPOINT" in summary


def test_large_and_binary_files_are_covered_by_digest_without_being_copied_or_loaded(package: Path,
                                                                                    tmp_path: Path) -> None:
    # An editable install's tree also holds run outputs (a VGG16 benchmark's checkpoints: gigabytes); an
    # approval once copied every file into an in-memory zip (8.8 GB resident) and onto disk.
    outputs = package / "benchmarks" / "runs"
    outputs.mkdir(parents=True)
    (outputs / "checkpoint.safetensors").write_bytes(os.urandom(3 << 20))
    (outputs / "history.json").write_text("[" + "1, " * (1 << 20) + "1]")          # text, but over 1 MiB
    (outputs / "small.bin").write_bytes(b"\0\1\2")
    approvals = tmp_path / "approvals.json"
    entry = approve(approvals, "Dr. L", root=package)
    assert {"benchmarks/runs/checkpoint.safetensors", "benchmarks/runs/history.json"} <= set(entry["files"])
    snapshot = next((tmp_path / "approvals.snapshots").glob("*.zip"))
    assert snapshot.stat().st_size < 2 << 20 and "client/client_app.py" in zipfile.ZipFile(snapshot).namelist()
    assert not any(n.startswith("benchmarks/runs/") for n in zipfile.ZipFile(snapshot).namelist())
    (outputs / "checkpoint.safetensors").write_bytes(os.urandom(3 << 20))
    with pytest.raises(LeukError, match="benchmarks/runs/checkpoint.safetensors"):
        verify(approvals, root=package)
    summary = show_code_summary(approvals, root=package)
    assert "changed: benchmarks/runs/checkpoint.safetensors" in summary
    assert "binary file or over 1 MiB, benchmarks/runs/checkpoint.safetensors: content diff not shown" in summary


def test_a_long_diff_stops_reading_files_once_its_lines_are_shown(package: Path, tmp_path: Path) -> None:
    approvals = tmp_path / "approvals.json"
    approve(approvals, "Dr. M", root=package)
    for index in range(30):
        (package / "client" / f"added_{index:02d}.py").write_text("".join(f"LINE_{i} = {i}\n" for i in range(50)))
    summary = show_code_summary(approvals, root=package, max_diff_lines=100)
    assert summary.count("added: client/added_") == 30                     # every file named
    assert "+LINE_0 = 0" in summary and "more files not diffed" in summary  # only the first files read


def test_app_bundles(tmp_path: Path) -> None:
    approvals = tmp_path / "approvals.json"
    with pytest.raises(LeukError, match="no approval"):
        verify_fab(fab_bytes(), approvals)
    approve(approvals, "Dr. E", root=copy_package(tmp_path / "pkg"))
    ours = fab_bytes()                                   # the bundle leukfed submits: a pyproject only
    assert fab_summary(ours)["code_files"] == [] and fab_digest(ours) == fab_digest()
    assert verify_fab(ours, approvals)["components"]["clientapp"] == APPROVED_CLIENTAPP

    with pytest.raises(LeukError, match="carries code .*echoapp/client_app.py"):
        verify_fab(fab_bytes(ECHO_APP), approvals)

    other = tmp_path / "other_app"
    other.mkdir()
    text = (ECHO_APP / "pyproject.toml").read_text().replace('"echoapp.client_app:app"', '"leukfed.client.evil:app"')
    (other / "pyproject.toml").write_text(text)
    with pytest.raises(LeukError, match="leukfed.client.evil:app, not the approved"):
        verify_fab(fab_bytes(other), approvals)
    with pytest.raises(LeukError, match="not a valid FAB"):
        verify_fab(b"not a zip", approvals)

    # A bundle with code passes only when approved by digest.
    approve(approvals, "Dr. E", "connectivity test app", root=copy_package(tmp_path / "pkg2"), fabs=[ECHO_APP])
    assert verify_fab(fab_bytes(ECHO_APP), approvals)["name"] == "leukfed-echo"


def test_approve_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = copy_package(tmp_path / "pkg")
    from leukfed.client.approval import manifest

    monkeypatch.setattr(manifest, "package_root", lambda: package)
    app = typer.Typer()
    app.command("approve")(approve_command)
    app.command("noop")(lambda: None)                   # two commands: `approve` stays a subcommand
    approvals = tmp_path / "approvals.json"
    runner = CliRunner()

    declined = runner.invoke(app, ["approve", "--approvals", str(approvals), "--reviewer", "Dr. F"], input="n\n")
    assert isinstance(declined.exception, LeukError) and not approvals.exists()
    assert "no previous approval" in declined.output

    accepted = runner.invoke(app, ["approve", "--approvals", str(approvals), "--reviewer", "Dr. F",
                                   "--note", "v0.1.0", "--yes"])
    assert accepted.exit_code == 0, accepted.output
    assert "approved by Dr. F" in accepted.output
    verify(approvals, root=package)
    again = runner.invoke(app, ["approve", "--approvals", str(approvals), "--reviewer", "Dr. F"], input="y\n")
    assert again.exit_code == 0 and "unchanged since the last approval" in again.output
    assert len(load_approvals(approvals)["approvals"]) == 2


def test_launcher_checks_the_code_before_importing_it(package: Path, tmp_path: Path) -> None:
    approvals = tmp_path / "approvals.json"
    approve(approvals, "Dr. H", root=package)
    launcher = write_guarded_launcher(tmp_path / "bin", approvals, root=package)
    env = dict(os.environ, PYTHONPATH=str(package.parent), LEUK_GUARD_CHECK_ONLY="1")
    ok = subprocess.run([str(launcher)], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "approved", ok.stderr

    marker = tmp_path / "tampered-code-ran"
    atomic = package / "common" / "atomic.py"
    atomic.write_text(atomic.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    refused = subprocess.run([str(launcher)], env=env, check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "changed: common/atomic.py" in refused.stdout and "Dr. H" in refused.stdout
    assert not marker.exists()


def test_install_from_fab_patch_sits_on_flowers_call_site(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's task runner looks `install_from_fab` up in its module when it runs: the patched name."""
    import dis

    from flwr.supernode.runtime import run_clientapp as runtime

    globals_read = {i.argval for i in dis.get_instructions(runtime.run_clientapp) if i.opname == "LOAD_GLOBAL"}
    assert "install_from_fab" in globals_read
    original = runtime.install_from_fab
    monkeypatch.setattr(runtime, "install_from_fab", original)            # restored after the test
    seen: list[bytes] = []

    def refuse(fab: bytes) -> None:
        seen.append(fab)
        raise LeukError("refused app bundle")

    apply_install_from_fab_patch(refuse)
    with pytest.raises(LeukError, match="refused app bundle"):
        runtime.install_from_fab(b"bundle", skip_prompt=True)
    assert seen == [b"bundle"]
    apply_install_from_fab_patch(lambda fab: None)                         # applied again: not stacked
    assert runtime.install_from_fab.leuk_unchecked is original
    monkeypatch.delattr(runtime, "install_from_fab")
    with pytest.raises(LeukError, match="has no flwr.supernode.runtime.run_clientapp:install_from_fab"):  # never unchecked
        apply_install_from_fab_patch(lambda fab: None)


# --------------------------------------------------------------------------------------------
# Inside Flower: the guarded flwr-clientapp refuses unapproved bundles before loading them
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_guarded_supernodes_run_only_approved_bundles(tmp_path: Path) -> None:
    """One run, three sites: only the one whose approved code and bundle match answers."""
    from leukfed.common.flower.env import flower_env, flower_executable, free_port, write_flwr_config
    from leukfed.common.flower.processes import kill_process_group, strip_ansi

    root = copy_package(tmp_path / "site-packages")   # the sites' "installed" leukfed, stable during the test
    port = free_port()
    env = flower_env(tmp_path / "home")
    write_flwr_config(tmp_path / "home", {"link": {"address": f"127.0.0.1:{port}", "insecure": True}})
    flwr = flower_executable("flwr")
    processes = [subprocess.Popen(
        [flower_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation", "--database", str(tmp_path / "link.db")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    logs = {}
    tampered = copy_package(tmp_path / "tampered-site-packages")
    marker = tmp_path / "tampered-code-ran"
    for site, fabs in (("trusting", [ECHO_APP]), ("strict", []), ("tampered", [ECHO_APP])):
        site_root = tampered if site == "tampered" else root
        approvals = tmp_path / site / "approvals.json"
        approve(approvals, "Dr. G", root=site_root, fabs=fabs)
        launcher = write_guarded_launcher(tmp_path / site / "bin", approvals, root=site_root)
        node_env = dict(env, PATH=f"{launcher.parent}{os.pathsep}{env['PATH']}", PYTHONPATH=str(site_root.parent))
        logs[site] = tmp_path / site / "node.log"
        with logs[site].open("w") as log_file:
            processes.append(subprocess.Popen(
                [flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--insecure",
                 "--node-config", f"site-name='{site}'", "--host", "127.0.0.1", "--port", str(free_port())],
                env=node_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True))
    from leukfed.client.supernode import SuperNode

    nodes = []
    for site, site_root in (("forked", root), ("forked-tampered", tampered)):  # leuk-client's default mode
        approvals = tmp_path / site / "approvals.json"
        approve(approvals, "Dr. G", root=site_root, fabs=[ECHO_APP])
        launcher = write_guarded_launcher(tmp_path / site / "bin", approvals, root=site_root)
        node = SuperNode(f"127.0.0.1:{port}", state_dir=tmp_path / site / "node", ca=None, private_key=None,
                         insecure=True, node_config={"site-name": site}, approved_launcher=launcher,
                         approvals=approvals, env={"PATH": f"{launcher.parent}{os.pathsep}{env['PATH']}",
                                                   "PYTHONPATH": str(site_root.parent)})
        nodes.append(node.start())
        logs[site] = node.log_path
    atomic = tampered / "common" / "atomic.py"          # changed after the approval
    atomic.write_text(atomic.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    try:
        joined_by = time.monotonic() + 120                  # all three sites connected before the run starts
        while not all(log.exists() and "SuperNode ID" in log.read_text() for log in logs.values()):
            assert time.monotonic() < joined_by, {s: log.read_text()[-500:] for s, log in logs.items()}
            time.sleep(0.5)
        t0 = time.monotonic()
        deadline = t0 + 240
        while True:
            submitted = subprocess.run([flwr, "run", str(ECHO_APP), "link", "--format", "json", "--run-config",
                                        "min-nodes=5 num-rounds=1 round-timeout=120.0"],
                                       env=env, check=False, capture_output=True, text=True, timeout=120)
            try:
                run_id = json.loads(submitted.stdout)["run-id"]
                break
            except (json.JSONDecodeError, KeyError):
                assert time.monotonic() < deadline, submitted.stdout + submitted.stderr
                time.sleep(1)
        run = {"status": "unknown"}
        while time.monotonic() < deadline and not run["status"].startswith("finished"):
            time.sleep(1)
            listed = subprocess.run([flwr, "ls", "--run-id", str(run_id), "link", "--format", "json"], env=env,
                                    check=False, capture_output=True, text=True, timeout=60)
            try:
                run = json.loads(listed.stdout)["runs"][0]
            except (json.JSONDecodeError, KeyError, IndexError):
                pass
        seconds = time.monotonic() - t0
    finally:
        for node in nodes:
            node.stop()
        for process in reversed(processes):
            kill_process_group(process, 10)
    strict, trusting, tampered_log, forked, forked_tampered = (
        strip_ansi(logs[s].read_text()) for s in ("strict", "trusting", "tampered", "forked", "forked-tampered"))
    # Exactly the sites whose approved code and bundle match answered.
    assert run["status"] == "finished:failed" and "2 of 5 nodes replied" in run.get("status-details", ""), run
    assert "Sent successfully" in forked and "raised an exception" not in forked
    # Forked tasks: code changed after leuk-client started goes to the guarded launcher, which refuses it.
    assert "code changed since leuk-client started" in forked_tampered or "not preparing processes" in forked_tampered
    assert "CodeNotApproved" in forked_tampered and "changed: common/atomic.py" in forked_tampered
    assert "refused app bundle leukfed-echo 1.0.0" in strict and "it carries code" in strict
    assert "CodeNotApproved" in tampered_log and "changed: common/atomic.py" in tampered_log
    assert not marker.exists()                          # the tampered module was never imported
    assert "refused" not in trusting and "raised an exception" not in trusting and "Sent successfully" in trusting
    print(f"guarded SuperNodes, one run: {seconds:.1f}s")
