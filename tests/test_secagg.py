"""Secure aggregation: the server sees only masked vectors and their sum, dropouts are survived.

Most tests run the real protocol in-process: Flower's Message-API FedAvg (wrapped in leukfed's
ReplyGuard) drives a SecureAggregationGrid (server half) over a grid that serialises every message
to protobuf and back (as on the wire) and hands it to a real ClientApp calling `secure_train` (site
half) with per-node Contexts whose node configs carry real site keys from `leuk certs` (signed round
keys, as in deployment). One slow test runs a fixture app on Flower's simulation engine (unsigned,
as simulations run) with a site dropping mid-round.
"""
from __future__ import annotations

import json
import subprocess
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from leukfed.common.flower.inprocess import InProcessGrid, run_client_app
from leukfed.common.flower.wire import record_digest
from leukfed.client.secagg import refuse_plain_training, secure_train
from leukfed.common import secagg as core
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import COMPATIBLE_STRATEGIES
from leukfed.common.secagg import (
    MASKED,
    MESSAGE_TYPE,
    RECORD,
    STATE,
    SecAggSettings,
    check_secagg_strategy,
    combine_shares,
    create_shares,
    decode_site_arrays,
    quantize_update,
    scale_bits,
    self_mask,
)
from leukfed.server import secagg
from leukfed.server.certs import init_certs
from leukfed.server.secagg import SecureAggregationGrid

SECAGG_APP = Path(__file__).parent / "fixtures" / "secagg_app"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps the run id on every Message it builds; the ServerApp process sets it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


IDENTITIES: dict[int, dict[str, str]] = {}   # node id -> node config with the site's real keys


