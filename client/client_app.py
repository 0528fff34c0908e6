"""Flower ClientApp: unpack a message, call the site's training functions, pack the reply."""
from __future__ import annotations

import dataclasses
import gc
import time

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from leukfed.client import patient_tasks
from leukfed.client.audit import append_entry, task_entry
from leukfed.client.policy import check_task
from leukfed.common.flower.wire import decode_state, encode_state, packed_arrays_mod
from leukfed.client.site_errors import (ReceivedArraysRefused, error_code, is_refusal, local_detail,
                                        log_failure, new_ref, public_reason, site_log)
from leukfed.client.wire_checks import check_received, expected_records, max_model_bytes
from leukfed.common.fedconfig import FedConfig, SiteConfig
from leukfed.client.secagg import refuse_plain_training, secure_train
from leukfed.common.site import (load_site_data, local_evaluate, local_train, site_class_names, site_model,
                                 site_statistics, STATISTICS_TASK, suppress_small)
from leukfed.common.train import batchnorm_keys

LOCAL_BATCHNORM = "local-batchnorm"  # FedBN: this site's own BatchNorm entries, in Flower's per-site state
LOCAL_OPTIMIZER = "local-optimizer"  # --local-optimizer-state: this site's optimizer state, in the same place


# Flower's records (ArrayRecord, Array) sit in reference cycles, so a task's model-sized buffers outlive it
# until Python's cycle collector runs, which counts objects, not bytes: a simulation actor serving VGG16's
# sites one after another grew to 13 GB until Ray killed it. A full collection costs ~0.1 s, so only tasks
# that move a large model pay it (deployed sites run each task in a fresh process anyway).
COLLECT_ABOVE_BYTES = 32 * 2**20


def received_bytes(message: Message) -> int:
    """The bytes of the arrays a task received (0 for a message without content)."""
    if not message.has_content():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())


class AuditedClientApp(ClientApp):
    """Every task ends in one audit entry (answered, refused or failed), and no exception reaches
    Flower, whose error reply would carry its text (file paths, patient IDs) to the coordinator: a
    failure leaves as a site error code and a generic text, a policy refusal (SiteRefusal) as its rule."""

    def __call__(self, message: Message, context: Context) -> Message:
        if received_bytes(message) >= COLLECT_ABOVE_BYTES:
            gc.collect()    # the last task's records, before this task allocates as much again
        started, wall = time.perf_counter(), time.time()
        try:
            reply, outcome, detail = super().__call__(message, context), "answered", {}
            if reply.has_error():  # a handler's own error reply: its text is not checked, so it stays here
                raise RuntimeError(f"the task replied with an error: {reply.error.reason}")
        except Exception as exc:  # noqa: BLE001 - everything: Flower must not see the text
            reply, outcome, detail = _refusal_or_failure(message, exc)
        try:
            if context.node_config.get("audit-log"):  # simulated sites keep none
                append_entry(str(context.node_config["audit-log"]), task_entry(
                    message, context, outcome=outcome, started_wall=wall, seconds=time.perf_counter() - started,
                    reply=reply, detail=detail))
        except Exception as exc:  # noqa: BLE001 - no evidence, no reply: what left would be unrecorded
            ref = new_ref()
            log_failure("audit", ref, exc)
            if outcome == "answered":
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=public_reason(7, ref)),
                               reply_to=message)
        return reply


def _refusal_or_failure(message: Message, exc: Exception) -> tuple[Message, str, dict]:
    """The error reply for a task that raised: the refusal's rule, or a code and a generic text."""
    if is_refusal(exc):
        site_log(f"{message.metadata.message_type} task refused: {exc}")
        reason, outcome, detail = str(exc), "refused", {}
    else:
        ref, code = new_ref(), error_code(exc)
        log_failure(str(message.metadata.message_type), ref, exc)
        reason, outcome = public_reason(code, ref), "failed"
        detail = {"error_code": code, "ref": ref, "error": local_detail(exc)}  # stays in the site's log
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), outcome, detail


def refuse_unfit_arrays(msg: Message, context: Context, call_next) -> Message:
    """Mod, before unpacking: the server's arrays must be this site's model (keys, dtypes, shapes,
    sizes, read from their headers) or nothing is copied; a train or evaluate task has one, "arrays"
    (the patient task's secure calibration stage also the head, "head")."""
    records = msg.content.array_records if msg.has_content() else {}
    category = str(msg.metadata.message_type).split(".")[0]
    if set(records) - {"arrays", "head"} or (records and category not in ("train", "evaluate")):
        raise ReceivedArraysRefused(f"unexpected array records {sorted(records)[:5]}")
    if records:
        fed, site = _settings(context, msg)
        classes = fed.classes or site_class_names(fed, site)
        config = msg.content.config_records.get("config") or {}
        expected = expected_records(fed, len(classes), config)
        if set(records) != set(expected):
            raise ReceivedArraysRefused(f"array records {sorted(records)[:5]}, expected {sorted(expected)}")
        for name, record in records.items():
            check_received(record, expected[name], max_model_bytes(context.node_config))
    return call_next(msg, context)


def site_policy_mod(msg: Message, context: Context, call_next) -> Message:
    """The site's policy, checked first for every task: before any array is read or data touched."""
    check_task(context)
    return call_next(msg, context)


