"""--task patients attacks by a coordinator or a site: each is played and must fail (review H1-H3, M1-M4, L1-L2).

The site runs the product ClientApp on patient folders copied from apl_aml; its frozen features are
replaced by fixed pseudo-random ones per image (no backbone), so only the protocol is exercised."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from leukfed.client.client_app import app
from leukfed.client.policy import SitePolicy
from leukfed.common import patient_site
from leukfed.common.errors import LeukError
from leukfed.common.fedconfig import FedConfig, SiteConfig
from flwr.supercore.task_identity import TaskIdentity

from leukfed.common.flower.inprocess import QueuedGrid, run_client_app
from leukfed.common.flower.wire import encode_state, unpack_message
from leukfed.common.patient_federated import (BINS, HISTOGRAM_KEYS, PATIENT_STAGE, Moments, initial_head,
                                              moments_layout, zeros)
from leukfed.common.patient_heads import make_head
from leukfed.common.patient_model import evaluate_patient_run, load_patient_model
from leukfed.server.patient_federation import (MAX_PATIENTS, federation_head, read_histogram, read_moments,
                                               released_histograms)
from leukfed.server.reply_checks import frozen_problem
from patient_sites import make_site_folders

RUN_ID, NODE, DIM, CELLS = 7, 1234, 1280, 2
PATIENTS = {"APL": 4, "AML": 6}


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory, data_root: Path) -> Path:
    source = data_root / "apl_aml"
    with (source / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    chosen = [r for d, n in PATIENTS.items() for r in [r for r in rows if r["diagnosis"] == d][:n]]
    folder = tmp_path_factory.mktemp("patient-site") / "site"
    for row in chosen:
        for cell in sorted((source / row["patient"]).rglob("*.jpg"))[:CELLS]:
            target = folder / cell.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cell, target)
    (folder / "patients.csv").write_text("patient,diagnosis\n" + "".join(f"{r['patient']},{r['diagnosis']}\n"
                                                                         for r in chosen))
    return folder


def fake_features(manifest, backbone: str, image_size: int, cache) -> np.ndarray:
    """Fixed features per image path (what the frozen backbone would give), cached nowhere."""
    return np.stack([np.random.default_rng(zlib.crc32(s.path.encode())).normal(size=DIM).astype(np.float32)
                     for s in manifest.samples])


@pytest.fixture(autouse=True)
def no_backbone(monkeypatch):
    monkeypatch.setattr(patient_site, "site_features", fake_features)
    monkeypatch.setattr(patient_site, "_LOADED", {})
    for name, value in (("_task_id", 1), ("_run_id", RUN_ID), ("_node_id", 1)):   # what Flower's runtime sets
        monkeypatch.setattr(TaskIdentity, name, value)


class Site:
    """One site's ClientApp with its own context (its per-site state persists between messages)."""

    def __init__(self, folder: Path, tmp: Path, fed: FedConfig, policy: SitePolicy | None = None, **node) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / "policy.toml"
        path.write_text((policy or SitePolicy(min_metric_examples=1, tasks="patients")).to_toml())
        config = {"data-path": str(folder), "site-name": "h0", "site-policy": str(path),
                  "audit-log": str(tmp / "audit.jsonl"), "image-cache": "", **node}
        self.context = Context(RUN_ID, NODE, config, RecordDict(), fed.to_run_config())
        self.grid = QueuedGrid({NODE: partial(run_client_app, app, context=self.context)}, run_id=RUN_ID)

    def ask(self, message_type: str, arrays: ArrayRecord | None = None, **config) -> Message:
        content = RecordDict({"config": ConfigRecord({"class-names": "AML,APL", **config})})
        if arrays is not None:
            content["arrays"] = arrays
        [reply] = self.grid.send_and_receive([Message(content, dst_node_id=NODE, message_type=message_type)])
        return reply if reply.has_error() else unpack_message(reply)   # as the server's grid reads it


def run(**settings) -> FedConfig:
    return FedConfig(**({"task": "patients", "state_dir": "x", "min_sites": 3, "min_metric_examples": 1,
                         "batch_size": 64, "local_epochs": 1} | settings))


def head_arrays(shift: float = 0.0, scale: float = 1.0) -> ArrayRecord:
    head = make_head("meanprob", DIM)
    head.center.fill_(shift)
    head.scale.fill_(scale)
    return encode_state(head.state_dict())


