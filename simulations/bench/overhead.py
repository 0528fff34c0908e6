"""`leuk bench overhead`: a real federation on loopback with TLS, each round's time split (simulations/overhead.py)."""
from __future__ import annotations

from pathlib import Path

import typer

from leukfed.simulations.bench.measure import format_table, out_option, row, save_result

ROUND_COLUMNS = {"round": "round", "round_seconds": "round s", "slowest_site_train_seconds": "slowest train s",
                 "client_startup_and_load_seconds": "client start+load s",
                 "transfer_and_scheduling_seconds": "transfer+scheduling s", "aggregation_seconds": "aggregation s",
                 "slowest_site_scoring_in_train_seconds": "scoring in train s",
                 "evaluate_phase_seconds": "evaluation phase s", "overhead_share": "overhead share"}


def overhead_cmd(
    model: str = typer.Option("resnet18", help="Model every site trains."),
    image_size: int = typer.Option(128, help="Input size in px."),
    images_per_site: int = typer.Option(256, help="Training images per site (all_taleqani under LEUK_DATA_ROOT, else generated)."),
    sites: int = typer.Option(3, help="Hospitals, each a real leuk-client on loopback."),
    rounds: int = typer.Option(3, help="Rounds (the medians use rounds 2+)."),
    evaluate_every: int = typer.Option(1, help="Sites score the global model every N rounds."),
    cold_start: bool = typer.Option(False, "--cold-start", help="A fresh ClientApp process per task (Flower's default)."),
    evaluate_separately: bool = typer.Option(False, "--evaluate-separately",
                                             help="Site evaluation in a message of its own (Flower's default)."),
    out: Path = out_option("Folder for the JSON results and perf.jsonl."),
) -> dict:
    """Federation overhead on loopback with TLS: (round - slowest site's training - server evaluation) / round."""
    from leukfed.simulations.overhead import measure

    params = dict(model=model, image_size=image_size, images_per_site=images_per_site, sites=sites, rounds=rounds,
                  evaluate_every=evaluate_every, cold_start=cold_start, evaluate_separately=evaluate_separately)
    result = measure(**params)
    case = f"{model}@{image_size}px x{sites} sites ({'cold' if cold_start else 'forked'})"
    rows = [row(case, metric, result[metric], unit) for metric, unit in (
        ("median_round_seconds", "s"), ("median_overhead_share", "fraction"),
        ("median_overhead_share_without_site_evaluation", "fraction"))]
    path = save_result("overhead", params, result, rows, out)
    typer.echo(format_table(list(ROUND_COLUMNS.values()), [[r[k] for k in ROUND_COLUMNS] for r in result["rounds"]]))
    typer.echo(f"median overhead (rounds 2+): {100 * result['median_overhead_share']:.1f}% of the round "
               f"({100 * result['median_overhead_share_without_site_evaluation']:.1f}% without the sites' "
               f"evaluation phase); saved {path}")
    return result