app = AuditedClientApp(mods=[site_policy_mod, refuse_unfit_arrays, packed_arrays_mod])


def _settings(context: Context, msg: Message | None = None) -> tuple[FedConfig, SiteConfig]:
    """Run-wide settings (with the class list the server fixed for this run) and this site's facts."""
    fed = FedConfig.from_run_config(context.run_config)
    if msg is not None and "config" in msg.content.config_records:
        classes = msg.content["config"].get("class-names")
        if classes:
            fed = dataclasses.replace(fed, class_names=str(classes))
    return fed, SiteConfig.from_node_config(context.node_config)


def _reply(msg: Message, fed: FedConfig, *, num_examples: int,
           metrics: dict[str, float], arrays=None, started: float) -> Message:
    released = suppress_small(metrics, num_examples, fed.min_metric_examples)
    privacy = {k: v for k, v in metrics.items() if k.startswith("dp_")}  # the guarantee, not data: always sent
    metric_record = MetricRecord({"num-examples": num_examples, **released, **privacy,
                                  "client_seconds": time.perf_counter() - started})
    content = RecordDict({"metrics": metric_record})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    refuse_plain_training(msg, context)  # node config secure-aggregation="required": never in the clear
    started = time.perf_counter()
    fed, site = _settings(context, msg)
    if fed.task == "patients":
        return patient_tasks.train(msg, context, fed, site)
    data = load_site_data(fed, site)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1)) + int(config.get("round-offset", 0))
    if int(config.get(STATISTICS_TASK, 0)) > 0:   # the statistics round: the global weights as they are
        result = site_statistics(fed, site, data, decode_state(msg.content["arrays"]), int(config[STATISTICS_TASK]))
        return _reply(msg, fed, num_examples=result.num_examples, metrics=result.metrics,
                      arrays=encode_state(result.state, fed.transfer_dtype), started=started)
    state = with_local_batchnorm(fed, context, decode_state(msg.content["arrays"]))
    model = site_model(fed, site, data, state)
    # The server asks for the previous round's scores here rather than in a message of their own.
    scores = score_first(fed, site, data, state, model) if config.get("evaluate-first") else {}
    # BudgetSpent is a refusal: AuditedClientApp sends its text and logs it as one.
    result = local_train(fed, site, data, state, server_round, proximal_mu=float(config.get("proximal-mu", 0.0)),
                         run_id=msg.metadata.run_id, model=model, optimizer_state=kept_optimizer_state(fed, context))
    if fed.local_batchnorm:
        own = {k: result.state[k] for k in batchnorm_keys(model) if k in result.state}  # none under DP (GroupNorm)
        context.state[LOCAL_BATCHNORM] = encode_state(own)
    if result.optimizer_state is not None:
        context.state[LOCAL_OPTIMIZER] = encode_state(result.optimizer_state)
    metrics = {**result.metrics, "load_seconds": data.load_seconds, **scores}
    arrays = encode_state(result.state, fed.transfer_dtype)
    return _reply(msg, fed, num_examples=result.num_examples, metrics=metrics,
                  arrays=arrays, started=started)


def with_local_batchnorm(fed: FedConfig, context: Context, state: dict) -> dict:
    """FedBN: the global weights with this site's own BatchNorm entries from its last round, when it has them."""
    if not fed.local_batchnorm or LOCAL_BATCHNORM not in context.state.array_records:
        return state
    own = decode_state(context.state[LOCAL_BATCHNORM])
    return {**state, **{k: v for k, v in own.items() if k in state}}


def kept_optimizer_state(fed: FedConfig, context: Context) -> dict | None:
    """--local-optimizer-state: this site's optimizer state from its last round, when it has one."""
    if not fed.local_optimizer_state or LOCAL_OPTIMIZER not in context.state.array_records:
        return None
    return decode_state(context.state[LOCAL_OPTIMIZER])


def score_first(fed: FedConfig, site: SiteConfig, data, state, model) -> dict[str, float]:
    """The received global model's scores on the site's validation split, as `eval_*` train metrics."""
    started = time.perf_counter()
    result = local_evaluate(fed, site, data, state, model)
    return {**suppress_small(result.metrics, result.num_examples, fed.min_metric_examples),
            "eval_num_examples": result.num_examples, "eval_seconds": time.perf_counter() - started}


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    """A secure-aggregation round: only a masked update leaves the site."""
    return secure_train(msg, context, train)  # the task's audit entry records the masked reply that left


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    fed, site = _settings(context, msg)
    if fed.task == "patients":
        return patient_tasks.evaluate(msg, context, fed, site)
    data = load_site_data(fed, site)
    state = with_local_batchnorm(fed, context, decode_state(msg.content["arrays"]))
    result = local_evaluate(fed, site, data, state)
    return _reply(msg, fed, num_examples=result.num_examples,
                  metrics=result.metrics, started=started)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's class list (no counts, no names of files or patients)."""
    fed, site = _settings(context)
    classes = site_class_names(fed, site)
    return Message(content=RecordDict({"info": ConfigRecord({"class-names": list(classes)})}),
                   reply_to=msg)



@app.query("moments")
def moments(msg: Message, context: Context) -> Message:
    """--task patients: the moments of the site's training patients' cell features (aggregates only)."""
    fed, site = _settings(context, msg)
    return patient_tasks.moments(msg, context, fed, site)