@pytest.fixture(autouse=True, scope="module")
def site_keys(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One key pair per site from `leuk certs init`; every site pins the whole `sites/` folder."""
    certs = init_certs(tmp_path_factory.mktemp("certs"), ["localhost"], [f"h{i}" for i in range(len(NODES))])
    for i, nid in enumerate(NODES):
        IDENTITIES[nid] = {"site-name": f"h{i}", "site-key": str(certs.site(f"h{i}").private_key),
                           "peer-keys": str(certs.root / "sites")}


# --------------------------------------------------------------------------------------------
# An in-process federation: real ClientApp, real Contexts, protobuf on the "wire"
# --------------------------------------------------------------------------------------------

def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=5).astype(np.float32),
            "bn.running_var": np.ones(8, np.float32) * 2.0,
            "bn.num_batches_tracked": np.array(4, np.int64)}


class Site:
    """One hospital: a fixed update and example count, optionally sent in half precision."""

    def __init__(self, index: int, transfer: str = "float32") -> None:
        rng = np.random.default_rng(100 + index)
        self.weight = int(rng.integers(20, 400))
        self.delta = {k: (rng.normal(scale=0.05, size=v.shape) if v.dtype.kind == "f" else np.array(index + 1))
                      for k, v in initial_arrays().items()}
        self.transfer = transfer
        self.sent: dict[str, np.ndarray] = {}   # what its train function returned, decoded
        self.audited: tuple[str, dict] | None = None   # what secure_train's on_masked hook reported

    def train(self, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        record = ArrayRecord()
        for key, value in arrays.items():
            new = np.asarray(value + self.delta[key]).astype(value.dtype)
            if value.dtype.kind == "f" and self.transfer == "float16":
                record[key] = Array(new.astype(np.float16))
            elif value.dtype.kind == "f" and self.transfer == "bfloat16":
                bits = (new.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
                record[key + "::bf16"] = Array(np.asarray(bits))
            else:
                record[key] = Array(np.asarray(new))
        self.sent = decode_site_arrays(record)
        return record


def make_client_app(sites: dict[int, Site], faults: dict[int, str]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        refuse_plain_training(msg, context)
        nid = msg.metadata.dst_node_id
        if faults.get(nid) == "mask-error":
            raise RuntimeError("site crashed while training")
        site = sites[nid]
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        content = RecordDict({"arrays": site.train(arrays),
                              "metrics": MetricRecord({"num-examples": site.weight, "train_loss": 0.5 + nid % 7})})
        return Message(content, reply_to=msg)

    @app.train("secagg")
    def train_secagg(msg: Message, context: Context) -> Message:
        def audit(sent: ArrayRecord, metrics: dict) -> None:
            sites[msg.metadata.dst_node_id].audited = (record_digest(sent), metrics)
        return secure_train(msg, context, train, on_masked=audit)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval_accuracy": 0.5})}),
                       reply_to=msg)

    return app


class WireGrid(InProcessGrid):
    """Delivers messages to in-process sites; `faults[nid]` = "<stage>-silent" loses its reply there."""

    def __init__(self, sites: dict[int, Site], faults: dict[int, str] | None = None,
                 node_config: dict | None = None, tamper=None) -> None:
        self.faults = faults or {}
        self.app = make_client_app(sites, self.faults)
        self.contexts = {n: Context(7, n, {**IDENTITIES[n], **(node_config or {})}, RecordDict(), {}) for n in sites}
        self.seeds: dict[int, bytes] = {}        # each site's self-mask seed (test-only peek)
        self.tamper = tamper
        super().__init__({n: partial(run_client_app, self.app, context=self.contexts[n]) for n in sites}, run_id=7)

    def deliver(self, message: Message) -> Message | None:
        nid = message.metadata.dst_node_id
        cfg = message.content.config_records.get(RECORD)
        stage = cfg["stage"] if cfg is not None else "plain"
        if self.tamper is not None and cfg is not None:
            self.tamper(stage, cfg)
        reply = super().deliver(message)
        state = self.contexts[nid].state.config_records.get(STATE)
        if state is not None and "seed" in state:
            self.seeds[nid] = bytes(state["seed"])
        return None if self.faults.get(nid) == f"{stage}-silent" else reply


def fedavg(sites: dict[int, Site], members) -> dict[str, np.ndarray]:
    """Plain FedAvg of what the given sites' train functions returned."""
    total = sum(sites[n].weight for n in members)
    return {k: sum(sites[n].weight * sites[n].sent[k].astype(np.float64) for n in members) / total
            for k in initial_arrays()}


def run_round(sites, faults=None, strategy=None, **grid_kwargs):
    from leukfed.common.fedconfig import FedConfig
    from leukfed.server.strategies import make_strategy

    wire_grid = WireGrid(sites, faults, **grid_kwargs)
    secure = SecureAggregationGrid(wire_grid, SecAggSettings())
    strategy = strategy or make_strategy(FedConfig(min_sites=len(sites)))
    result = strategy.start(grid=secure, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_arrays().items()}),
                            num_rounds=1, timeout=30, train_config=None)
    return result, secure, wire_grid, strategy


NODES = [17, 2**64 - 59, 123456789012345678, 99]   # Flower node ids are 64-bit


def federation(n: int = 4, transfers=("float32", "float16", "bfloat16", "float32")) -> dict[int, Site]:
    return {nid: Site(i, transfers[i % len(transfers)]) for i, nid in enumerate(NODES[:n])}


# --------------------------------------------------------------------------------------------
# Correctness and what the server sees
# --------------------------------------------------------------------------------------------

