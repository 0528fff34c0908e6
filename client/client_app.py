"""Flower ClientApp: unpack a message, call the site's training functions, pack the reply."""
from __future__ import annotations

import dataclasses
import time

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from leukfed.client.audit import append_audit
from leukfed.common.flower.wire import decode_state, encode_state, packed_arrays_mod
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.common.privacy import BudgetSpent
from leukfed.server.secagg import refuse_plain_training, secure_train
from leukfed.common.site import (load_site_data, local_evaluate, local_train, site_class_names, site_model,
                                 suppress_small)

app = ClientApp(mods=[packed_arrays_mod])


def _settings(context: Context, msg: Message | None = None) -> tuple[FedConfig, SiteConfig]:
    """Run-wide settings (with the class list the server fixed for this run) and this site's facts."""
    fed = FedConfig.from_run_config(context.run_config)
    if msg is not None and "config" in msg.content.config_records:
        classes = msg.content["config"].get("class-names")
        if classes:
            fed = dataclasses.replace(fed, class_names=str(classes))
    return fed, SiteConfig.from_node_config(context.node_config)


def _reply(msg: Message, fed: FedConfig, site: SiteConfig, *, kind: str, num_examples: int,
           metrics: dict[str, float], arrays=None, started: float) -> Message:
    released = suppress_small(metrics, num_examples, fed.min_metric_examples)
    privacy = {k: v for k, v in metrics.items() if k.startswith("dp_")}  # the guarantee, not data: always sent
    metric_record = MetricRecord({"num-examples": num_examples, **released, **privacy,
                                  "client_seconds": time.perf_counter() - started})
    content = RecordDict({"metrics": metric_record})
    if arrays is not None:
        content["arrays"] = arrays
    append_audit(site, msg, kind=kind, metrics=dict(metric_record), sent=arrays)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    refuse_plain_training(msg, context)  # node config secure-aggregation="required": never in the clear
    started = time.perf_counter()
    fed, site = _settings(context, msg)
    data = load_site_data(fed, site)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1)) + int(config.get("round-offset", 0))
    state = decode_state(msg.content["arrays"])
    model = site_model(fed, site, data, state)
    # The server asks for the previous round's scores here rather than in a message of their own.
    scores = score_first(fed, site, data, state, model) if config.get("evaluate-first") else {}
    try:
        result = local_train(fed, site, data, state, server_round, proximal_mu=float(config.get("proximal-mu", 0.0)),
                             run_id=msg.metadata.run_id, model=model)
    except BudgetSpent as exc:
        # A deliberate refusal, not a crash: one clean line in the server's failures and the audit log.
        append_audit(site, msg, kind="train-refused", metrics={"reason": str(exc)}, sent=None)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)
    metrics = {**result.metrics, "load_seconds": data.load_seconds, **scores}
    arrays = encode_state(result.state, fed.transfer_dtype)
    return _reply(msg, fed, site, kind="train", num_examples=result.num_examples, metrics=metrics,
                  arrays=arrays, started=started)


def score_first(fed: FedConfig, site: SiteConfig, data, state, model) -> dict[str, float]:
    """The received global model's scores on the site's validation split, as `eval_*` train metrics."""
    started = time.perf_counter()
    result = local_evaluate(fed, site, data, state, model)
    return {**suppress_small(result.metrics, result.num_examples, fed.min_metric_examples),
            "eval_num_examples": result.num_examples, "eval_seconds": time.perf_counter() - started}


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    """A secure-aggregation round: only a masked update leaves the site."""
    return secure_train(msg, context, train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    fed, site = _settings(context, msg)
    data = load_site_data(fed, site)
    result = local_evaluate(fed, site, data, decode_state(msg.content["arrays"]))
    return _reply(msg, fed, site, kind="evaluate", num_examples=result.num_examples,
                  metrics=result.metrics, started=started)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's class list (no counts, no names of files or patients)."""
    fed, site = _settings(context)
    classes = site_class_names(fed, site)
    append_audit(site, msg, kind="query", metrics={}, sent=None)
    return Message(content=RecordDict({"info": ConfigRecord({"class-names": list(classes)})}),
                   reply_to=msg)

