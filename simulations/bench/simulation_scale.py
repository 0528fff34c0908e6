"""`leuk bench simulation-scale`: time per round and whole-process-tree memory for many virtual sites."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import typer

from leukfed.simulations.bench.measure import format_table, median, out_option, report, row
from leukfed.simulations.bench.memory import TreeMemorySampler


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope dy/dx (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def round_entry(entry: dict, sampler: TreeMemorySampler | None) -> dict:
    """One round: timings from history.json and the process-tree memory just after the round ended."""
    train = [s.get("train", {}) for s in entry.get("sites", {}).values()]
    mem = sampler.at(entry["time"]) if sampler and "time" in entry else None
    return {
        "round": entry["round"],
        **{key: entry.get(key) for key in ("round_seconds", "train_phase_seconds", "aggregation_seconds",
                                           "evaluate_phase_seconds", "server_evaluate_seconds", "sites_replied")},
        **{f"sum_site_{part}_seconds": sum(t.get(f"{part}_seconds", 0.0) for t in train)
           for part in ("train", "load", "client")},
        "rss_after_round_mb": mem["rss"] / 2**20 if mem else None,
        "pss_after_round_mb": mem["pss"] / 2**20 if mem else None,
    }


def summarize_rounds(history: list[dict], sampler: TreeMemorySampler | None) -> dict:
    """Per round timings and memory, the median round time and the memory slopes over rounds."""
    rounds = [round_entry(entry, sampler) for entry in history]
    xs = [r["round"] for r in rounds if r["rss_after_round_mb"] is not None]
    rss = [r["rss_after_round_mb"] for r in rounds if r["rss_after_round_mb"] is not None]
    pss = [r["pss_after_round_mb"] for r in rounds if r["pss_after_round_mb"] is not None]
    return {"rounds": rounds,
            "median_round_seconds": median(r["round_seconds"] for r in rounds if r["round_seconds"] is not None),
            "rss_slope_mb_per_round": slope(xs, rss),
            "rss_slope_mb_per_round_after_first": slope(xs[1:], rss[1:]),
            "pss_slope_mb_per_round": slope(xs, pss),
            "pss_slope_mb_per_round_after_first": slope(xs[1:], pss[1:])}


def simulate_sampled(cfg, work: Path, interval: float) -> tuple[float, TreeMemorySampler, list[dict]]:
    """Run `leuk simulate` under the memory sampler: wall seconds, the sampler and the FedAvg history."""
    from leukfed.server.state import read_history
    from leukfed.simulations.simulate import simulate

    started = time.perf_counter()
    with TreeMemorySampler(interval=interval) as sampler:
        simulate(cfg, log=lambda line: typer.echo(line, err=True))
    return time.perf_counter() - started, sampler, read_history(work / "federated-fedavg")


def simulation_scale_cmd(
    sites: int = typer.Option(50, help="Virtual sites."),
    model: str = typer.Option("smallcnn", help="Model."),
    rounds: int = typer.Option(4, help="Federated rounds."),
    image_size: int = typer.Option(32, help="Input size in px (tiny keeps it to minutes on 2 cores)."),
    per_class: int = typer.Option(1250, help="Generated images per class (4 classes); every site needs >= 5 "
                                  "validation images, else its metrics are suppressed and Flower refuses the "
                                  "round (see PERFORMANCE.md)."),
    batch_size: int = typer.Option(16, help="Local batch size."),
    cpus_per_site: float = typer.Option(1.0, help="CPUs per simulated site (Ray)."),
    interval: float = typer.Option(0.5, help="Seconds between memory samples of the process tree."),
    work: Optional[Path] = typer.Option(None, "--work", help="Keep the simulation folder here (default: a temp folder, deleted)."),
    out: Path = out_option(),
) -> dict:
    """Time per round and whole-process-tree memory (incl. Ray workers) for many virtual sites."""
    from leukfed.simulations.simulate import SimulateConfig

    params = dict(sites=sites, model=model, rounds=rounds, image_size=image_size, per_class=per_class,
                  batch_size=batch_size, cpus_per_site=cpus_per_site, interval=interval,
                  work=str(work) if work else None)
    with tempfile.TemporaryDirectory(prefix="leuk-bench-sim-") as scratch:
        folder = work or Path(scratch)
        cfg = SimulateConfig(out=str(folder), sites=sites, model=model, rounds=rounds, image_size=image_size,
                             batch_size=batch_size, baselines=False, augment="flip", pretrained="none",
                             partition="iid", local_epochs=1,
                             synthetic_per_class=per_class, cpus_per_site=cpus_per_site)
        wall, sampler, history = simulate_sampled(cfg, folder, interval)
    summary = summarize_rounds(history, sampler)
    result = {"sites": sites, "model": model, "rounds": rounds, "image_size": image_size,
              "images": per_class * 4, "wall_seconds": wall, "peak_rss_mb": sampler.peak_rss / 2**20,
              "peak_pss_mb": sampler.peak_pss / 2**20, "max_processes": max(s["procs"] for s in sampler.samples),
              "max_threads": sampler.max_threads, "samples": len(sampler.samples),
              "processes_at_peak": sampler.peak_processes,
              "memory_timeline": [{"t": round(s["t"] - sampler.samples[0]["t"], 2), "rss_mb": round(s["rss"] / 2**20, 1),
                                   "pss_mb": round(s["pss"] / 2**20, 1), "procs": s["procs"]} for s in sampler.samples],
              **summary}
    body = [[r["round"], r["round_seconds"], r["train_phase_seconds"], r["aggregation_seconds"],
             r["evaluate_phase_seconds"], r["sum_site_load_seconds"], r["rss_after_round_mb"], r["pss_after_round_mb"]]
            for r in summary["rounds"]]
    typer.echo(f"{sites} sites x {model} @{image_size}px, {rounds} rounds: wall {wall:.0f}s, "
               f"peak RSS {result['peak_rss_mb']:.0f} MB (PSS {result['peak_pss_mb']:.0f} MB) over "
               f"{result['max_processes']} processes")
    typer.echo(format_table(["round", "round s", "train s", "aggr s", "eval s", "site load s", "RSS MB", "PSS MB"], body))
    typer.echo(f"memory slope: RSS {summary['rss_slope_mb_per_round']:+.1f} MB/round "
               f"({summary['rss_slope_mb_per_round_after_first']:+.1f} after round 1), "
               f"PSS {summary['pss_slope_mb_per_round']:+.1f} MB/round")
    case = f"{sites}sites/{model}"
    rows = [row(case, "median_round_seconds", summary["median_round_seconds"], "s"),
            row(case, "peak_rss_mb", result["peak_rss_mb"], "MB"),
            row(case, "peak_pss_mb", result["peak_pss_mb"], "MB"),
            row(case, "rss_slope_mb_per_round", summary["rss_slope_mb_per_round"], "MB/round")]
    return report("simulation-scale", params, result, rows, out)