def test_secure_sum_equals_fedavg_and_server_sees_only_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = []
    real_dequantize = secagg.dequantize_sum

    def spy(total, old, bits):
        sums.append(total.copy())
        return real_dequantize(total, old, bits)

    monkeypatch.setattr(secagg, "dequantize_sum", spy)
    sites = federation()
    t0 = time.perf_counter()
    result, secure, wire_grid, strategy = run_round(sites)
    seconds = time.perf_counter() - t0
    report = secure.last_report
    assert report.masked == sorted(sites) and not report.dropped and not report.aborted
    expected = fedavg(sites, sites)
    for key, value in expected.items():
        got = result.arrays[key].numpy()
        if key == "bn.num_batches_tracked":
            assert np.array_equal(got, np.rint(value))
        else:
            assert np.abs(got - value).max() < 1e-6, key
    # The ReplyGuard saw one (identical, aggregated) update per site and the sites' clear metrics.
    assert sorted(strategy.log.train) == sorted(sites) and not strategy.log.rejected

    # No reply from any site carried the raw update; each masked vector looks nothing like it,
    # even after removing the self mask the server legitimately learns.
    bits = scale_bits(len(sites), SecAggSettings().clip, SecAggSettings().max_examples)
    received = [r for r in wire_grid.received if r.has_content()]
    masked = [r for r in received if MASKED in r.content.array_records]
    assert len(masked) == len(sites)
    for reply in received:
        assert set(reply.content.array_records) <= {MASKED}
    quantized = {}
    for reply in masked:
        nid = reply.metadata.src_node_id
        q, _ = quantize_update(sites[nid].sent, initial_arrays(), sites[nid].weight, SecAggSettings().clip, bits)
        quantized[nid] = q.view(np.uint64)
        vector = reply.content[MASKED]["vector"].numpy()
        assert np.mean(vector == quantized[nid]) < 0.01
        without_self_mask = vector - self_mask(wire_grid.seeds[nid], report.ctx, nid, vector.size)
        assert np.mean(without_self_mask == quantized[nid]) < 0.01
    # The only unmasked quantity the server computed is the exact sum of the quantised updates.
    assert len(sums) == 1
    assert np.array_equal(sums[0], np.sum(np.stack(list(quantized.values())), axis=0, dtype=np.uint64))
    assert seconds < 10
    # The site's audit hook saw exactly what left it: the masked vector and the clear metrics.
    for reply in masked:
        nid = reply.metadata.src_node_id
        digest, metrics = sites[nid].audited
        assert digest == record_digest(reply.content[MASKED]) and metrics == dict(reply.content["metrics"])
    # Every round key the server relayed was signed by a named site.
    assert report.names == {nid: f"h{NODES.index(nid)}" for nid in sites}


@pytest.mark.parametrize("stage", ["setup-silent", "share-keys-silent", "mask-error", "mask-silent", "unmask-silent"])
def test_one_site_dropping_at_any_stage_still_completes(stage: str) -> None:
    sites = federation()
    dropper = NODES[1]
    result, secure, _, strategy = run_round(sites, {dropper: stage})
    report = secure.last_report
    assert not report.aborted, report.summary()
    contributors = [n for n in sites if n != dropper] if stage != "unmask-silent" else list(sites)
    assert report.masked == sorted(contributors)
    expected = fedavg(sites, contributors)
    assert np.abs(result.arrays["conv.weight"].numpy() - expected["conv.weight"]).max() < 1e-6
    if stage != "unmask-silent":
        assert dropper in report.dropped and stage.split("-silent")[0].split("-error")[0] in report.dropped[dropper]
        assert any(f["node"] == dropper for f in strategy.log.failures)


@pytest.mark.parametrize("name", COMPATIBLE_STRATEGIES)
def test_compatible_strategies_give_the_plain_result(name: str) -> None:
    """Same sites, same strategy: secure and plain rounds give the same global model."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.server.strategies import make_strategy

    sites = federation()
    secure_result, _, _, _ = run_round(sites, strategy=make_strategy(FedConfig(strategy=name, min_sites=4)))
    plain_result = make_strategy(FedConfig(strategy=name, min_sites=4)).start(
        grid=WireGrid(sites), initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_arrays().items()}),
        num_rounds=1, timeout=30)
    for key in initial_arrays():
        secure, plain = secure_result.arrays[key].numpy(), plain_result.arrays[key].numpy()
        assert secure.dtype == plain.dtype and np.abs(secure.astype(float) - plain.astype(float)).max() < 1e-5, key


def test_dropout_after_masking_in_a_three_site_federation() -> None:
    """Fewest sites that can lose one: threshold 2 of 3; the dropped site's pairwise masks are rebuilt."""
    sites = federation(3)
    result, secure, _, _ = run_round(sites, {NODES[2]: "mask-error"})
    report = secure.last_report
    assert report.threshold == 2 and report.masked == sorted(NODES[:2]) and report.total_examples == \
        sites[NODES[0]].weight + sites[NODES[1]].weight
    expected = fedavg(sites, NODES[:2])
    assert np.abs(result.arrays["fc.bias"].numpy() - expected["fc.bias"]).max() < 1e-6