def refusal(reply: Message) -> str:
    assert reply.has_error(), "the site answered"
    return reply.error.reason


# ---- H2: the run cannot move the site's patient split ---------------------------------------------

def test_runs_with_other_seeds_and_fractions_get_the_same_training_patients_and_moments(site_folder, tmp_path):
    answers = []
    for k, fed in enumerate((run(seed=0, site_val_fraction=0.25), run(seed=9, site_val_fraction=0.3))):
        patient_site._LOADED.clear()
        site = Site(site_folder, tmp_path / str(k), fed)
        reply = site.ask(f"{MessageType.QUERY}.moments")
        assert not reply.has_error(), reply.error.reason
        arrays = reply.content.array_records["moments"]
        split = patient_site.load_site_patients(fed, SiteConfig.from_node_config(site.context.node_config),
                                                (0.25, 0)).val
        answers.append((split, arrays["total"].numpy(), arrays["squares"].numpy(),
                        dict(reply.content.metric_records["metrics"])))
    (split_a, total_a, squares_a, metrics_a), (split_b, total_b, squares_b, metrics_b) = answers
    assert (split_a == split_b).all() and metrics_a == metrics_b
    assert np.array_equal(total_a, total_b) and np.array_equal(squares_a, squares_b)   # no patient's sums to difference


def test_the_split_is_the_sites_policy(site_folder, tmp_path):
    fed = run()
    site = SiteConfig.from_node_config(Site(site_folder, tmp_path, fed).context.node_config)
    assert patient_site.load_site_patients(fed, site, (0.5, 0)).num_val == 5
    assert patient_site.load_site_patients(fed, site, (0.25, 3)).num_val == 3   # round(1) APL + round(1.5) AML
    with pytest.raises(LeukError, match="patient-val-fraction in"):
        SitePolicy(patient_val_fraction=1.0)


# ---- H1: training floor and the coordinator's class counts ---------------------------------------

@pytest.mark.parametrize("counts", [(-(10**9 - 1), 10**9), (10**6, 3), (1, 1), (3.0, 3), ("9", 9)])
def test_crafted_class_counts_are_refused(site_folder, tmp_path, counts):
    site = Site(site_folder, tmp_path, run())
    negative, positive = counts
    reason = refusal(site.ask(MessageType.TRAIN, head_arrays(), **{"patients-negative": negative,
                                                                   "patients-positive": positive}))
    assert "class counts" in reason and "\n" not in reason


def test_plausible_class_counts_train(site_folder, tmp_path):
    site = Site(site_folder, tmp_path, run())
    reply = site.ask(MessageType.TRAIN, head_arrays(), **{"patients-negative": 40, "patients-positive": 20})
    assert not reply.has_error(), reply.error.reason


def test_a_site_below_the_floor_refuses_training_without_a_moments_query(site_folder, tmp_path):
    site = Site(site_folder, tmp_path, run(min_metric_examples=20))   # the site has 7 training patients
    assert "fewer training patients" in refusal(site.ask(MessageType.TRAIN, head_arrays()))


# ---- H3: one standardisation per run, one histogram per run -----------------------------------------

def test_a_second_evaluate_is_refused(site_folder, tmp_path):
    site = Site(site_folder, tmp_path, run())
    assert not site.ask(MessageType.TRAIN, head_arrays()).has_error()
    first = site.ask(MessageType.EVALUATE, head_arrays())
    assert not first.has_error() and first.content.metric_records["metrics"]["num-examples"] == 3
    assert "one per run" in refusal(site.ask(MessageType.EVALUATE, head_arrays()))


def test_a_head_with_another_standardisation_is_refused(site_folder, tmp_path):
    site = Site(site_folder, tmp_path, run())
    assert "no head was trained" in refusal(site.ask(MessageType.EVALUATE, head_arrays()))
    assert not site.ask(MessageType.TRAIN, head_arrays()).has_error()
    assert "center/scale differ" in refusal(site.ask(MessageType.TRAIN, head_arrays(shift=0.5)))
    assert "center/scale differ" in refusal(site.ask(MessageType.EVALUATE, head_arrays(scale=1e-3)))
    assert not site.ask(MessageType.EVALUATE, head_arrays()).has_error()   # the refused probes left no trace


# ---- M4: a site that requires secure aggregation or DP: nothing in the clear, nothing without DP --------

