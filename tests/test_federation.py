"""leuk-server and leuk-client as real processes on loopback with TLS and site keys: rounds, faults, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.flower_env import descendants, free_port

pytestmark = pytest.mark.slow
ENV = {**os.environ, "LEUK_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
PY = sys.executable


def cli(module: str) -> list[str]:
    return [PY, "-c", f"from leukfed.{module} import main; main()"]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def kill(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Signal a CLI and, with SIGKILL, everything it started (a crashed machine leaves nothing behind)."""
    if proc.poll() is not None:
        return
    children = descendants(proc.pid) if sig == signal.SIGKILL else []
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def history(state: Path) -> list[dict]:
    try:
        return json.loads((state / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


class Federation:
    """A coordinator and its hospitals in one temporary folder."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        self.root, self.port, self.procs = root, free_port(), []
        self.certs = root / "certs"
        subprocess.run([*cli("cli"), "certs", "init", "--out", str(self.certs), "--server-name", "localhost",
                        "--sites", ",".join(sites)], check=True, env=ENV, capture_output=True)
        for i, site in enumerate(sites):
            make_synthetic_dataset(root / f"data-{site}", per_class=10, size=28, seed=20 + i)

    def server(self, *args: str, log: str = "server.log") -> subprocess.Popen:
        proc = spawn([*cli("server.cli"), "--certs", str(self.certs), "--model", "tinycnn", "--image-size", "16",
                      "--state", str(self.root / "state"), "--host", "127.0.0.1", "--port", str(self.port),
                      "--batch-size", "16", *args], self.root / log)
        self.procs.append(proc)
        return proc

    def wait_submitted(self, log: str = "server.log") -> None:
        wait_for(lambda: "submitted" in self.log(log), 180, "the run to be submitted")

    def approve(self, site: str) -> None:
        """The hospital's reviewer approves the installed code once, before the site joins."""
        subprocess.run([*cli("client.cli"), "approve", "--approvals", str(self.root / f"site-{site}" / "approvals.json"),
                        "--reviewer", "test reviewer", "--yes"], check=True, env=ENV, capture_output=True)

    def client(self, site: str, *args: str, certs: Path | None = None, data: Path | None = None) -> subprocess.Popen:
        self.approve(site)
        proc = spawn([*cli("client.cli"), "--server", f"127.0.0.1:{self.port}", "--site", site,
                      "--data", str(data or self.root / f"data-{site}"), "--certs", str(certs or self.certs / "sites" / site),
                      "--state", str(self.root / f"site-{site}"), *args], self.root / f"client-{site}.log")
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / name).read_text()

    def close(self) -> None:
        for proc in reversed(self.procs):
            kill(proc)


@pytest.fixture
def federation_factory(tmp_path: Path):
    made: list[Federation] = []

    def make(sites: list[str]) -> Federation:
        made.append(Federation(tmp_path, sites))
        return made[-1]
    yield make
    for federation in made:
        federation.close()


def test_three_sites_with_one_killed_mid_run_still_complete(federation_factory) -> None:
    fed = federation_factory(["a", "b", "c"])
    server = fed.server("--rounds", "3", "--min-sites", "2", "--round-timeout", "60")
    fed.wait_submitted()
    clients = {site: fed.client(site) for site in "abc"}
    state = fed.root / "state"
    wait_for(lambda: len(history(state)) >= 1, 400, "round 1")
    assert history(state)[0]["sites_replied"] == 3
    kill(clients["c"], signal.SIGKILL)  # the hospital vanishes without saying goodbye
    assert server.wait(timeout=600) == 0, fed.log("server.log")
    rows = history(state)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[-1]["sites_replied"] == 2 and not rows[-1]["rejected"]
    for name in ("model.safetensors", "model.json", "metrics.json", "checkpoint.pt"):
        assert (state / name).exists(), name
    assert "round 3/3" in fed.log("server.log")
    evaluated = subprocess.run([*cli("cli"), "evaluate", "--model", str(state), "--data", str(fed.root / "data-a"),
                                "--device", "cpu"], capture_output=True, text=True, env=ENV)
    assert evaluated.returncode == 0 and "sensitivity" in evaluated.stdout, evaluated.stderr
    audit = [json.loads(line) for line in (fed.root / "site-a" / "audit.jsonl").read_text().splitlines()]
    trains = [entry for entry in audit if entry["message"] == "train"]
    assert len(trains) == 3 and all(len(entry["update_sha256"]) == 64 for entry in trains)
    assert all(len(entry["server_fingerprint"]) == 64 for entry in audit)


def test_server_killed_after_round_one_resumes_and_bad_sites_are_refused(federation_factory, tmp_path: Path) -> None:
    fed = federation_factory(["a", "b"])
    state = fed.root / "state"
    server = fed.server("--rounds", "3", "--min-sites", "2", "--round-timeout", "120")
    fed.wait_submitted()
    for site in "ab":
        fed.client(site)
    wait_for(lambda: len(history(state)) >= 1, 400, "round 1")
    kill(server, signal.SIGKILL)  # coordinator crash between rounds
    refused = subprocess.run([*cli("server.cli"), "--certs", str(fed.certs), "--model", "tinycnn", "--image-size", "16",
                              "--state", str(state), "--rounds", "3", "--port", str(fed.port), "--lr", "0.5",
                              "--batch-size", "16", "--resume"], capture_output=True, text=True, env=ENV)
    assert refused.returncode == 2 and "lr" in refused.stderr and "Traceback" not in refused.stderr
    resumed = fed.server("--rounds", "3", "--min-sites", "2", "--round-timeout", "120", "--resume",
                         log="server-resumed.log")
    # A hospital whose key was never registered with this SuperLink is refused, clearly and quickly.
    subprocess.run([*cli("cli"), "certs", "add-site", "--out", str(fed.certs), "late"], check=True, env=ENV,
                   capture_output=True)
    make_synthetic_dataset(fed.root / "data-late", per_class=10, size=28, seed=99)
    intruder = fed.client("late", "--wait", "60")
    assert intruder.wait(timeout=180) != 0
    assert "regist" in fed.log("client-late.log").lower()
    assert resumed.wait(timeout=900) == 0, fed.log("server-resumed.log")
    rows = history(state)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert "round 2/3" in fed.log("server-resumed.log")


def test_wrong_ca_wrong_port_and_unusable_data_fail_with_a_message(tmp_path: Path) -> None:
    certs, other = tmp_path / "certs", tmp_path / "other"
    for folder in (certs, other):
        subprocess.run([*cli("cli"), "certs", "init", "--out", str(folder), "--server-name", "localhost",
                        "--sites", "a"], check=True, env=ENV, capture_output=True)
    data = make_synthetic_dataset(tmp_path / "data", per_class=5, size=20)
    port = free_port()
    server = spawn([*cli("server.cli"), "--certs", str(certs), "--model", "tinycnn", "--rounds", "1",
                    "--state", str(tmp_path / "state"), "--host", "127.0.0.1", "--port", str(port)], tmp_path / "server.log")
    try:
        wait_for(lambda: "submitted" in (tmp_path / "server.log").read_text(), 120, "the server")

        def client(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*cli("client.cli"), "--site", "a", "--wait", "0", "--state", str(tmp_path / "site"),
                                   *args], capture_output=True, text=True, env=ENV, timeout=120)

        wrong_ca = client("--server", f"127.0.0.1:{port}", "--data", str(data), "--certs", str(other / "sites" / "a"))
        closed = client("--server", f"127.0.0.1:{free_port()}", "--data", str(data), "--certs", str(certs / "sites" / "a"))
        empty = tmp_path / "empty"
        empty.mkdir()
        no_data = client("--server", f"127.0.0.1:{port}", "--data", str(empty), "--certs", str(certs / "sites" / "a"))
    finally:
        kill(server)
    for result, needle in ((wrong_ca, "CA"), (closed, "connection refused"), (no_data, "no images")):
        assert result.returncode == 2, result.stdout + result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_site_with_other_classes_is_refused_with_both_lists(federation_factory) -> None:
    fed = federation_factory(["a", "b", "odd"])
    odd = fed.root / "data-odd-3classes"
    make_synthetic_dataset(odd, classes=("Benign", "Early", "Pre"), per_class=10, size=28, seed=5)
    server = fed.server("--rounds", "1", "--min-sites", "2", "--round-timeout", "60",
                        "--classes", "Benign,Early,Pre,Pro")
    fed.wait_submitted()
    for site in "ab":
        fed.client(site)
    fed.client("odd", data=odd)
    assert server.wait(timeout=600) == 0, fed.log("server.log")
    log = fed.log("server.log")
    assert "['Benign', 'Early', 'Pre']" in log and "['Benign', 'Early', 'Pre', 'Pro']" in log
    assert history(fed.root / "state")[0]["sites_replied"] == 2