def test_too_many_dropouts_abort_without_changing_the_model() -> None:
    sites = federation(3)
    result, secure, _, strategy = run_round(sites, {NODES[1]: "mask-error", NODES[2]: "mask-silent"})
    report = secure.last_report
    assert "threshold" in report.aborted
    assert len(result.arrays) == 0                      # strategy.start: no new arrays this round
    assert len(strategy.log.failures) == 3


def test_sites_refuse_to_reveal_both_secrets_of_one_site() -> None:
    def claim_everyone_dropped(stage, cfg):
        if stage == "unmask":
            cfg["dropped"] = cfg["survivors"]

    sites = federation(3)
    _, secure, _, _ = run_round(sites, tamper=claim_everyone_dropped)
    report = secure.last_report
    assert report.aborted and report.unmasked == []
    assert all("refused" in why for why in report.dropped.values())


def test_sites_reject_altered_keys_and_out_of_order_stages() -> None:
    def swap_keys(stage, cfg):
        if stage == "share-keys":
            cfg["pk-s"] = list(reversed(cfg["pk-s"]))

    _, secure, _, _ = run_round(federation(3), tamper=swap_keys)
    assert secure.last_report.aborted
    assert any("altered" in why for why in secure.last_report.dropped.values())

    context = Context(7, 5, {}, RecordDict(), {})
    message = Message(RecordDict({RECORD: ConfigRecord({"stage": "mask", "round": "x"})}),
                      dst_node_id=5, message_type=MESSAGE_TYPE)
    with pytest.raises(LeukError, match="out of order"):
        secure_train(message, context, lambda m, c: m)


def test_site_requiring_secure_aggregation_refuses_plain_training() -> None:
    sites = federation(3)
    wire_grid = WireGrid(sites, node_config={"secure-aggregation": "required"})
    result = FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3).start(
        grid=wire_grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_arrays().items()}),
        num_rounds=1, timeout=10)
    assert len(result.arrays) == 0
    assert all(r.has_error() and "secure-aggregation" in r.error.reason for r in wire_grid.received)
    # ... and takes part in secure rounds.
    _, secure, _, _ = run_round(sites, node_config={"secure-aggregation": "required"})
    assert not secure.last_report.aborted


def test_quantisation_clips_and_refuses_nan() -> None:
    old = {"a": np.zeros(4, np.float32)}
    q, clipped = quantize_update({"a": np.array([0.5, -3000.0, 2000.0, 0.0], np.float32)}, old, 3, 1024.0, 20)
    assert clipped == 2 and q[-1] == 3 and q[1] == -1024 * 3 * 2**20
    with pytest.raises(LeukError, match="NaN"):
        quantize_update({"a": np.array([np.nan, 0, 0, 0], np.float32)}, old, 3, 1024.0, 20)
    with pytest.raises(LeukError, match="missing"):
        quantize_update({"b": np.zeros(4)}, old, 3, 1024.0, 20)


def test_simulated_sites_run_unsigned_and_deployed_sites_without_keys_refuse() -> None:
    """Without a site key only a simulation (a partition id) takes part, with unsigned keys."""
    sites = federation(3)
    simulated = {"site-key": "", "peer-keys": ""}
    wire_grid = WireGrid(sites, node_config=simulated)
    for i, nid in enumerate(sites):
        wire_grid.contexts[nid].node_config["partition-id"] = i
    secure = SecureAggregationGrid(wire_grid, SecAggSettings())
    from leukfed.common.fedconfig import FedConfig
    from leukfed.server.strategies import make_strategy

    result = make_strategy(FedConfig(min_sites=3)).start(
        grid=secure, initial_arrays=ArrayRecord({k: Array(v) for k, v in initial_arrays().items()}),
        num_rounds=1, timeout=30)
    assert not secure.last_report.aborted
    assert np.abs(result.arrays["fc.bias"].numpy() - fedavg(sites, sites)["fc.bias"]).max() < 1e-6

    _, secure, wire_grid, _ = run_round(federation(3), node_config=simulated)
    assert secure.last_report.aborted and secure.last_report.keys == []
    assert all("no site key" in why for why in secure.last_report.dropped.values())
    assert not any(MASKED in r.content.array_records for r in wire_grid.received if r.has_content())


