"""Malformed or conflicting answers to the class query are ignored and logged by site; the ServerApp goes on."""
from __future__ import annotations

from typing import Callable

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity
from leukfed.common.flower.inprocess import InProcessGrid

from leukfed.client.client_app import app
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.server.server_app import ask_class_names

Site = Callable[[Message], Message]
HONEST = ["AML", "APL"]


@pytest.fixture(scope="module")
def honest_site(tmp_path_factory) -> Site:
    """The real ClientApp on a real (small) hospital folder."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("site") / "hospital", per_class=3, size=16,
                                  classes=tuple(HONEST))

    def answer(message: Message) -> Message:
        context = Context(run_id=7, node_id=message.metadata.dst_node_id, state=RecordDict(),
                          run_config=FedConfig().to_run_config(), node_config={"data-path": str(data)})
        return app(message, context)
    return answer


def replying(content: RecordDict | Error) -> Site:
    return lambda message: Message(content, reply_to=message)


def spoofing(node: int) -> Site:
    """A reply that claims to come from another node."""
    def answer(message: Message) -> Message:
        proto = message_to_proto(Message(RecordDict({"info": ConfigRecord({"class-names": ["X", "Y"]})}),
                                         reply_to=message))
        proto.metadata.src_node_id = node
        return message_from_proto(proto)
    return answer


def listing(names) -> Site:
    return replying(RecordDict({"info": ConfigRecord({"class-names": names})}))


MALFORMED = {
    "no info record": replying(RecordDict()),
    "info as metrics": replying(RecordDict({"info": MetricRecord({"class-names": 3})})),
    "no class list": replying(RecordDict({"info": ConfigRecord({"other": "x"})})),
    "one string": listing("AML,APL"),
    "numbers": listing([1, 2]),
    "bytes": listing([b"AML", b"APL"]),
    "empty list": listing([]),
    "huge list": listing([f"c{i}" for i in range(50_000)]),
    "huge name": listing(["A" * 1_000_000, "B"]),
    "comma in a name": listing(["AML,APL", "CLL"]),
    "control characters": listing(["AML\n[leukfed] round 9/9", "APL"]),
    "repeated names": listing(["AML", "AML"]),
    "error reply": replying(Error(code=2, reason="boom")),
    "spoofed sender": spoofing(999),
}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_reply_is_ignored_and_logged(honest_site: Site, kind: str, capsys) -> None:
    grid = InProcessGrid({1: honest_site, 2: MALFORMED[kind], 3: honest_site})
    assert ask_class_names(grid, FedConfig(min_sites=3, round_timeout=5)) == tuple(HONEST)
    out = capsys.readouterr().out
    assert "ignored" in out and ("node 2" in out or "node 999" in out), out
    assert len(out) < 2000                                    # a huge reply does not flood the log


def test_the_majority_wins_and_each_dissenting_site_is_named(honest_site: Site, capsys) -> None:
    grid = InProcessGrid({1: honest_site, 2: listing(["AML", "APL", "CLL"]), 3: honest_site, 4: listing(["X", "Y"])})
    assert ask_class_names(grid, FedConfig(min_sites=4, round_timeout=5)) == tuple(HONEST)
    out = capsys.readouterr().out
    assert "node 2 reports classes [AML, APL, CLL]" in out and "node 4 reports classes [X, Y]" in out


def test_a_tie_is_broken_the_same_way_whatever_the_reply_order(honest_site: Site) -> None:
    first = ask_class_names(InProcessGrid({1: honest_site, 2: listing(["B1", "B2"])}), FedConfig(min_sites=2))
    second = ask_class_names(InProcessGrid({1: listing(["B1", "B2"]), 2: honest_site}), FedConfig(min_sites=2))
    assert first == second == tuple(HONEST)


def test_only_malformed_replies_end_the_run_with_one_clear_error() -> None:
    grid = InProcessGrid({1: MALFORMED["numbers"], 2: MALFORMED["no info record"]})
    with pytest.raises(LeukError, match="no site answered the class-list query with a usable class list"):
        ask_class_names(grid, FedConfig(min_sites=2, round_timeout=5))
