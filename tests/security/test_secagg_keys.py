"""Secure aggregation bound to site identities (issue 13.5): the server cannot add or swap sites.

The attack from the review: under --secure-aggregation a server that invented a second site learnt
the victim's update (the "sum" of the victim and a site whose update the server chose). Here the
server plays that attack and its variants (a substituted key, a replayed signed key or round,
stripped signatures) and every time the honest sites abort before any secret or masked update
leaves them; the honest federation still equals FedAvg.

In-process like tests/test_secagg.py: the real server half (SecureAggregationGrid) and the real
site half (`secure_train` in a ClientApp with per-node Contexts), every message through protobuf,
real site keys from `leuk certs init`. The attacking server changes what one site receives and
runs fake sites with the real site code under node configs of its own.
"""
from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from leukfed.common.flower.inprocess import InProcessGrid, run_client_app
from leukfed.client.secagg import secure_train
from leukfed.common.errors import LeukError
from leukfed.common.secagg import (
    MASKED,
    MESSAGE_TYPE,
    RECORD,
    RoundKey,
    SecAggSettings,
    ids,
    keypair,
    load_pinned_keys,
    load_site_key,
    new_round_id,
    round_keys_statement,
    scale_bits,
    sign,
    verify_round_keys,
)
from leukfed.server.certs import init_certs
from leukfed.server.secagg import SecureAggregationGrid

RUN = 7
VICTIM, H2, H3, FAKE = 11, 22, 33, 66
GLOBAL = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4), "b": np.zeros(4, np.float32)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps the run id on every Message it builds; the ServerApp process sets it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Node configs: the federation's three sites (pinning `sites/`), and the server's own fakes."""
    root = tmp_path_factory.mktemp("pki")
    federation = init_certs(root / "federation", ["localhost"], ["h1", "h2", "h3"])
    rogue = init_certs(root / "rogue", ["localhost"], ["h2", "mallory"])   # keys the server made itself
    rogue_pins = root / "rogue-pins"                                       # what its fakes accept
    rogue_pins.mkdir()
    for name, site in [*federation.sites().items(), *rogue.sites().items()]:
        shutil.copy(site.public_key, rogue_pins / f"{name}.pub")
    configs = {name: {"site-name": name, "site-key": str(site.private_key), "peer-keys": str(federation.root / "sites")}
               for name, site in federation.sites().items()}
    for name, site in rogue.sites().items():
        configs[f"rogue-{name}"] = {"site-name": name, "site-key": str(site.private_key), "peer-keys": str(rogue_pins)}
    return configs


# --------------------------------------------------------------------------------------------
# Sites with known updates, the network between them and the server
# --------------------------------------------------------------------------------------------

def site_update(nid: int) -> tuple[dict[str, np.ndarray], int]:
    """Each site's update (new - global) and example count; the server's fake sends zeros."""
    if nid == FAKE:
        return {k: np.zeros_like(v) for k, v in GLOBAL.items()}, 50
    rng = np.random.default_rng(nid)
    return {k: rng.normal(scale=0.05, size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}, 10 + nid


def site_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        delta, weight = site_update(msg.metadata.dst_node_id)
        new = {k: Array(v.numpy() + delta[k]) for k, v in msg.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": weight})}),
                       reply_to=msg)

    @app.train("secagg")
    def train_secagg(msg: Message, context: Context) -> Message:
        return secure_train(msg, context, train)

    return app


class Network(InProcessGrid):
    """Delivers the server's messages (protobuf both ways); `tamper(stage, dst, cfg)` is the server
    changing what one site receives. `received` is every reply the server holds."""

    def __init__(self, nodes: dict[int, dict], tamper=None) -> None:
        self.app = site_app()
        self.contexts = {nid: Context(RUN, nid, dict(cfg), RecordDict(), {}) for nid, cfg in nodes.items()}
        self.tamper = tamper
        super().__init__({nid: partial(run_client_app, self.app, context=context)
                          for nid, context in self.contexts.items()}, run_id=RUN)

    def deliver(self, message: Message) -> Message | None:
        cfg = message.content.config_records.get(RECORD)   # each site gets its own copy to tamper with
        if self.tamper is not None and cfg is not None:
            self.tamper(cfg["stage"], message.metadata.dst_node_id, cfg)
        return super().deliver(message)

    def sent_by(self, nid: int, ctx: str | None = None) -> list[Message]:
        """What site `nid` replied (in round `ctx`, or in any round)."""
        return [r for r in self.received if r.metadata.src_node_id == nid and r.has_content()
                and (ctx is None or r.content[RECORD]["round"] == ctx)]


def train_round(network: Network, secure: SecureAggregationGrid | None = None,
                server_round: int = 1) -> tuple[SecureAggregationGrid, list[Message]]:
    """One round of the strategy's TRAIN messages through the secure-aggregation grid."""
    secure = secure or SecureAggregationGrid(network, SecAggSettings())
    content = {"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
               "config": ConfigRecord({"server-round": server_round})}
    messages = [Message(RecordDict(dict(content)), dst_node_id=nid, message_type=MessageType.TRAIN,
                        group_id=str(server_round)) for nid in network.contexts]
    return secure, list(secure.send_and_receive(messages, timeout=30))


