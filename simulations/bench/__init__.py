"""`leuk bench`: how close training, data loading, aggregation, transfer and simulation are to the hardware.

Every measurement runs our code side by side with a minimal reference doing the same work (a plain
PyTorch loop, a numpy sum over the same bytes, the model's float32 size), interleaved in the same
process with several repeats, and reports medians and the ratio. Each sub-command (one module each)
prints a table, saves one JSON file (machine, exact command line, timestamp, figures) to `--out`, and
appends long-format rows to `<out>/perf.jsonl` (`measure.py`) so that a regression shows up as a
changed row. Every "ours" case times the production path.
"""
from __future__ import annotations

from leukfed.common.cli_support import new_app
from leukfed.simulations.bench.aggregation import aggregation_cmd
from leukfed.simulations.bench.overhead import overhead_cmd
from leukfed.simulations.bench.pipeline import pipeline_cmd
from leukfed.simulations.bench.simulation_scale import simulation_scale_cmd
from leukfed.simulations.bench.suite import all_cmd
from leukfed.simulations.bench.trainer import trainer_cmd
from leukfed.simulations.bench.transfer import transfer_bytes_cmd

bench_app = new_app("Measure training, data pipeline, aggregation, transfer size and simulation scale "
                    "against plain references on this machine.")

for name, command in (("trainer", trainer_cmd), ("pipeline", pipeline_cmd), ("aggregation", aggregation_cmd),
                      ("transfer-bytes", transfer_bytes_cmd), ("simulation-scale", simulation_scale_cmd),
                      ("overhead", overhead_cmd), ("all", all_cmd)):
    bench_app.command(name)(command)