def test_a_site_requiring_dp_refuses_every_patient_request(site_folder, tmp_path):
    """Also in a --secure-aggregation run: the patient task has no DP."""
    for secure in (False, True):
        site = Site(site_folder, tmp_path / str(secure), run(secure_aggregation=secure), **{"dp-budget": 1.0})
        for message_type in (f"{MessageType.QUERY}.moments", MessageType.EVALUATE, MessageType.TRAIN,
                             f"{MessageType.TRAIN}.secagg"):
            assert "no differential privacy" in refusal(site.ask(message_type, head_arrays()))


@pytest.mark.parametrize("node", [{"secure-aggregation": "required"}, {}])
def test_under_secure_aggregation_nothing_is_answered_in_the_clear(site_folder, tmp_path, node):
    """A site that requires secure aggregation refuses a run without it; in a --secure-aggregation run any
    site refuses the moments query, the calibration histogram and training in the clear; a secure stage
    asked outside a masked round (its sums would leave unmasked) is refused in any run."""
    if node:
        site = Site(site_folder, tmp_path / "plain", run(), **node)
        for message_type in (f"{MessageType.QUERY}.moments", MessageType.EVALUATE, MessageType.TRAIN):
            assert "without --secure-aggregation" in refusal(site.ask(message_type, head_arrays()))
    site = Site(site_folder, tmp_path / "secure", run(secure_aggregation=True), **node)
    assert "moments query in the clear" in refusal(site.ask(f"{MessageType.QUERY}.moments"))
    assert "evaluate request in the clear" in refusal(site.ask(MessageType.EVALUATE, head_arrays()))
    assert ("trains only inside masked rounds" if not node else "only takes part in secure") in \
        refusal(site.ask(MessageType.TRAIN, head_arrays()))
    moments_zeros = ArrayRecord({k: Array(v) for k, v in zeros(moments_layout(DIM)).items()})
    reply = site.ask(MessageType.TRAIN, moments_zeros, **{PATIENT_STAGE: "moments"})
    assert ("trains only inside masked rounds" if not node else "only takes part in secure") in refusal(reply)
    if not node:   # a run without secure aggregation: a secure stage asked in the clear
        reply = Site(site_folder, tmp_path / "plain", run()).ask(MessageType.TRAIN, moments_zeros,
                                                                 **{PATIENT_STAGE: "moments"})
        assert "only inside a secure-aggregation round" in refusal(reply)


# ---- M1, M2: hostile replies at the coordinator ----------------------------------------------------

def moments_reply(total, squares, cells=16, negative=3, positive=4) -> Message:
    content = RecordDict({"moments": ArrayRecord({"total": Array(np.asarray(total)), "squares": Array(np.asarray(squares))}),
                          "metrics": MetricRecord({"cells": cells, "patients-negative": negative,
                                                   "patients-positive": positive})})
    return Message(content, dst_node_id=NODE, message_type=f"{MessageType.QUERY}.moments")


@pytest.mark.parametrize("total, squares, counts, problem", [
    (np.array(["a"] * 4), np.ones(4), {}, "floating point"),
    (np.ones(4, dtype=np.int64), np.ones(4), {}, "floating point"),
    (np.ones(4), np.ones(4), {"cells": 10**12}, "counts must be"),
    (np.ones(4), np.ones(4), {"negative": MAX_PATIENTS + 1}, "counts must be"),
    (np.full(4, 1e6), np.ones(4), {}, "sums of squares too small"),
    (np.ones(4), -np.ones(4), {}, "sums of squares too small"),
])
def test_hostile_moments_are_ignored(total, squares, counts: dict, problem: str) -> None:
    moments, why = read_moments(moments_reply(total, squares, **counts), 4)
    assert moments is None and problem in why


def test_consistent_moments_are_read() -> None:
    cells = np.random.default_rng(0).normal(size=(16, 4))
    moments, why = read_moments(moments_reply(cells.sum(0), (cells ** 2).sum(0)), 4)
    assert why == "" and moments.cells == 16 and moments.patients == (3, 4)


def test_overflowing_summed_moments_stop_the_run_in_one_line() -> None:
    big = Moments(1, np.full(DIM, 1.5e308), np.full(DIM, 1.7e308), (1, 1))
    with np.errstate(over="ignore"), pytest.raises(LeukError, match="non-finite center or scale") as caught:
        federation_head("meanprob", big + big, 0)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("count, trained", [(10**9, 10**6), (71, 6), (-1, 6), (True, 6)])
