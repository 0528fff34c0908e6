"""`leuk simulate --seeds`: the whole comparison once per seed, then statistics across the seeds."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from leukfed.common.atomic import atomic_write_json
from leukfed.common.data import scan_dataset
from leukfed.common.splits import load_split, make_split, save_split
from leukfed.common.stats import across_seeds, headline_keys, paired_t
from leukfed.simulations.config import SimulateConfig

Log = Callable[[str], None]
SimulateOnce = Callable[[SimulateConfig, Log], dict]


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def simulate_seeds(cfg: SimulateConfig, seeds: tuple[int, ...], simulate_once: SimulateOnce, log: Log) -> dict:
    """Each seed draws its own partition, initialisation and data order; the data and the test split
    stay the same (the split from --seed, or --split), so every seed and method is scored on the same
    test images. Finished methods of finished seeds are resumed, not retrained."""
    from leukfed.simulations.report import write_seeds_report
    from leukfed.simulations.simulate import _synthetic_data

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    root = (Path(cfg.data) if cfg.data else _synthetic_data(out / "data", cfg, log)).resolve()
    manifest = scan_dataset(root)
    split_path = out / "split.json"
    save_split(load_split(cfg.split, manifest) if cfg.split else make_split(manifest, seed=cfg.seed), split_path)
    per_seed = {}
    for seed in seeds:
        log(f"== seed {seed}")
        one = dataclasses.replace(cfg, seeds="", seed=seed, out=str(seed_folder(out, seed)), data=str(root),
                                  split=str(split_path.resolve()))
        per_seed[seed] = simulate_once(one, log)
    results = aggregate(cfg, per_seed, time.time() - started)
    atomic_write_json(out / "results.json", results)
    write_seeds_report(out, results)
    return results


def _metric(final: dict | None, key: str):
    return None if final is None else final.get(key)


def _paired(name: str, level: str, per_seed: dict[int, dict], keys: tuple[str, ...]) -> dict:
    """Across seeds: paired t on the per-seed values (method minus centralized); each seed's own paired
    bootstrap (diff, CI, p) kept under "per_seed"."""
    def finals(method: str) -> list[dict | None]:
        rows = [r["methods"][method]["final"] for r in per_seed.values()]
        return [r.get("patient_level") for r in rows] if level == "patient" else rows

    field = "patient_paired_vs_centralized" if level == "patient" else "paired_vs_centralized"
    mine, reference = finals(name), finals("centralized")
    return {key: {**paired_t([_metric(f, key) for f in mine], [_metric(f, key) for f in reference]),
                  "per_seed": [{"seed": seed, **r["methods"][name].get(field, {}).get(key, {})}
                               for seed, r in per_seed.items()]}
            for key in keys}


def aggregate(cfg: SimulateConfig, per_seed: dict[int, dict], seconds: float) -> dict:
    """The multi-seed results.json (schema in simulations/report.py)."""
    first = next(iter(per_seed.values()))
    keys = headline_keys(first["data"]["class_names"])
    has_patients = any(m["final"].get("patient_level") for m in first["methods"].values())
    methods = {}
    for name in first["methods"]:
        rows = [r["methods"][name] for r in per_seed.values()]
        entry: dict = {"across_seeds": {k: across_seeds([_metric(m["final"], k) for m in rows]) for k in keys},
                       "run_dirs": {str(seed): r["methods"][name]["run_dir"] for seed, r in per_seed.items()},
                       "sample_passes": rows[0]["sample_passes"], "seconds": sum(m["seconds"] for m in rows)}
        if has_patients:
            entry["patient_across_seeds"] = {k: across_seeds([_metric(m["final"].get("patient_level"), k) for m in rows])
                                             for k in keys}
        if name != "centralized" and "centralized" in first["methods"]:
            entry["paired_vs_centralized"] = _paired(name, "image", per_seed, keys)
            if has_patients:
                entry["patient_paired_vs_centralized"] = _paired(name, "patient", per_seed, keys)
        methods[name] = entry
    return {"config": dataclasses.asdict(cfg), "seeds": list(per_seed), "split_seed": cfg.seed,
            "data": first["data"], "methods": methods,
            "per_seed": {str(seed): f"{seed_folder(Path('.'), seed)}/results.json" for seed in per_seed},
            "seconds": seconds}
