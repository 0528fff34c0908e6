"""`leuk bench all`: every measurement at its default setting."""
from __future__ import annotations

import os
from pathlib import Path

import typer

from leukfed.simulations.bench.aggregation import aggregation_cmd
from leukfed.simulations.bench.measure import out_option
from leukfed.simulations.bench.overhead import overhead_cmd
from leukfed.simulations.bench.pipeline import PIPELINE_MODELS, pipeline_cmd
from leukfed.simulations.bench.simulation_scale import simulation_scale_cmd
from leukfed.simulations.bench.trainer import TRAINER_MODELS, trainer_cmd
from leukfed.simulations.bench.transfer import transfer_bytes_cmd


def all_cmd(
    out: Path = out_option("Folder for the JSON results and perf.jsonl."),
    simulation: bool = typer.Option(True, "--simulation/--no-simulation", help="Include simulation-scale (minutes)."),
) -> None:
    """Every measurement at its default setting (`--no-simulation` skips the slow simulation-scale and overhead)."""
    defaults = {
        "trainer": lambda: trainer_cmd(models=TRAINER_MODELS, repeats=3, warmup=1,
                                       device="auto", threads=0, num_classes=4, seed=0, out=out),
        "pipeline": lambda: pipeline_cmd(models=PIPELINE_MODELS, images=256, workers="0,1,2",
                                         decode_threads="1,2,4", augment="paper002", source="auto",
                                         data_root=os.environ.get("LEUK_DATA_ROOT", ""), repeats=3,
                                         consume_steps=3, device="auto", threads=0, out=out),
        "aggregation": lambda: aggregation_cmd(model="resnet50", num_classes=1000, updates=10,
                                               transfer_dtype="float32", repeats=3, materialised=False, out=out),
        "transfer-bytes": lambda: transfer_bytes_cmd(models="resnet18,dscnet", num_classes=4,
                                                     dtypes="float32,float16,bfloat16", out=out),
    }
    if simulation:
        defaults["simulation-scale"] = lambda: simulation_scale_cmd(
            sites=50, model="smallcnn", rounds=4, image_size=32, per_class=1250, batch_size=16,
            cpus_per_site=1.0, interval=0.5, work=None, out=out)
        defaults["overhead"] = lambda: overhead_cmd(model="resnet18", image_size=128, images_per_site=256, sites=3,
                                                    rounds=3, evaluate_every=1, cold_start=False,
                                                    evaluate_separately=False, out=out)
    for name, run in defaults.items():
        typer.echo(f"== {name}")
        run()