def test_out_of_bounds_histogram_counts_are_ignored(count, trained) -> None:
    entry, why = read_histogram({"num-examples": count}, trained)
    assert entry is None and why


def test_a_histogram_within_bounds_is_read() -> None:
    row = [0] * BINS
    entry, _ = read_histogram({"num-examples": 2, "histogram-negative": [1] + row[1:], "histogram-positive": row[:-1] + [1]}, 6)
    assert entry[0] == 2 and entry[1].sum() == 2


def test_calibration_needs_min_sites_histograms() -> None:
    fed = run(min_sites=3)
    histogram = np.zeros((2, BINS), dtype=np.int64)
    histogram[:, 3] = 1
    with pytest.raises(LeukError, match=r"at least min-sites \(3\) sites; 2 released"):
        released_histograms(fed, {"a": (2, histogram), "b": (2, histogram), "c": (2, None)})
    assert len(released_histograms(fed, {k: (2, histogram) for k in "abc"})) == 3


# ---- M3: a site must not move the standardisation the others are sent --------------------------------

def test_an_update_with_another_standardisation_is_rejected_by_the_server() -> None:
    head = initial_head("meanprob", Moments(16, np.ones(DIM), np.full(DIM, 2.0), (3, 4)), 0)
    frozen = {k: getattr(head, k).numpy().copy() for k in ("center", "scale")}
    assert frozen_problem(encode_state(head.state_dict()), frozen) is None
    for dtype in ("float16", "bfloat16"):
        assert frozen_problem(encode_state(head.state_dict(), dtype), frozen) is None
    moved = {k: v.clone() for k, v in head.state_dict().items()}
    moved["scale"][0] *= 1.01
    assert "differs from the value the server sent" in frozen_problem(encode_state(moved), frozen)
    moved = {k: v.clone() for k, v in head.state_dict().items()}
    moved["center"] = moved["center"].double()
    assert frozen_problem(encode_state(moved), frozen)


# ---- L1: no image cache, no feature file ------------------------------------------------------------

def test_a_site_without_an_image_cache_keeps_features_in_memory(tmp_path) -> None:
    site = SiteConfig.from_node_config({"site-name": "h0", "image-cache": "", "audit-log": str(tmp_path / "a.jsonl")})
    assert patient_site.feature_cache_file(site, "efficientnet_lite0", 160) is None
    cached = SiteConfig.from_node_config({"site-name": "h0", "image-cache": str(tmp_path / "cache")})
    assert patient_site.feature_cache_file(cached, "efficientnet_lite0", 160).parent == tmp_path / "cache"


# ---- H1: secure aggregation hides each site's head update ------------------------------------------

SECURE_SITES = {2000 + 31 * k: f"h{k}" for k in range(3)}   # node id -> site name; 2 APL + 3 AML each
HEAD_KEYS = {"linear.weight", "linear.bias", "center", "scale"}


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory, data_root: Path) -> dict[str, Path]:
    """Three sites' own patient folders (2 APL, 3 AML patients, CELLS cells each)."""
    return make_site_folders(data_root / "apl_aml", tmp_path_factory.mktemp("patient-sites"),
                             {name: (2, 3) for name in SECURE_SITES.values()}, CELLS)


def federation_sites(root: Path, folders: dict[str, Path], secure: bool, **settings) -> tuple[FedConfig, QueuedGrid]:
    """Three product ClientApps (signed site keys) on their own patient folders, and the run's settings;
    the grid's `received` holds every reply the coordinator gets."""
    from leukfed.client.client_app import app
    from leukfed.server.certs import init_certs

    certs = init_certs(root / "certs", ["localhost"], list(SECURE_SITES.values()))
    fed = run(state_dir=str(root / "state"), rounds=3, local_epochs=2, lr=0.1, round_timeout=60,
              secure_aggregation=secure,
              registered_sites=",".join(f"{name}={node}" for node, name in SECURE_SITES.items()), **settings)
    policy = root / "policy.toml"
    policy.write_text(SitePolicy(min_metric_examples=1, tasks="patients", patient_val_fraction=0.4).to_toml())
    contexts = {node: Context(RUN_ID, node, {"data-path": str(folders[name]), "site-name": name, "image-cache": "",
                                             "site-policy": str(policy), "site-key": str(certs.site(name).private_key),
                                             "peer-keys": str(certs.root / "sites")}, RecordDict(), fed.to_run_config())
                for node, name in SECURE_SITES.items()}
    return fed, QueuedGrid({n: partial(run_client_app, app, context=c) for n, c in contexts.items()}, run_id=RUN_ID)


