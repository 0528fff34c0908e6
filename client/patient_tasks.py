"""The ClientApp's handlers for `--task patients` (registered in client/client_app.py): aggregates only.

* query.moments: cell count, feature sums and sums of squares, patients per diagnosis of the site's
  training patients (refused below the run's min-metric-examples patients);
* train: the head's arrays in, the locally trained head's arrays out, num-examples = training patients
  (refused below min-metric-examples training patients, or with class counts the site cannot have been
  part of);
* evaluate: the per-class logit histogram of the site's validation patients under the received head
  (withheld, only num-examples sent, below min-metric-examples patients); never a per-patient score;
  answered once per run.

Under secure aggregation (`leuk-server --secure-aggregation`, or required by the site's node config) the
moments and the histogram leave the site only inside a masked round (`train.secagg` with config
patient-stage "moments" or "calibrate", as weighted means: the coordinator sees their sum over the
round's sites, never one site's), each answered once per run; the plain query and evaluate are refused.

The head's standardisation (center, scale) of the run's first train message is remembered in Flower's
per-site state: a later train or evaluate message with another standardisation is refused, so a
coordinator cannot probe the site with crafted heads."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from leukfed.client.policy import site_policy
from leukfed.client.secagg import secagg_required
from leukfed.common.errors import SiteRefusal
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.flower.wire import decode_state, encode_state
from leukfed.common.patient_federated import (HISTOGRAM_KEYS, PATIENT_STAGE, histogram_as_means, histogram_layout,
                                              moments_as_means, zeros)
from leukfed.common.secagg import MESSAGE_TYPE as SECURE_ROUND
from leukfed.common.patient_site import (SitePatients, load_site_patients, require_training_patients,
                                         site_histogram, site_moments, site_train)
from leukfed.common.site import site_dp_settings, suppress_small

PATIENT_STATE = "patient-task"     # this run's record in Flower's per-site state (context.state)
STANDARDISATION = ("center", "scale")
# Most a run's class counts may differ (larger / smaller): beyond it a coordinator can weight one diagnosis
# to almost nothing and read the other diagnosis's patients out of the site's head update.
MAX_CLASS_RATIO = 50


def site_patients(fed: FedConfig, site: SiteConfig) -> SitePatients:
    """The site's patients, split by its own policy (patient-val-fraction, patient-split-seed)."""
    policy = site_policy(site)
    return load_site_patients(fed, site, (policy.patient_val_fraction, policy.patient_split_seed))


def refuse_in_the_clear(context: Context, fed: FedConfig, site: SiteConfig, request: str) -> None:
    """Under secure aggregation (the run's or the site's own requirement) the moments and the histogram
    leave only inside a masked round."""
    if fed.secure_aggregation or secagg_required(context):
        raise SiteRefusal(f"site {site.name} refused the {request} in the clear: this run (or this site) "
                          "requires secure aggregation, which sends it only inside a masked round")


def answer_once(context: Context, site_name: str, request: str) -> None:
    """One answer per run to `request`: a repeated one is refused (two secure sums over different sets of
    sites would give one site's own aggregate by their difference)."""
    record = _record(context)
    if record.get(request):
        raise SiteRefusal(f"site {site_name} refused the {request}: it answers one per run")
    record[request] = True


