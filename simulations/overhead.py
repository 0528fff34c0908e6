"""Federation overhead on loopback with TLS: where a round's time goes, and the share federation adds.

Used by `leuk bench overhead` and `benchmarks/federation_overhead.py`. Each site gets images of
all_taleqani (symbolic links, not copies) when LEUK_DATA_ROOT is set, else generated images; a real
`leuk-server` and one real `leuk-client` per site run on 127.0.0.1 with certificates and site keys.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from leukfed.common.data import scan_dataset
from leukfed.common.errors import LeukError
from leukfed.common.partition import partition_samples
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.simulations.loopback import LoopbackFederation


def site_folders(root: Path, sites: int, per_site: int, data_root: str | None) -> list[Path]:
    """Per-site folders holding copies of <data_root>/all_taleqani images (stratified), or generated data.
    Copies, not links: a site reads only regular files inside its own data folder."""
    if not data_root:
        return [make_synthetic_dataset(root / f"data-{i}", per_class=per_site // 4, size=96, seed=i) for i in range(sites)]
    manifest = scan_dataset(Path(data_root) / "all_taleqani")
    parts = partition_samples(manifest, [s.path for s in manifest.samples], sites, "iid", seed=0)
    folders = []
    for i, part in enumerate(parts):
        folder = root / f"data-{i}"
        for path in part[:: max(1, len(part) // per_site)][:per_site]:  # every class, in its share
            copy = folder / path
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.root / path, copy)
        folders.append(folder)
    return folders


def breakdown(row: dict, previous: dict | None = None) -> dict:
    """One round's time split; `overhead` = round − slowest site's training − server evaluation. The
    round is the wall time since the previous round's entry: Flower's round timer leaves out the
    checkpoint and the next round's sampling, which happen between its rounds."""
    sites = [s["train"] for s in row["sites"].values() if s["train"]]
    slowest_train = max(s.get("train_seconds", 0.0) for s in sites)
    slowest_client = max(s.get("client_seconds", 0.0) for s in sites)
    # Scoring the previous model inside the train task (the default) is the sites' evaluation work.
    slowest_work = max(row.get("slowest_site_work_seconds", slowest_train), slowest_train)
    between = max(row["time"] - previous["time"] - row["round_seconds"], 0.0) if previous else 0.0
    round_s = row["round_seconds"] + between
    train_phase = row["train_phase_seconds"]
    return {
        "round": row["round"], "round_seconds": round_s, "between_rounds_seconds": between,
        "slowest_site_train_seconds": slowest_train,
        "slowest_site_scoring_in_train_seconds": slowest_work - slowest_train,
        "client_startup_and_load_seconds": slowest_client - slowest_work,
        "transfer_and_scheduling_seconds": train_phase - slowest_client - row["aggregation_seconds"],
        "aggregation_seconds": row["aggregation_seconds"], "evaluate_phase_seconds": row["evaluate_phase_seconds"],
        "server_evaluate_seconds": row["server_evaluate_seconds"],
        "overhead_share": (round_s - slowest_train - row["server_evaluate_seconds"]) / round_s,
        # The sites' federated evaluation is work too; this share counts only what federation adds to training.
        "overhead_share_without_site_evaluation": (round_s - slowest_work - row["server_evaluate_seconds"]
                                                   - row["evaluate_phase_seconds"]) / round_s,
        "bytes_sent": row["bytes_sent"], "bytes_received": row["bytes_received"],
    }


def measure(model: str = "resnet18", image_size: int = 128, images_per_site: int = 256, sites: int = 3,
            rounds: int = 3, local_epochs: int = 1, evaluate_every: int = 1, cold_start: bool = False,
            keep: str = "", evaluate_separately: bool = False) -> dict:
    """Run one federation and split every round's time; medians over rounds 2+ (round 1 includes joining)."""
    data_root = os.environ.get("LEUK_DATA_ROOT")
    with tempfile.TemporaryDirectory(prefix="leuk-overhead-") as tmp:
        root = Path(keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        names = [f"h{i}" for i in range(sites)]
        fed = LoopbackFederation(root, names, model=model, image_size=image_size)
        folders = site_folders(root, sites, images_per_site, data_root)
        start = time.time()
        try:
            server = fed.server("--rounds", str(rounds), "--min-sites", str(sites), "--local-epochs",
                                str(local_epochs), "--pretrained", "none", "--evaluate-every", str(evaluate_every),
                                *(["--evaluate-separately"] if evaluate_separately else []))
            fed.wait_submitted()
            clients = [fed.client(name, folder, *(["--cold-start"] if cold_start else []))
                       for name, folder in zip(names, folders)]
            if fed.wait_server(server, clients, timeout=6 * 3600) != 0:
                raise LeukError("the federated run failed: " + fed.log("server.log")[-2000:])
            history = fed.history()
            split = [breakdown(row, previous) for previous, row in zip([None, *history], history)]
        finally:
            fed.close()
    steady = split[1:] or split
    return {"model": model, "image_size": image_size, "sites": sites, "images_per_site": images_per_site,
            "local_epochs": local_epochs, "evaluate_every": evaluate_every,
            "site_evaluation": "own message each round" if evaluate_separately else "in the next round's train task",
            "clientapp_start": "fresh process per task" if cold_start else "forked from an imported process",
            "data": "all_taleqani" if data_root else "generated", "rounds": split,
            "median_round_seconds": statistics.median(r["round_seconds"] for r in steady),
            "median_overhead_share": statistics.median(r["overhead_share"] for r in steady),
            "median_overhead_share_without_site_evaluation": statistics.median(
                r["overhead_share_without_site_evaluation"] for r in steady),
            "wall_seconds": round(time.time() - start, 1)}