def patient_federation(root: Path, folders: dict[str, Path], secure: bool, **settings) -> tuple[Path, QueuedGrid]:
    """The product ServerApp's `--task patients` over `federation_sites`; returns (state dir, the grid)."""
    from leukfed.server import patient_federation as federation, server_app

    fed, grid = federation_sites(root, folders, secure, **settings)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module in (server_app, federation):
            monkeypatch.setattr(module, "log", lambda line: None)
        server_app.main(grid, Context(RUN_ID, 0, {}, RecordDict(), fed.to_run_config()))
    return Path(fed.state_dir), grid


def clear_sums(reply: Message) -> set[str]:
    """The moments and histogram a reply shows the coordinator in the clear."""
    if reply.has_error():
        return set()
    content = unpack_message(reply).content
    shown = {key for record in content.array_records.values() for key in record} & {"total", "squares", "mean",
                                                                                  "meansq", "histogram"}
    metrics = {key for record in content.metric_records.values() for key in record}
    return shown | (metrics & {*HISTOGRAM_KEYS, "patients-negative", "patients-positive"})


def clear_head_arrays(reply: Message) -> set[str]:
    """The head's arrays a reply shows the coordinator (unpacked as the server's grid reads it)."""
    if reply.has_error():
        return set()
    return {key for record in unpack_message(reply).content.array_records.values() for key in record} & HEAD_KEYS


def test_secure_aggregation_masks_every_head_update_and_trains_the_same_head(site_folders, tmp_path):
    """A curious coordinator reads each site's head update from its replies: in the clear it can, with
    --secure-aggregation every head-round reply is a masked vector and the head is the plain run's."""
    from leukfed.common.secagg import MASKED, MESSAGE_TYPE

    plain_state, plain = patient_federation(tmp_path / "plain", site_folders, secure=False)
    secure_state, secure = patient_federation(tmp_path / "secure", site_folders, secure=True)
    assert sum(1 for r in plain.received if clear_head_arrays(r) == HEAD_KEYS) == 9   # the attack in the clear
    rounds = [r for r in secure.received if r.metadata.message_type == MESSAGE_TYPE]
    masked = [r for r in rounds if MASKED in r.content.array_records]
    # moments, 3 head rounds, calibration: 5 masked rounds x 3 sites, none failed
    assert len(masked) == 15 and not any(r.has_error() for r in rounds)
    assert sum(1 for r in plain.received if clear_sums(r)) == 6   # moments and histograms, each site alone
    assert not any(clear_sums(r) for r in secure.received), "a site's moments or histogram reached the coordinator"
    assert all(set(r.content.array_records[MASKED]) == {"vector"} and
               r.content.array_records[MASKED]["vector"].dtype == "uint64" for r in masked)
    assert not any(clear_head_arrays(r) for r in secure.received), "a head update reached the coordinator"
    assert not any(r.metadata.message_type == MessageType.TRAIN for r in secure.received)
    rows = json.loads((secure_state / "history.json").read_text())
    assert [r["secure_aggregation"]["masked"] for r in rows] == [sorted(SECURE_SITES)] * 3
    assert all(r["sites_replied"] == 3 and not r["rejected"] for r in rows)   # the guard's frozen check held
    heads = [load_patient_model(s / "patient-model") for s in (plain_state, secure_state)]
    assert heads[1].description["federation"]["secure_aggregation"] is True
    assert "only masked" in (secure_state / "patient-model" / "MODEL_CARD.md").read_text()
    plain_head, secure_head = (m.heads[0].state_dict() for m in heads)
    for key in ("center", "scale"):   # from sums through fixed point: equal in float32 up to rounding
        assert torch.allclose(plain_head[key], secure_head[key], rtol=1e-6, atol=1e-7), key
    plain_model, secure_model = (m.description for m in heads)
    assert (plain_model["threshold"], plain_model["validation"]) == (secure_model["threshold"], secure_model["validation"])
    assert secure_model["temperature"] == pytest.approx(plain_model["temperature"], rel=1e-6)
    assert {s["train"] for s in secure_model["federation"]["sites"].values()} == {None}   # only their sum was seen
    for key in ("linear.weight", "linear.bias"):   # fixed point (2^-bits) and float64 sums: ~1e-8 apart, not equal
        assert torch.allclose(plain_head[key], secure_head[key], rtol=0, atol=1e-6), key
    scored = evaluate_patient_run(secure_state / "patient-model", site_folders["h1"])
    assert scored["num_patients"] == 5


