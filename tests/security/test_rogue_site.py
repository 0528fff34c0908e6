"""Issue 13.2: only the coordinator's own sites count. A node whose key was registered with the
SuperLink behind leuk-server's back (through Flower's Control API) is never sampled, never counts
toward --min-sites, and a reply from it is ignored and logged; the honest sites' run completes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from guard_harness import Hospital, InProcessGrid, initial_arrays, one_round, task_identity  # noqa: F401 (autouse)

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.flower_env import flower_env, flower_executable, free_port
from leukfed.server.registered_sites import RegisteredSites
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli, stop, wait_for

HONEST, ROGUE = {"a": 11, "b": 22}, 666


def registered() -> str:
    return RegisteredSites.format(HONEST)


def test_the_sites_setting_round_trips_and_bad_entries_are_refused() -> None:
    sites = RegisteredSites.parse(registered())
    assert sites.names == {11: "a", 22: "b"} and sites.allows(22) and not sites.allows(ROGUE)
    assert sites.label(11) == "site a (node 11)" and sites.label(ROGUE) == f"node {ROGUE}"
    assert RegisteredSites.parse("").allows(ROGUE)              # simulation: no list, every node counts
    for bad in ("a", "a=", "=5", "a=x"):
        with pytest.raises(Exception, match="bad site entry"):
            RegisteredSites.parse(bad)


def test_a_reply_from_an_unregistered_node_is_ignored_and_logged() -> None:
    hospitals = {11: Hospital(seed=1), 22: Hospital(seed=2)}

    def rogue_reply(message: Message) -> list[Message]:
        """The rogue slips an extreme update with a huge count in beside the honest replies."""
        if message.metadata.message_type != "train" or message.metadata.dst_node_id != 11:
            return []
        content = RecordDict({"arrays": ArrayRecord({k: Array(np.full_like(v, 50)) for k, v in
                                                     initial_arrays().items()}),
                              "metrics": MetricRecord({"num-examples": 1000, "train_loss": 0.0})})
        metadata = Metadata(run_id=7, message_id="", src_node_id=ROGUE, dst_node_id=1,
                            reply_to_message_id=message.metadata.message_id, group_id="1",
                            created_at=time.time(), ttl=600.0, message_type="train")
        return [Message(content, metadata=metadata)]

    outcome = one_round(InProcessGrid(hospitals, extra_replies=rogue_reply), min_sites=2, sites=registered())
    log = outcome.strategy.log
    assert log.ignored == [{"node": ROGUE, "phase": "train", "reason": f"ignored reply from unregistered node {ROGUE}"}]
    assert sorted(log.train) == [11, 22] and not log.rejected
    honest = [h.update(initial_arrays()) for h in hospitals.values()]
    for key in ("conv.weight", "fc.bias"):
        np.testing.assert_allclose(outcome.after[key], (honest[0][key] + honest[1][key]) / 2, rtol=1e-5)


def test_only_registered_nodes_are_asked_and_counted_toward_min_sites() -> None:
    hospitals = {11: Hospital(seed=1), 22: Hospital(seed=2), ROGUE: Hospital(seed=3, scale=100.0)}
    looks = []

    def online() -> list[int]:
        """Site a and the rogue are connected from the start; site b joins at the third look."""
        looks.append(1)
        return [11, ROGUE, 22] if len(looks) >= 3 else [11, ROGUE]

    outcome = one_round(InProcessGrid(hospitals, online=online), min_sites=2, sites=registered())
    assert len(looks) >= 3                 # the round waited for b: the rogue did not make up the number
    assert hospitals[ROGUE].asked == []    # never sent a train or an evaluate message
    assert hospitals[11].asked == hospitals[22].asked == ["train", "evaluate"]
    assert sorted(outcome.strategy.log.train) == [11, 22]


# --------------------------------------------------------------------------------------------
# The attack over the network: leuk-server, two hospitals and a rogue stock flower-supernode
# --------------------------------------------------------------------------------------------

# The rogue's ClientApp: the same leukfed code, but every update it would send is 1000 x the model,
# and any task that reaches it leaves a marker file.
POISON = textwrap.dedent('''
    import importlib.abc, importlib.machinery, os, sys
    from pathlib import Path

    class Poison(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "leukfed.client.client_app":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                honest_encode, honest_classes = module.encode_state, module.site_class_names

                def extreme(state, *args, **kwargs):
                    Path(os.environ["ROGUE_MARKER"]).write_text("asked to train")
                    return honest_encode({k: v * 1000 if v.is_floating_point() else v for k, v in state.items()},
                                         *args, **kwargs)

                def classes(*args, **kwargs):
                    Path(os.environ["ROGUE_MARKER"]).write_text("asked for classes")
                    return honest_classes(*args, **kwargs)
                module.encode_state, module.site_class_names = extreme, classes
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Poison())
''')


class Federation(LoopbackFederation):
    def __init__(self, root: Path, sites: list[str]) -> None:
        super().__init__(root, sites)
        for i, site in enumerate([*sites, "rogue"]):
            make_synthetic_dataset(root / f"data-{site}", per_class=10, size=28, seed=20 + i)

    def flwr(self, *args: str) -> dict:
        """Flower's CLI over the coordinator's own connection to its SuperLink (the Control API)."""
        home = self.state / "superlink" / "flwr-home"
        out = subprocess.run([flower_executable("flwr"), *args, "leukfed", "--format", "json"], cwd=home,
                             env=flower_env(home), capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout[out.stdout.find("{"):])
        assert data.get("success"), out.stdout + out.stderr
        return data

    def serverapp_log(self) -> str:
        """What the ServerApp printed so far (`flwr log RUN --show`)."""
        run_id = next(ln.split()[1] for ln in self.log("server.log").splitlines() if ln.startswith("run "))
        home = self.state / "superlink" / "flwr-home"
        return subprocess.run([flower_executable("flwr"), "log", run_id, "leukfed", "--show"], cwd=home,
                              env=flower_env(home), capture_output=True, text=True, timeout=120).stdout

    def node_status(self) -> dict[int, str]:
        return {int(n["node-id"]): n["status"] for n in self.flwr("supernode", "list")["nodes"]}

    def registered_sites(self) -> dict[str, int]:
        lines = [ln.split() for ln in self.log("server.log").splitlines() if ln.startswith("registered site ")]
        return {words[2]: int(words[4].rstrip(")")) for words in lines}

    def rogue(self) -> tuple[int, subprocess.Popen]:
        """A key the coordinator never registered, registered behind its back; a stock SuperNode with it."""
        outside = self.root / "certs-outside"
        shutil.copytree(self.certs, outside)     # the CA is public; the key made here is never registered by it
        subprocess.run([*cli("cli"), "certs", "add-site", "--out", str(outside), "rogue"], check=True, env=ENV,
                       capture_output=True)
        keys = outside / "sites" / "rogue"
        node = int(self.flwr("supernode", "register", str(keys / "site.pub"))["node-id"])
        poison = self.root / "rogue-python"
        poison.mkdir()
        (poison / "sitecustomize.py").write_text(POISON)
        env = {**flower_env(self.root / "rogue-home"), "ROGUE_MARKER": str(self.root / "rogue-was-asked"),
               "PYTHONPATH": os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")])}
        config = f'data-path="{self.root / "data-rogue"}" site-name="rogue"'
        log = (self.root / "rogue.log").open("w")
        proc = subprocess.Popen([flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                 "--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key",
                                 str(keys / "site.key"), "--node-config", config, "--port", str(free_port())],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return node, proc


@pytest.fixture
def federation(tmp_path: Path):
    made = Federation(tmp_path, ["a", "b"])
    yield made
    made.close()


@pytest.mark.slow
def test_a_rogue_node_registered_behind_the_coordinators_back_never_counts(federation: Federation) -> None:
    server = federation.server("--batch-size", "16", "--rounds", "1", "--min-sites", "2", "--round-timeout", "60")
    federation.wait_submitted()
    sites = federation.registered_sites()
    rogue, rogue_proc = federation.rogue()
    federation.client("a", federation.root / "data-a")
    wait_for(lambda: federation.node_status().get(rogue) == "online"
             and federation.node_status().get(sites["a"]) == "online", 180, "site a and the rogue online")
    # Two nodes are online and --min-sites is 2, but only one of them is the coordinator's: the run waits.
    asked = federation.root / "rogue-was-asked"
    wait_for(lambda: "waiting for sites" in federation.serverapp_log() or asked.exists(), 180,
             "the ServerApp to wait for sites")
    time.sleep(8)
    assert not asked.exists()                                            # not even asked for its classes
    assert federation.serverapp_log().split("waiting for sites: ")[-1].startswith("1 of 2 connected")
    audit = federation.root / "site-a" / "audit.jsonl"
    assert not audit.exists() or '"query"' not in audit.read_text()
    assert federation.history() == [] and server.poll() is None
    assert federation.node_status()[rogue] == "online"                  # it is still there, still ignored
    federation.client("b", federation.root / "data-b")
    assert server.wait(timeout=600) == 0, federation.log("server.log")
    rows = federation.history()
    assert [row["round"] for row in rows] == [1]
    for row in rows:
        assert set(row["sites"]) == {str(sites["a"]), str(sites["b"])} and row["sites_sampled"] == 2
        assert {site["name"] for site in row["sites"].values()} == {"a", "b"}
    assert str(rogue) not in json.dumps(rows)
    assert not asked.exists()                                            # no task, so no update, ever reached it
    assert rogue_proc.poll() is None
    stop(rogue_proc)