def moments(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    refuse_in_the_clear(context, fed, site, "moments query")
    data = site_patients(fed, site)
    m = site_moments(data, fed.min_metric_examples, site.name)
    metrics = MetricRecord({"num-examples": data.num_train, "cells": m.cells, "patients-negative": m.patients[0],
                            "patients-positive": m.patients[1]})
    arrays = ArrayRecord({"total": Array(np.ascontiguousarray(m.total)), "squares": Array(np.ascontiguousarray(m.squares))})
    return Message(content=RecordDict({"metrics": metrics, "moments": arrays}), reply_to=msg)


def train(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    if PATIENT_STAGE in msg.content["config"]:
        return secure_stage(msg, context, fed, site, str(msg.content["config"][PATIENT_STAGE]))
    started = time.perf_counter()
    site_dp_settings(fed, site)   # a site that requires DP refuses: the head trains without it
    state = decode_state(msg.content["arrays"])
    check_standardisation(context, state, site.name, "train")
    data = site_patients(fed, site)
    require_training_patients(data, fed.min_metric_examples, site.name, "train request")
    config = msg.content["config"]
    counts = class_counts(config, own_class_counts(data), site.name)
    server_round = config.get("server-round", 1)
    if type(server_round) is not int or not 1 <= server_round <= fed.rounds:
        # past the last round the step size is 0: sites that do not move would leave one site's update alone
        raise SiteRefusal(f"site {site.name} refused the train request: server-round {server_round!r} is not a "
                          f"round of this run (1 to {fed.rounds})")
    state, num = site_train(fed, site, data, state, server_round, counts)
    metrics = MetricRecord({"num-examples": num, "client_seconds": time.perf_counter() - started})
    return Message(content=RecordDict({"metrics": metrics, "arrays": encode_state(state, fed.transfer_dtype)}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    refuse_in_the_clear(context, fed, site, "evaluate request")
    histogram, num = calibration_histogram(msg.content["arrays"], context, fed, site)
    released = {key: [int(v) for v in row] for key, row in zip(HISTOGRAM_KEYS, histogram)} if num else {}
    released = suppress_small(released, num, max(fed.min_metric_examples, 1))
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": num, **released})}), reply_to=msg)


def calibration_histogram(head: ArrayRecord, context: Context, fed: FedConfig,
                          site: SiteConfig) -> tuple[np.ndarray, int]:
    """The validation patients' logit histogram under the run's final head (once per run, with this run's
    standardisation) and how many patients it counts."""
    state = decode_state(head)
    check_standardisation(context, state, site.name, "evaluate", first=False)
    answer_once(context, site.name, "evaluate request")
    return site_histogram(fed, site_patients(fed, site), state)


def secure_stage(msg: Message, context: Context, fed: FedConfig, site: SiteConfig, stage: str) -> Message:
    """The moments or the calibration histogram as weighted means, for the masked vector of a secure round;
    num-examples (the weight) is sent in the clear: the cell count, or the validation patients (below
    min-metric-examples the site adds zeros: its histogram is withheld from the sum)."""
    if msg.metadata.message_type != SECURE_ROUND or stage not in ("moments", "calibrate"):
        raise SiteRefusal(f"site {site.name} refused the {stage[:40]!r} stage: it answers moments and calibration "
                          "only inside a secure-aggregation round")
    if any(np.any(array.numpy() != 0) for array in msg.content["arrays"].values()):
        # the round masks (sums - starting arrays): other sites' starting arrays chosen to clip their share
        # to a known value would leave this site's sums alone in the total
        raise SiteRefusal(f"site {site.name} refused the {stage} stage: its starting arrays are not zeros")
    if stage == "moments":
        answer_once(context, site.name, "moments query")
        data = site_patients(fed, site)
        arrays, weight = moments_as_means(site_moments(data, fed.min_metric_examples, site.name))
        metrics = {"num-examples": weight}
    else:
        histogram, num = calibration_histogram(msg.content["head"], context, fed, site)
        released = num >= max(fed.min_metric_examples, 1)
        arrays = histogram_as_means(histogram, num) if released else zeros(histogram_layout())
        metrics = {"num-examples": num}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                       "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})}),
                   reply_to=msg)


def own_class_counts(data: SitePatients) -> tuple[int, int]:
    """The site's training patients per diagnosis (negative, positive)."""
    _, y = data.side(False)
    counts = np.bincount(y, minlength=2)
    return int(counts[0]), int(counts[1])


def class_counts(config, own: tuple[int, int], site_name: str) -> tuple[int, int] | None:
    """The run's training patients per diagnosis from the train config (None: absent, the site's own are
    used); refused unless whole numbers >= 1, >= the site's own and within MAX_CLASS_RATIO of each other."""
    keys = ("patients-negative", "patients-positive")
    if not any(k in config for k in keys):
        return None
    values = [config.get(k) for k in keys]
    if not all(type(v) is int and v >= max(o, 1) for v, o in zip(values, own)) \
            or max(values) > MAX_CLASS_RATIO * min(values):
        raise SiteRefusal(f"site {site_name} refused the train request: class counts {values[:2]!r} are not whole "
                          f"numbers >= its own {list(own)} within a ratio of {MAX_CLASS_RATIO}")
    return values[0], values[1]


def standardisation_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the head's center and scale as float32."""
    digest = hashlib.sha256()
    for key in STANDARDISATION:
        digest.update(np.ascontiguousarray(state[key].float().numpy()).tobytes())
    return digest.hexdigest()


def _record(context: Context) -> ConfigRecord:
    if PATIENT_STATE not in context.state.config_records:
        context.state[PATIENT_STATE] = ConfigRecord()
    return context.state.config_records[PATIENT_STATE]


def check_standardisation(context: Context, state: dict[str, torch.Tensor], site_name: str, request: str,
                          *, first: bool = True) -> None:
    """Remember the run's first train standardisation (`first`); refuse any other one afterwards."""
    if any(k not in state for k in STANDARDISATION):
        raise SiteRefusal(f"site {site_name} refused the {request} request: the head has no center and scale")
    record, digest = _record(context), standardisation_digest(state)
    if "standardisation" not in record:
        if not first:
            raise SiteRefusal(f"site {site_name} refused the {request} request: no head was trained in this run")
        record["standardisation"] = digest
    elif record["standardisation"] != digest:
        raise SiteRefusal(f"site {site_name} refused the {request} request: the head's center/scale differ "
                          "from this run's first train round")