def test_a_train_request_outside_the_runs_rounds_is_refused(site_folder, tmp_path):
    """Past the last round the step size is 0: sites that do not move would leave one site's update alone."""
    site = Site(site_folder, tmp_path, run(rounds=3))
    for bad in (4, 0, "2", 2.0):
        assert "is not a round of this run" in refusal(site.ask(MessageType.TRAIN, head_arrays(), **{"server-round": bad}))
    assert not site.ask(MessageType.TRAIN, head_arrays(), **{"server-round": 3}).has_error()


def test_secure_stages_that_do_not_start_from_zeros_are_refused(site_folders, tmp_path):
    """The attack of the review: starting arrays of -1e9 clip every other site's share to a known +1024,
    leaving one site's sums alone in the total. Every site refuses a secure stage that does not start from
    zeros (and the digest all sites sign keeps the coordinator from sending them different ones)."""
    from leukfed.server import server_app

    fed, grid = federation_sites(tmp_path, site_folders, secure=True)
    train_grid = server_app.training_grid(grid, fed)
    layout = moments_layout(DIM)
    messages = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v - 1e9) for k, v in zeros(layout).items()}),
                                    "config": ConfigRecord({"class-names": "AML,APL", PATIENT_STAGE: "moments"})}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for node in SECURE_SITES]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(server_app, "log", lambda line: None)
        replies = list(train_grid.send_and_receive(messages, timeout=60))
    assert all(r.has_error() for r in replies) and train_grid.last_report.aborted
    assert all("starting arrays are not zeros" in why for why in train_grid.last_report.dropped.values())


def test_a_second_secure_moments_round_is_refused(site_folders, tmp_path):
    """Two secure sums over different sets of sites would give one site's moments by their difference: each
    site answers one moments round per run, so the coordinator's second round (without h2) fails."""
    from leukfed.server import patient_federation as federation, server_app
    from leukfed.server.registered_sites import RegisteredSites

    fed, grid = federation_sites(tmp_path, site_folders, secure=True)
    sites = RegisteredSites.parse(fed.registered_sites)
    train_grid = server_app.training_grid(grid, fed)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module in (server_app, federation):
            monkeypatch.setattr(module, "log", lambda line: None)
        total, trained = federation.secure_moments(grid, train_grid, fed, sites, DIM, {"class-names": "AML,APL"})
        assert sorted(trained) == ["h0", "h1", "h2"] and total.patients == (6, 3)   # 3 + 2 per site, 40 % held out
        two = sites.grid(grid)
        two.get_node_ids = lambda: sorted(SECURE_SITES)[:2]
        with pytest.raises(LeukError, match="secure moments round failed"):
            federation.secure_moments(two, train_grid, dataclasses.replace(fed, min_sites=2), sites, DIM,
                                      {"class-names": "AML,APL"})
    refusals = [r.error.reason for r in grid.received if r.has_error()]
    assert sum("answers one per run" in reason for reason in refusals) == 2


def test_sites_below_the_floor_add_no_histogram_to_the_secure_sum(site_folders, tmp_path):
    """Each site holds 2 validation patients, the run's floor is 3: every site adds zeros (only its count
    shows), so no histogram is summed and calibration stops in one line instead of exporting."""
    from leukfed.common.secagg import MASKED
    from leukfed.server import patient_federation as federation, server_app

    fed, grid = federation_sites(tmp_path, site_folders, secure=True, min_metric_examples=3)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for module in (server_app, federation):
            monkeypatch.setattr(module, "log", lambda line: None)
        with pytest.raises(LeukError, match=r"at least min-sites \(3\) sites; 0 released"):
            server_app.main(grid, Context(RUN_ID, 0, {}, RecordDict(), fed.to_run_config()))
    calibration = [r for r in grid.received[-12:] if MASKED in r.content.array_records]   # the last round's
    assert [r.content["metrics"]["num-examples"] for r in calibration[-3:]] == [2, 2, 2]
    assert not (Path(fed.state_dir) / "patient-model").exists()