def test_shamir_shares_rebuild_from_any_threshold_subset() -> None:
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    assert combine_shares(shares[:3]) == combine_shares(shares[2:]) == combine_shares(shares) == secret
    assert combine_shares(shares[:2]) != secret
    assert MESSAGE_TYPE == f"{MessageType.TRAIN}.secagg" and core.RECORD == RECORD


def test_robust_strategies_are_refused() -> None:
    for name in COMPATIBLE_STRATEGIES:
        check_secagg_strategy(name)
    for name in ("fedmedian", "fedtrimmedavg", "krum"):
        with pytest.raises(LeukError, match="only their sum"):
            check_secagg_strategy(name)


def test_plain_evaluate_and_query_pass_through() -> None:
    class Recorder(WireGrid):
        def send_and_receive(self, messages, *, timeout=None):
            self.passed = list(messages)
            return []

    recorder = Recorder(federation(2))
    secure = SecureAggregationGrid(recorder)
    message = Message(RecordDict(), dst_node_id=NODES[0], message_type=MessageType.EVALUATE)
    assert list(secure.send_and_receive([message], timeout=1)) == []
    assert recorder.passed[0].metadata.message_type == MessageType.EVALUATE


# --------------------------------------------------------------------------------------------
# On Flower's simulation engine
# --------------------------------------------------------------------------------------------

def _run_fixture_app(app_dir: Path, work: Path, num_sites: int) -> tuple[str, str]:
    """Submit `app_dir` to a private simulation SuperLink; return (status, ServerApp log)."""
    from leukfed.common.flower.env import flower_env, flower_executable, free_port
    from leukfed.common.flower.processes import kill_process_group, strip_ansi

    home = work / "flwr-home"
    home.mkdir(parents=True)
    http_port, control_port = free_port(), free_port()
    env = flower_env(home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)})
    options = {"num-supernodes": num_sites, "backend": {"client-resources": {"num-cpus": 1, "num-gpus": 0.0}}}
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "sim", "sim": {"address": ":local:", "options": options}}}))
    superlink = subprocess.Popen(
        [flower_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
         "--database", str(work / "superlink.db"), "--disable-runtime-dependency-installation"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    flwr = flower_executable("flwr")
    try:
        deadline = time.monotonic() + 120
        while True:
            submitted = subprocess.run([flwr, "run", str(app_dir), "sim", "--format", "json"], env=env, check=False,
                                       capture_output=True, text=True, timeout=120)
            try:
                run_id = json.loads(submitted.stdout)["run-id"]
                break
            except (json.JSONDecodeError, KeyError):
                if time.monotonic() > deadline:
                    raise AssertionError(submitted.stdout + submitted.stderr) from None
                time.sleep(1)
        status = "unknown"
        while time.monotonic() < deadline + 60:
            listed = subprocess.run([flwr, "ls", "--run-id", str(run_id), "sim", "--format", "json"], env=env,
                                    check=False, capture_output=True, text=True, timeout=60)
            try:
                status = json.loads(listed.stdout)["runs"][0]["status"]
            except (json.JSONDecodeError, KeyError, IndexError):
                status = "unknown"
            if status.startswith("finished"):
                break
            time.sleep(1)
        log = subprocess.run([flwr, "log", str(run_id), "sim", "--show"], env=env, check=False,
                             capture_output=True, text=True, timeout=60)
        return status, strip_ansi(log.stdout + log.stderr)
    finally:
        kill_process_group(superlink, 10)


@pytest.mark.slow
def test_secure_aggregation_on_the_simulation_engine_with_a_site_dropping(tmp_path: Path) -> None:
    t0 = time.monotonic()
    status, log = _run_fixture_app(SECAGG_APP, tmp_path, num_sites=3)
    seconds = time.monotonic() - t0
    assert status == "finished:completed", log[-3000:]
    assert "SECAGG OK 2 rounds" in log, log[-3000:]
    assert "SECAGG CHECK round 1: partitions [0, 1] dropped 1" in log, log[-3000:]
    assert "SECAGG CHECK round 2: partitions [0, 1, 2] dropped 0" in log, log[-3000:]
    assert "site 2 drops after the key exchange" in log or "dropped at mask" in log
    print("\n".join(line for line in log.splitlines() if "SECAGG" in line))
    print(f"simulation with secure aggregation: {seconds:.1f}s")
