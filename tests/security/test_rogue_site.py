"""Issue 13.2: only the coordinator's own sites count. A node whose key was registered with the
SuperLink behind leuk-server's back (through Flower's Control API) is never sampled, never counts
toward --min-sites, and a reply from it is ignored and logged; the honest sites' run completes."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from guard_harness import Hospital, InProcessGrid, initial_arrays, one_round, task_identity  # noqa: F401 (autouse)
from poisoned_nodes import Federation

from leukfed.server.registered_sites import RegisteredSites
from leukfed.simulations.loopback import stop, wait_for

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

    outcome = one_round(InProcessGrid(hospitals, extra_replies=rogue_reply), min_sites=2, registered_sites=registered())
    log = outcome.strategy.log
    assert log.ignored == [{"site": f"node-{ROGUE}", "node": ROGUE, "phase": "train",
                            "reason": f"ignored reply from unregistered node {ROGUE}"}]
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

    outcome = one_round(InProcessGrid(hospitals, online=online), min_sites=2, registered_sites=registered())
    assert len(looks) >= 3                 # the round waited for b: the rogue did not make up the number
    assert hospitals[ROGUE].asked == []    # never sent a train or an evaluate message
    assert hospitals[11].asked == hospitals[22].asked == ["train", "evaluate"]
    assert sorted(outcome.strategy.log.train) == [11, 22]


# --------------------------------------------------------------------------------------------
# The attack over the network: leuk-server, two hospitals and a rogue stock flower-supernode
# --------------------------------------------------------------------------------------------

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
    rogue, keys = federation.register_behind_back("rogue")
    rogue_proc = federation.stock_node("rogue", keys)
    federation.client("a", federation.root / "data-a")
    wait_for(lambda: federation.node_status().get(rogue) == "online"
             and federation.node_status().get(sites["a"]) == "online", 180, "site a and the rogue online")
    # Two nodes are online and --min-sites is 2, but only one of them is the coordinator's: the run waits.
    asked = federation.root / "rogue-was-asked"   # the poisoned ClientApp leaves it when given any task
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
        assert set(row["sites"]) == {"a", "b"} and row["sites_sampled"] == 2
        assert {name: site["node"] for name, site in row["sites"].items()} == {"a": sites["a"], "b": sites["b"]}
    assert str(rogue) not in json.dumps(rows)
    assert not asked.exists()                                            # no task, so no update, ever reached it
    assert rogue_proc.poll() is None
    stop(rogue_proc)
