"""`leuk bench transfer-bytes`: an encoded update's size vs the model's float32 size, and on the wire."""
from __future__ import annotations

import time
from pathlib import Path

import typer

from leukfed.common.cli_support import parse_csv_list
from leukfed.simulations.bench.measure import format_table, out_option, report, row


def perturbed(state: dict) -> dict:
    """The state with every float tensor moved a little and every counter stepped (seeded): distinct
    arrays, as after training."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1
            for k, v in state.items()}


def ideal_bytes(state: dict, dtype: str) -> int:
    """The state's array bytes in `dtype` (integer buffers as they are), without keys or headers."""
    width = 4 if dtype == "float32" else 2
    return sum(v.numel() * (width if v.is_floating_point() else v.element_size()) for v in state.values())


def transfer_case(name: str, state: dict, dtype: str) -> dict:
    """One model and dtype: encoded, packed and Flower-object counts, and the time of each step."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from leukfed.common.flower.wire import decode_state, encode_state, pack_record

    float32_bytes = ideal_bytes(state, "float32")
    t0 = time.perf_counter()
    record = encode_state(state, dtype)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_state(record)
    decode_s = time.perf_counter() - t0
    encoded = record.count_bytes()
    t0 = time.perf_counter()
    packed = pack_record(record)
    pack_s = time.perf_counter() - t0
    wire = packed.count_bytes()
    # Counted on a trained-like state: a fresh model's zero/one BatchNorm buffers coincide and
    # Flower sends identical objects once, which would flatter the unpacked count.
    trained = encode_state(perturbed(state), dtype)
    return {"model": name, "transfer_dtype": dtype, "keys": len(record),
            "float_params": sum(v.numel() for v in state.values() if v.is_floating_point()),
            "model_float32_bytes": float32_bytes, "encoded_bytes": encoded,
            "array_bytes_without_keys": sum(len(a.data) for a in record.values()),
            "ratio_to_float32": encoded / float32_bytes,
            "overhead_bytes_per_key": (encoded - ideal_bytes(state, dtype)) / len(record),
            "wire_bytes": wire, "wire_ratio_to_float32": wire / float32_bytes,
            "flower_objects_unpacked": len(get_all_nested_objects(trained)),
            "flower_objects_packed": len(get_all_nested_objects(pack_record(trained))),
            "encode_seconds": encode_s, "decode_seconds": decode_s, "pack_seconds": pack_s}


def transfer_bytes_cmd(
    models: str = typer.Option("resnet18,dscnet", "--models", help="Comma list of model names."),
    num_classes: int = typer.Option(4, help="Classes of the head."),
    dtypes: str = typer.Option("float32,float16,bfloat16", help="Transfer dtypes."),
    out: Path = out_option(),
) -> dict:
    """Bytes of an encoded update (client/records.encode_state) vs the model's float32 size, and on the
    wire: packed into one Array (pack_record), with the Flower objects each message hop moves."""
    from leukfed.models import create_model

    params = dict(models=models, num_classes=num_classes, dtypes=dtypes)
    cases, rows, body = [], [], []
    for name in parse_csv_list(models):
        state = create_model(name, num_classes, pretrained=False).state_dict()
        for dtype in parse_csv_list(dtypes):
            case = transfer_case(name, state, dtype)
            cases.append(case)
            wire_ratio = case["wire_ratio_to_float32"]
            body.append([name, dtype, case["keys"], case["model_float32_bytes"] / 1e6, case["encoded_bytes"] / 1e6,
                         case["ratio_to_float32"], wire_ratio,
                         f"{case['flower_objects_unpacked']} -> {case['flower_objects_packed']}"])
            rows += [row(f"{name}/{dtype}", "ratio_to_float32", case["ratio_to_float32"], "x"),
                     row(f"{name}/{dtype}", "encoded_bytes", case["encoded_bytes"], "B"),
                     row(f"{name}/{dtype}", "wire_ratio_to_float32", wire_ratio, "x"),
                     row(f"{name}/{dtype}", "flower_objects_packed", case["flower_objects_packed"], "objects")]
    typer.echo(format_table(["model", "dtype", "keys", "float32 MB", "encoded MB", "ratio", "wire ratio",
                             "Flower objects (trained)"], body))
    return report("transfer-bytes", params, {"cases": cases}, rows, out)