def fedavg(members: list[int]) -> dict[str, np.ndarray]:
    updates = {n: site_update(n) for n in members}
    total = sum(w for _, w in updates.values())
    return {k: GLOBAL[k] + sum(w * d[k].astype(np.float64) for d, w in updates.values()) / total for k in GLOBAL}


def attacker_recovers_victim(replies: list[Message]) -> dict[str, np.ndarray] | None:
    """The invented-site attack: aggregate of (victim, fake with a zero update), the weights in clear."""
    by_node = {r.metadata.src_node_id: r for r in replies if not r.has_error()}
    if VICTIM not in by_node or FAKE not in by_node:
        return None
    aggregate = by_node[VICTIM].content["arrays"]
    w_victim = by_node[VICTIM].content["metrics"]["num-examples"]
    w_fake = by_node[FAKE].content["metrics"]["num-examples"]
    return {k: (aggregate[k].numpy().astype(np.float64) - GLOBAL[k]) * (w_victim + w_fake) / w_victim for k in GLOBAL}


def assert_victim_gave_nothing(network: Network, secure: SecureAggregationGrid, reason: str) -> None:
    """The victim aborted before sharing a secret: no encrypted shares, no masked update, no sum."""
    report = secure.last_report
    assert VICTIM in report.dropped and reason in report.dropped[VICTIM], report.summary()
    assert VICTIM not in report.shared and VICTIM not in report.masked
    for reply in network.sent_by(VICTIM, report.ctx):
        assert reply.content[RECORD]["stage"] == "setup"          # only its signed public keys left it
        assert MASKED not in reply.content.array_records


def assert_equals_fedavg(replies: list[Message], members: list[int]) -> None:
    expected = fedavg(members)
    aggregate = next(r.content["arrays"] for r in replies if not r.has_error())
    for key, value in expected.items():
        assert np.abs(aggregate[key].numpy() - value).max() < 1e-6, key


# --------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------

def test_invented_site_recovers_an_unsigned_victim_but_not_a_deployed_one(keys) -> None:
    # What the review found, still what simulations (unsigned, all nodes one's own) would allow.
    unsigned = Network({VICTIM: {"site-name": "h1", "partition-id": 0}, FAKE: {"site-name": "h2", "partition-id": 1}})
    _, replies = train_round(unsigned)
    recovered = attacker_recovers_victim(replies)
    truth, _ = site_update(VICTIM)
    assert recovered is not None and max(np.abs(recovered[k] - truth[k]).max() for k in truth) < 1e-6

    # Deployment: the victim pins the federation's keys; the server's site "mallory" is unknown.
    network = Network({VICTIM: keys["h1"], FAKE: keys["rogue-mallory"]})
    secure, replies = train_round(network)
    assert secure.last_report.aborted and attacker_recovers_victim(replies) is None
    assert all(r.has_error() for r in replies)
    assert_victim_gave_nothing(network, secure, "unknown site 'mallory'")


