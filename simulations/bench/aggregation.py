"""`leuk bench aggregation`: Flower's FedAvg and our guarded fused FedAvg vs a numpy sum over the same bytes."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import typer

from leukfed.simulations.bench.measure import (format_table, interleaved, median, out_option, paired_ratio,
                                               report, row, timed)

REFERENCE, FLOWER, OURS = "numpy_sum_reference", "flower_aggregate_arrayrecords", "reply_guard_fedavg (ours)"
OURS_WITHOUT_NUMBA = "reply_guard_fedavg without numba (numpy/torch loop)"
MATERIALISED = "reply_guard materialised path (before; robust strategies)"


def make_replies(state: dict, updates: int, transfer_dtype: str = "float32", base_examples: int = 100):
    """`updates` reply Messages as sites send them (arrays + metrics), each a scaled copy of `state`."""
    import torch
    from flwr.app import Message, Metadata, MetricRecord, RecordDict

    from leukfed.common.flower.wire import encode_state

    replies = []
    for i in range(updates):
        scale = 1.0 + 0.01 * (i + 1)
        update = {k: (v * scale if v.is_floating_point() else v.clone()) for k, v in state.items()}
        content = RecordDict({"arrays": encode_state(update, transfer_dtype),
                              "metrics": MetricRecord({"num-examples": base_examples + i, "train_loss": 0.5})})
        metadata = Metadata(run_id=1, message_id=f"m{i}", src_node_id=1000 + i, dst_node_id=0,
                            reply_to_message_id=f"q{i}", group_id="1", created_at=time.time(), ttl=3600.0,
                            message_type="train")
        replies.append(Message(content, metadata=metadata))
        del update
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replies


def copy_reply(msg):
    """A reply with a fresh RecordDict over the same records (the materialised path replaces its arrays)."""
    from flwr.app import Message, RecordDict

    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": msg.content["metrics"]}),
                   metadata=msg.metadata)


def widened_contents(replies) -> list:
    """The replies' contents with float32 arrays (`widen`), as Flower's FedAvg must get half precision."""
    from flwr.app import RecordDict

    from leukfed.common.flower.wire import widen

    return [RecordDict({"arrays": widen(m.content["arrays"]), "metrics": m.content["metrics"]}) for m in replies]


def max_abs_difference(a, b) -> float:
    import numpy as np

    worst = 0.0
    for key in b.keys():
        x, y = a[key].numpy().astype(np.float64), b[key].numpy().astype(np.float64)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


@contextmanager
def numba_hidden() -> Iterator[None]:
    """Inside: the server's aggregation loop is built as on a machine without numba (numpy/torch loop)."""
    from leukfed.server.kernels import fused_step

    saved = sys.modules.get("numba")
    sys.modules["numba"] = None   # `import numba` raises ImportError
    fused_step.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["numba"]
        else:
            sys.modules["numba"] = saved
        fused_step.cache_clear()


def guarded_timer(replies, reference: dict, held: dict, *, fused: bool, numba: bool = True) -> Callable[[], float]:
    """Timer of one `aggregate_train` of a guarded FedAvg; the strategy is built (and run once) without
    numba when `numba` is False. Each result stays in `held` until the next exists, as in Flower's loop."""
    from leukfed.common.fedconfig import FedConfig
    from leukfed.server.round_log import RoundLog
    from leukfed.server.strategies import make_strategy

    def run() -> float:
        fresh = [copy_reply(m) for m in replies]   # the materialised path replaces content["arrays"]
        strategy.log = RoundLog(started=time.perf_counter())
        strategy.reference = reference
        t0 = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, fresh)
        elapsed = time.perf_counter() - t0
        assert arrays is not None and not strategy.log.rejected, strategy.log.rejected
        held[f"guard {fused}"] = arrays
        return elapsed

    def build():
        guarded = make_strategy(FedConfig(strategy="fedavg", min_sites=len(replies)))
        guarded.fused_mean = fused
        return guarded

    if numba:
        strategy = build()
        return run
    with numba_hidden():
        strategy = build()
        run()   # builds the strategy's aggregation loop while numba is hidden
    return run


def numpy_sum_timer(replies, reference: dict, transfer_dtype: str) -> Callable[[], float]:
    """The memory-bandwidth reference: the same float32 bytes as one array per update, summed in place."""
    import numpy as np

    from leukfed.common.flower.wire import array_view

    flats = [np.concatenate([np.asarray(array_view(a), dtype=np.float32).reshape(-1)
                             for k, a in m.content["arrays"].items()
                             if reference[k.split("::")[0]].dtype.kind == "f"]) for m in replies]
    if transfer_dtype != "float32":
        flats = [f.astype(np.float32) for f in flats]
    acc = np.empty_like(flats[0])

    def run() -> float:
        acc.fill(0.0)
        t0 = time.perf_counter()
        for x in flats:
            np.add(acc, x, out=acc)
        return time.perf_counter() - t0
    return run


