"""The ClientApp's handlers for `--task patients` (registered in client/client_app.py): aggregates only.

* query.moments: cell count, feature sums and sums of squares, patients per diagnosis of the site's
  training patients (refused below the run's min-metric-examples patients);
* train: the head's arrays in, the locally trained head's arrays out, num-examples = training patients;
* evaluate: the per-class logit histogram of the site's validation patients under the received head
  (withheld, only num-examples sent, below min-metric-examples patients); never a per-patient score."""
from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.flower.wire import decode_state, encode_state
from leukfed.common.patient_site import load_site_patients, site_histogram, site_moments, site_train
from leukfed.common.site import site_dp_settings, suppress_small

HISTOGRAM_KEYS = ("histogram-negative", "histogram-positive")


def moments(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    data = load_site_patients(fed, site)
    m = site_moments(data, fed.min_metric_examples, site.name)
    metrics = MetricRecord({"num-examples": data.num_train, "cells": m.cells, "patients-negative": m.patients[0],
                            "patients-positive": m.patients[1]})
    arrays = ArrayRecord({"total": Array(np.ascontiguousarray(m.total)), "squares": Array(np.ascontiguousarray(m.squares))})
    return Message(content=RecordDict({"metrics": metrics, "moments": arrays}), reply_to=msg)


def train(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    started = time.perf_counter()
    site_dp_settings(fed, site)   # a site that requires DP refuses: the head trains without it
    data = load_site_patients(fed, site)
    config = msg.content["config"]
    counts = (int(config["patients-negative"]), int(config["patients-positive"])) \
        if "patients-negative" in config and "patients-positive" in config else None
    state, num = site_train(fed, site, data, decode_state(msg.content["arrays"]), int(config.get("server-round", 1)),
                            counts)
    metrics = MetricRecord({"num-examples": num, "client_seconds": time.perf_counter() - started})
    return Message(content=RecordDict({"metrics": metrics, "arrays": encode_state(state, fed.transfer_dtype)}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context, fed: FedConfig, site: SiteConfig) -> Message:
    data = load_site_patients(fed, site)
    histogram, num = site_histogram(fed, data, decode_state(msg.content["arrays"]))
    released = {key: [int(v) for v in row] for key, row in zip(HISTOGRAM_KEYS, histogram)} if num else {}
    released = suppress_small(released, num, max(fed.min_metric_examples, 1))
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": num, **released})}), reply_to=msg)