def test_fake_site_under_a_real_name_is_refused(keys) -> None:
    """The server's own key under the name of a real site (h2) fails h2's pinned key."""
    network = Network({VICTIM: keys["h1"], H3: keys["h3"], FAKE: keys["rogue-h2"]})
    secure, replies = train_round(network)
    assert secure.last_report.aborted and attacker_recovers_victim(replies) is None
    assert_victim_gave_nothing(network, secure, "bad signature on the round keys of site 'h2'")


def test_substituted_key_is_refused(keys) -> None:
    """The server swaps h2's round keys for its own in the list it sends the victim."""
    def substitute(stage: str, dst: int, cfg: ConfigRecord) -> None:
        if stage == "share-keys" and dst == VICTIM:
            at = ids(cfg["ids"]).index(H2)
            pk_c, pk_s = list(cfg["pk-c"]), list(cfg["pk-s"])
            pk_c[at], pk_s[at] = keypair()[1], keypair()[1]
            cfg["pk-c"], cfg["pk-s"] = pk_c, pk_s

    network = Network({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]}, tamper=substitute)
    secure, replies = train_round(network)
    assert_victim_gave_nothing(network, secure, "bad signature on the round keys of site 'h2'")
    # The others carry on without the victim: its update is in no sum.
    assert secure.last_report.masked == [H2, H3]
    assert_equals_fedavg(replies, [H2, H3])


def test_replayed_key_and_replayed_round_are_refused(keys) -> None:
    network = Network({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]})
    secure, replies = train_round(network)
    assert not secure.last_report.aborted
    assert_equals_fedavg(replies, [VICTIM, H2, H3])              # the honest round equals FedAvg
    old = next(r.content[RECORD] for r in network.sent_by(H2) if r.content[RECORD]["stage"] == "setup")

    def replay(stage: str, dst: int, cfg: ConfigRecord) -> None:
        if stage == "share-keys" and dst == VICTIM:
            at = ids(cfg["ids"]).index(H2)
            pk_c, pk_s, sigs = list(cfg["pk-c"]), list(cfg["pk-s"]), list(cfg["sigs"])
            pk_c[at], pk_s[at], sigs[at] = old["pk-c"], old["pk-s"], old["sig"]
            cfg["pk-c"], cfg["pk-s"], cfg["sigs"] = pk_c, pk_s, sigs

    network.tamper = replay
    secure, _ = train_round(network, secure, server_round=2)
    assert_victim_gave_nothing(network, secure, "bad signature on the round keys of site 'h2'")

    class ReplayingServer(SecureAggregationGrid):
        """Runs a later round under the first round's id, so that old signatures would fit."""

        def _round_id(self, run_id: int) -> str:
            return self.reports[0].ctx if self.reports else super()._round_id(run_id)

    network.tamper = None
    replaying = ReplayingServer(network, SecAggSettings())
    replaying.reports.append(secure.reports[0])
    replaying._sequence = 5
    _, replies = train_round(network, replaying, server_round=3)
    assert replaying.last_report.aborted and replaying.last_report.keys == []
    assert all("not fresh" in why for why in replaying.last_report.dropped.values())


@pytest.mark.parametrize("how", ["removed", "emptied"])
def test_stripped_signatures_are_refused(keys, how: str) -> None:
    def strip(stage: str, dst: int, cfg: ConfigRecord) -> None:
        if stage == "share-keys":
            if how == "removed":
                del cfg["sigs"]
            else:
                cfg["sigs"] = [b""] * len(cfg["pk-c"])

    network = Network({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]}, tamper=strip)
    secure, replies = train_round(network)
    assert secure.last_report.aborted and all(r.has_error() for r in replies)
    assert_victim_gave_nothing(network, secure, "unsigned")


def test_unsigned_fake_site_is_refused(keys) -> None:
    """A fake that runs as a simulated node (no key) sends no signature at all."""
    network = Network({VICTIM: keys["h1"], H3: keys["h3"], FAKE: {"site-name": "h2", "partition-id": 0}})
    secure, _ = train_round(network)
    assert_victim_gave_nothing(network, secure, "unsigned")


def test_site_refuses_fewer_distinct_sites_than_its_minimum(keys) -> None:
    network = Network({VICTIM: {**keys["h1"], "secagg-min-sites": 3}, H2: keys["h2"]})
    secure, replies = train_round(network)
    assert secure.last_report.aborted and all(r.has_error() for r in replies)
    assert_victim_gave_nothing(network, secure, "requires at least 3")