def aggregation_cmd(
    model: str = typer.Option("resnet50", help="Model whose state-dict shapes the updates have."),
    num_classes: int = typer.Option(1000, help="Head size (1000: resnet50's 25.6M parameters)."),
    updates: int = typer.Option(10, help="Number of site updates aggregated."),
    transfer_dtype: str = typer.Option("float32", help="Dtype the updates travel in: float32, float16, bfloat16."),
    repeats: int = typer.Option(3, help="Timed repeats per case (interleaved)."),
    materialised: bool = typer.Option(False, "--materialised/--no-materialised",
                                      help="Also time the guard's materialised path (what FedMedian, "
                                           "FedTrimmedAvg, Krum, FedAdam and FedYogi use; slow)."),
    out: Path = out_option(),
) -> dict:
    """Aggregate N updates: Flower's aggregate_arrayrecords and our GuardedStrategy+FedAvg vs a numpy sum."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from leukfed.common.flower.wire import encode_state
    from leukfed.models import create_model
    from leukfed.server.kernels import fused_step

    params = dict(model=model, num_classes=num_classes, updates=updates, transfer_dtype=transfer_dtype,
                  repeats=repeats, materialised=materialised)
    state = create_model(model, num_classes, pretrained=False).state_dict()
    reference = {k: v.numpy() for k, v in encode_state(state, "float32").items()}
    replies = make_replies(state, updates, transfer_dtype)
    contents = [m.content for m in replies]
    float_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    update_bytes = sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    del state

    # Every case keeps its previous result alive until the next one exists, as Flower's round loop does
    # (`arrays = agg_arrays` after aggregate_train): the allocator then reuses the memory of the result
    # before last instead of page-faulting a fresh 100 MB each time (see the breakdown).
    held: dict[str, object] = {}

    def flower() -> float:
        def run():
            if transfer_dtype == "float32":
                held["flower"] = aggregate_arrayrecords(contents, "num-examples")
            else:  # half precision: Flower would sum in float16; widen first, as the guard does (timed)
                held["flower"] = aggregate_arrayrecords(widened_contents(replies), "num-examples")
        return timed(run)

    cases = {REFERENCE: numpy_sum_timer(replies, reference, transfer_dtype), FLOWER: flower,
             OURS: guarded_timer(replies, reference, held, fused=True)}
    if fused_step() is not None:   # the production path is numba's loop: also time the one without it
        cases[OURS_WITHOUT_NUMBA] = guarded_timer(replies, reference, held, fused=True, numba=False)
    if materialised:
        cases[MATERIALISED] = guarded_timer(replies, reference, held, fused=False)
    times = interleaved(cases, repeats, warmup=1)
    med = {k: median(v) for k, v in times.items()}
    ratios = {k: paired_ratio(times, REFERENCE, k) for k in times}

    breakdown = fused_breakdown(replies, reference)
    held.clear()
    guarded_timer(replies, reference, held, fused=True)()
    check = max_abs_difference(held.popitem()[1], aggregate_arrayrecords(widened_contents(replies), "num-examples"))
    gb = updates * update_bytes / 1e9
    result = {"model": model, "num_classes": num_classes, "float_params": float_params, "updates": updates,
              "transfer_dtype": transfer_dtype, "float32_bytes_per_update": update_bytes,
              "keys_per_update": len(reference), "seconds": times, "median_seconds": med,
              "ratio_reference_to_case": ratios,
              "effective_gb_per_s": {k: gb / v for k, v in med.items()},
              "ours_breakdown_seconds_for_all_updates": breakdown,
              "ours_vs_flower_max_abs_difference": check}
    body = [[k, med[k], ratios[k], gb / med[k]] for k in cases]
    typer.echo(f"aggregating {updates} x {model} ({float_params / 1e6:.1f}M float params, {transfer_dtype} transfer)")
    typer.echo(format_table(["case", "median s", "ref/ours (paired)", "GB/s (f32 bytes)"], body))
    typer.echo(format_table(["ours, step by step (all updates, best of 3 rounds)", "s"], list(breakdown.items())))
    typer.echo(f"ours vs Flower result: max |difference| {check:.3g}")
    rows = [row(k, "seconds", med[k], "s") for k in cases] + [row(k, "ratio_reference_to_case", ratios[k], "x") for k in cases]
    return report("aggregation", params, result, rows, out)


def fused_breakdown(replies: list, reference: dict) -> dict[str, float]:
    """The steps of the guard's fused aggregation, each the best of 3 rounds (so that the shared
    machine's noise does not dominate a single step), and for scale a copy of the global model."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from leukfed.server.fused_mean import FusedMean, FusedUpdate

    def best(fn: Callable[[], object], n: int = 3) -> float:
        return min(timed(fn) for _ in range(n))

    fused = FusedMean()
    steps: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], object]):
        t0 = time.perf_counter()
        value = fn()
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return value

    def read() -> list:
        updates = []
        for m in replies:
            update = FusedUpdate(m, m.metadata.src_node_id, float(m.content["metrics"]["num-examples"]))
            assert fused.read(update, m.content["arrays"]) is None
            updates.append(update)
        return updates

    held = None
    for _ in range(4):   # the steps of one aggregation, in order; the first round builds the layout
        step("bytes_received (ArrayRecord.count_bytes)", lambda: [m.content["arrays"].count_bytes() for m in replies])
        step("global model's chunks + fresh result buffers (prepare)", lambda: fused.prepare(reference))
        updates = step("header checks + zero-copy views", read)
        step("one pass: norms, NaN/Inf, weighted sum", lambda ups=updates: fused.first_pass(ups))
        held = step("result ArrayRecord (BytesIO hand-over, no copy)", lambda ups=updates: fused.result(ups))
    del held
    return {
        **{name: min(times[1:]) for name, times in steps.items()},
        "FedAvg metric aggregation": best(lambda: aggregate_metricrecords([m.content for m in replies], "num-examples")),
        "for scale: numpy copy of the global model": best(
            lambda: [np.array(v, copy=True) for v in reference.values()]),
        "for scale: ArrayRecord(Array(ndarray)) of the model": best(
            lambda: ArrayRecord({k: Array(v) for k, v in reference.items()})),
    }
