"""leuk-server and leuk-client as real processes on loopback with TLS and site keys: rounds, faults, resume."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.common.flower.env import free_port
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli, read_history, spawn, stop, wait_for

pytestmark = pytest.mark.slow


class Federation(LoopbackFederation):
    """Small generated data per site (one synthetic hospital each), tiny model, small batches."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        super().__init__(root, sites)
        for i, site in enumerate(sites):
            make_synthetic_dataset(root / f"data-{site}", per_class=10, size=28, seed=20 + i)

    def server(self, *args: str, log: str = "server.log") -> subprocess.Popen:
        return super().server("--batch-size", "16", *args, log=log)

    def client(self, site: str, *args: str, certs: Path | None = None, data: Path | None = None) -> subprocess.Popen:
        return super().client(site, data or self.root / f"data-{site}", *args, certs=certs)


def history(state: Path) -> list[dict]:
    return read_history(state)


kill = stop


@pytest.fixture
def federation_factory(tmp_path: Path):
    made: list[Federation] = []

    def make(sites: list[str]) -> Federation:
        made.append(Federation(tmp_path, sites))
        return made[-1]
    yield make
    for federation in made:
        federation.close()


# Seen once in CI-like runs (2026-12-05): a round in which a site is killed (or after a coordinator
# restart) can time out with no reply although the live sites sent theirs; not reproduced in isolation,
# on flwr 1.41 or 1.42. One rerun, until the cause is found (closing note of session 6).
@pytest.mark.flaky(reruns=1)
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
    for name in ("model.safetensors", "model.json", "metrics.json", "checkpoint.safetensors"):
        assert (state / name).exists(), name
    assert "round 3/3" in fed.log("server.log")
    evaluated = subprocess.run([*cli("cli"), "evaluate", "--model", str(state), "--data", str(fed.root / "data-a"),
                                "--device", "cpu"], capture_output=True, text=True, env=ENV)
    assert evaluated.returncode == 0 and "sensitivity" in evaluated.stdout, evaluated.stderr
    audit = [json.loads(line) for line in (fed.root / "site-a" / "audit.jsonl").read_text().splitlines()]
    trains = [entry for entry in audit if entry["message"] == "train"]
    assert len(trains) == 3 and all(len(entry["update_sha256"]) == 64 for entry in trains)
    # Rounds 1 and 2 were scored inside the next train task; only the last round sent an evaluation message.
    assert [entry["message"] for entry in audit].count("evaluate") == 1
    assert rows[0]["evaluated_in_round"] == 2 and isinstance(rows[0]["evaluate"]["eval_accuracy"], float)
    assert "eval_accuracy" in trains[1]["metrics_sent"] and "eval_accuracy" not in trains[0]["metrics_sent"]
    assert all(len(entry["server_fingerprint"]) == 64 for entry in audit)


@pytest.mark.flaky(reruns=1)  # see above
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
    # Its key is made in a copy of the certificate folder, so the coordinator never registers it.
    outside = fed.root / "certs-outside"
    shutil.copytree(fed.certs, outside)
    subprocess.run([*cli("cli"), "certs", "add-site", "--out", str(outside), "late"], check=True, env=ENV,
                   capture_output=True)
    make_synthetic_dataset(fed.root / "data-late", per_class=10, size=28, seed=99)
    intruder = fed.client("late", "--wait", "60", certs=outside / "sites" / "late")
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
    # min-sites 3: the round waits for all three, so the odd site is asked to train and refuses
    server = fed.server("--rounds", "1", "--min-sites", "3", "--round-timeout", "60",
                        "--classes", "Benign,Early,Pre,Pro")
    fed.wait_submitted()
    for site in "ab":
        fed.client(site)
    fed.client("odd", data=odd)
    assert server.wait(timeout=600) == 0, fed.log("server.log")
    log = fed.log("server.log")
    assert "['Benign', 'Early', 'Pre']" in log and "['Benign', 'Early', 'Pre', 'Pro']" in log
    assert history(fed.root / "state")[0]["sites_replied"] == 2