def test_signatures_bind_run_round_node_and_name(keys) -> None:
    pinned = load_pinned_keys(Path(keys["h1"]["peer-keys"]))
    key = load_site_key(keys["h2"]["site-key"])
    ctx = new_round_id(RUN, 1)
    pk_c, pk_s = keypair()[1], keypair()[1]
    content = "c" * 64
    signed = RoundKey(H2, "h2", pk_c, pk_s, sign(key, round_keys_statement(RUN, ctx, H2, "h2", pk_c, pk_s,
                                                                           content=content)))
    verify_round_keys([signed], pinned, RUN, ctx, min_sites=1, content=content)
    for changed, run, round_id, signed_content in [
            (RoundKey(H3, "h2", pk_c, pk_s, signed.signature), RUN, ctx, content),   # another node
            (RoundKey(H2, "h3", pk_c, pk_s, signed.signature), RUN, ctx, content),   # another name
            (signed, RUN + 1, ctx, content),                                         # another run
            (signed, RUN, new_round_id(RUN, 2), content),                            # another round
            (signed, RUN, ctx, "d" * 64)]:                                           # other round content
        with pytest.raises(LeukError, match="bad signature"):
            verify_round_keys([changed], pinned, run, round_id, min_sites=1, content=signed_content)
    with pytest.raises(LeukError, match="appear twice"):
        verify_round_keys([signed, RoundKey(H3, "h2", pk_c, pk_s, signed.signature)], pinned, RUN, ctx, min_sites=1,
                          content=content)


def test_deployed_site_without_keys_and_misdelivered_messages_are_refused(keys) -> None:
    message = Message(RecordDict({RECORD: ConfigRecord({"stage": "setup", "round": new_round_id(RUN, 1), "sites": "5",
                                                        "clip": 1024.0, "max-examples": 1 << 20,
                                                        "scale-bits": scale_bits(1, 1024.0, 1 << 20),
                                                        "content": "c" * 64})}),
                      dst_node_id=5, message_type=MESSAGE_TYPE)
    with pytest.raises(LeukError, match="no site key"):
        secure_train(message, Context(RUN, 5, {"site-name": "h1"}, RecordDict(), {}), lambda m, c: m)
    with pytest.raises(LeukError, match="delivered to node 6"):
        secure_train(message, Context(RUN, 6, dict(keys["h1"]), RecordDict(), {}), lambda m, c: m)
    wrong_pins = {**keys["h1"], "site-key": keys["h2"]["site-key"]}           # h2's key under the name h1
    with pytest.raises(LeukError, match="no key for this site 'h1'"):
        secure_train(message, Context(RUN, 5, wrong_pins, RecordDict(), {}), lambda m, c: m)


# --------------------------------------------------------------------------------------------
# Deployment: leuk-server and leuk-client as real processes, TLS, site keys from `leuk certs init`
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_deployed_sites_sign_and_pin_and_a_site_missing_a_pin_refuses(tmp_path: Path) -> None:
    """Each hospital pins the federation's site keys in `<its certs folder>/peers/`; site c does not
    pin b, so c refuses the round's keys and the round completes with a and b only."""
    import json

    from leukfed.common.synthetic import make_synthetic_dataset
    from leukfed.simulations.loopback import LoopbackFederation, wait_for

    fed = LoopbackFederation(tmp_path, ["a", "b", "c"])
    try:
        for site in fed.sites:
            make_synthetic_dataset(tmp_path / f"data-{site}", per_class=10, size=28, seed=20 + ord(site))
            peers = fed.certs / "sites" / site / "peers"   # written by `leuk certs` with every site's key
            assert sorted(p.name for p in peers.iterdir()) == [f"{other}.pub" for other in sorted(fed.sites)]
        (fed.certs / "sites" / "c" / "peers" / "b.pub").unlink()    # c does not pin b
        server = fed.server("--rounds", "1", "--min-sites", "3", "--round-timeout", "120", "--batch-size", "16",
                            "--secure-aggregation")
        fed.wait_submitted()
        for site in fed.sites:
            fed.client(site, tmp_path / f"data-{site}")
        wait_for(lambda: server.poll() is not None, 400, "the run to finish")
        assert server.returncode == 0, fed.log("server.log")[-3000:]
        report = fed.history()[0]["secure_aggregation"]
        assert not report["aborted"] and sorted(report["names"].values()) == ["a", "b", "c"], report
        assert len(report["masked"]) == 2 and len(report["dropped"]) == 1
        assert "unknown site 'b'" in next(iter(report["dropped"].values())), report
        audit = [json.loads(line) for line in (tmp_path / "site-a" / "audit.jsonl").read_text().splitlines()]
        masked = [entry for entry in audit if entry["message"] == "train.secagg" and entry.get("update_sha256")]
        assert len(masked) == 1 and len(masked[0]["update_sha256"]) == 64
        assert not (tmp_path / "site-c" / "audit.jsonl").exists() or all(
            not (json.loads(line)["message"] == "train.secagg" and json.loads(line).get("update_sha256"))
            for line in (tmp_path / "site-c" / "audit.jsonl").read_text().splitlines())
    finally:
        fed.close()


