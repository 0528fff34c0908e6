"""Issue 13.2: only the coordinator's own sites count. A node whose key was registered with the
SuperLink behind leuk-server's back (through Flower's Control API) is never sampled, never counts
toward --min-sites, and a reply from it is ignored and logged; the honest sites' run completes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from guard_harness import Hospital, InProcessGrid, initial_arrays, one_round, task_identity  # noqa: F401 (autouse)

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.flower_env import flower_env, flower_executable
from leukfed.server.registered_sites import RegisteredSites
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli, spawn, stop, wait_for

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
