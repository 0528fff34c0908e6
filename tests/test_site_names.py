"""Sites are named by their names in history.json, the ServerApp's log and leuk-server's lines; node ids
are a detail; histories written before (keyed by node id) still read and resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from inprocess_federation import tracked_federation  # noqa: F401 - the shared federation fixture

from leukfed.common.fedconfig import FedConfig
from leukfed.server.cli import _print_round
from leukfed.server.registered_sites import NAME_RECORD, RegisteredSites
from leukfed.server.state import load_resumed, read_history, save_round, upgrade_history


@pytest.mark.slow   # the shared in-process federation (tests/inprocess_federation.py)
def test_history_and_log_name_the_virtual_sites(tracked_federation) -> None:  # noqa: F811
    state, lines, _ = tracked_federation
    history = read_history(state)
    assert [row["round"] for row in history] == [1, 2]
    nodes = {"site-0": 1000, "site-1": 1017}
    for row in history:
        assert {name: site["node"] for name, site in row["sites"].items()} == nodes
        assert all(site["train"]["num-examples"] >= 1 and site["evaluate"] for site in row["sites"].values())
    assert history[0]["evaluated_in_round"] == 2     # round 1's scores came with round 2's replies, by name
    round_lines = [line for line in lines if line.startswith("round ")]
    assert round_lines and all("(site-0, site-1)" in line for line in round_lines if "/2:" in line)
    assert not any("1000" in line or "1017" in line for line in round_lines)   # no bare node ids
    raw = json.loads((state / "history.json").read_text())
    assert set(raw[-1]["sites"]) == set(nodes)


def test_leuk_server_lines_name_sites_and_keep_the_node_as_a_detail(capsys) -> None:
    row = {"round": 3, "sites_replied": 1, "sites_sampled": 2, "round_seconds": 1.0, "bytes_sent": 2e6,
           "bytes_received": 1e6, "server_evaluate": {}, "evaluate": {"eval_accuracy": 0.5},
           "sites": {"hospital-a": {"node": 11, "train": {}, "evaluate": {}}},
           "failures": [{"site": "hospital-b", "node": 12, "phase": "train", "reason": "Traceback\nSiteRefusal: no"}],
           "rejected": [{"site": "node-99", "node": 99, "reason": "update norm 5 exceeds the bound 1"}]}
    _print_round(row, 5)
    out = capsys.readouterr().out
    assert "(nodes" not in out and "1/2 sites replied (hospital-a)" in out
    assert "site hospital-b (node 12) failed in train: SiteRefusal: no" in out
    assert "  node 99 update rejected: update norm 5" in out                 # no name known: the node id


OLD_ROW = {"round": 1, "sites_sampled": 3, "sites_replied": 2,
           "sites": {"11": {"name": "a", "train": {"num-examples": 5}, "evaluate": {}},
                     "12": {"train": {"num-examples": 7}, "evaluate": {"eval_accuracy": 0.5}}},
           "failures": [{"node": 13, "phase": "train", "reason": "x"}],
           "rejected": [{"node": 11, "site": "a", "reason": "y"}], "ignored": [],
           "train": {}, "evaluate": {}, "server_evaluate": {}}


def test_an_older_history_reads_as_keyed_by_name() -> None:
    [row] = upgrade_history(json.loads(json.dumps([OLD_ROW])))
    assert row["sites"] == {"a": {"node": 11, "train": {"num-examples": 5}, "evaluate": {}},
                            "node-12": {"node": 12, "train": {"num-examples": 7}, "evaluate": {"eval_accuracy": 0.5}}}
    assert row["failures"][0]["site"] == "node-13" and row["rejected"][0]["site"] == "a"
    assert upgrade_history(json.loads(json.dumps([row]))) == [row]           # today's rows stay as they are


def test_an_older_state_dir_resumes_with_named_sites(tmp_path: Path) -> None:
    fed = FedConfig(state_dir=str(tmp_path), rounds=3, class_names="x,y")
    save_round(tmp_path, round_=1, state={"w": np.zeros(3, np.float32)}, strategy_state={}, fed=fed,
               class_names=("x", "y"), history=[json.loads(json.dumps(OLD_ROW))])   # as an older version wrote it
    resumed = load_resumed(tmp_path, FedConfig(state_dir=str(tmp_path), rounds=3, class_names="x,y", resume=True))
    assert set(resumed.history[0]["sites"]) == {"a", "node-12"} and resumed.round == 1
    assert set(read_history(tmp_path)[0]["sites"]) == {"a", "node-12"}


def reply(node: int, name: object = None) -> Message:
    asked = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    if name is not None:
        content[NAME_RECORD] = ConfigRecord({"name": name})
    answer = Message(content, reply_to=asked)
    answer.metadata.__dict__["_src_node_id"] = node
    return answer


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def test_registered_names_cannot_be_replaced_by_what_a_site_claims() -> None:
    """SECURITY: with leuk-server's list, a site's reply naming itself (or another site) changes nothing."""
    sites = RegisteredSites.parse("a=11,b=12")
    for node, claim in ((11, "b"), (12, "hospital-z"), (99, "a")):
        sites.note_reply(reply(node, claim))
    assert [sites.site_name(n) for n in (11, 12, 99)] == ["a", "b", "node-99"]
    assert sites.label(12) == "site b (node 12)" and sites.label(99) == "node 99"


def test_without_a_list_the_first_valid_unique_claim_names_a_node() -> None:
    sites = RegisteredSites()
    sites.note_reply(reply(1, "site-0"))
    sites.note_reply(reply(1, "site-9"))          # a second claim: the first stays
    sites.note_reply(reply(2, "site-0"))          # another node's name: refused
    sites.note_reply(reply(3, "node-1"))          # would pass for node 1's fallback label: refused
    sites.note_reply(reply(4, "bad name\n"))      # not a site name
    sites.note_reply(reply(5, 42))
    sites.note_reply(reply(6))                    # no claim at all
    assert [sites.site_name(n) for n in range(1, 7)] == ["site-0", "node-2", "node-3", "node-4", "node-5", "node-6"]