# --------------------------------------------------------------------------------------------
# Model inconsistency: one site given other content than the rest of the round
# --------------------------------------------------------------------------------------------

class InconsistentNetwork(Network):
    """A server that sends the victim other arrays in the mask stage (e.g. a model whose update it can
    predict for the other sites, or starting arrays that clip theirs to a known value)."""

    def deliver(self, message: Message) -> Message | None:
        cfg = message.content.config_records.get(RECORD)
        if cfg is not None and cfg["stage"] == "mask" and message.metadata.dst_node_id == VICTIM:
            message.content["arrays"] = ArrayRecord({k: Array(v + 1000) for k, v in GLOBAL.items()})
        return super().deliver(message)


def test_a_site_given_other_content_than_its_peers_masks_nothing(keys) -> None:
    """The digest every site signs at setup binds the round's content: told another digest, the victim's
    signature fails at its peers and theirs at the victim; given other arrays at mask, it refuses."""
    def other_digest(stage, dst, cfg):
        if stage == "setup" and dst == VICTIM:
            cfg["content"] = "0" * 64

    network = Network({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]}, tamper=other_digest)
    secure, replies = train_round(network)
    assert secure.last_report.aborted and all(r.has_error() for r in replies)
    assert_victim_gave_nothing(network, secure, "signed for other round content")

    network = InconsistentNetwork({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]})
    secure, replies = train_round(network)
    assert "differs from the one this site signed" in secure.last_report.dropped[VICTIM]
    assert not any(MASKED in r.content.array_records for r in network.sent_by(VICTIM) if r.has_content())


def test_the_server_cannot_send_differing_content_itself() -> None:
    """An honest server half refuses to start a round whose train messages differ between sites."""
    network = Network({VICTIM: {"site-name": "h1", "partition-id": 0}, H2: {"site-name": "h2", "partition-id": 1}})
    secure = SecureAggregationGrid(network, SecAggSettings())
    messages = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v + nid) for k, v in GLOBAL.items()}),
                                    "config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=nid, message_type=MessageType.TRAIN) for nid in (VICTIM, H2)]
    replies = list(secure.send_and_receive(messages, timeout=30))
    assert "differ between sites" in secure.last_report.aborted and all(r.has_error() for r in replies)
    assert not network.received                                   # nothing was sent


def test_a_training_round_is_masked_once(keys) -> None:
    """The same round number again (over another set of sites, its sum minus the first would be one site's
    update): every site refuses it; the next round number trains."""
    network = Network({VICTIM: keys["h1"], H2: keys["h2"], H3: keys["h3"]})
    secure, replies = train_round(network, server_round=1)
    assert not secure.last_report.aborted
    secure, replies = train_round(network, secure, server_round=1)
    assert secure.last_report.aborted and all("not after this site's last trained round 1" in why
                                              for why in secure.last_report.dropped.values())
    secure, replies = train_round(network, secure, server_round=2)
    assert not secure.last_report.aborted
    assert_equals_fedavg(replies, [VICTIM, H2, H3])
