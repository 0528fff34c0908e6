"""Where a federated round's time goes, on loopback with TLS: local training, client start-up, transfer,
aggregation, evaluation; and the federation overhead as a share of the round.

Usage (from the repository root):
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/federation_overhead.py \\
        [--model resnet18 --image-size 128 --images-per-site 256 --sites 3 --rounds 3]
Appends one row to benchmarks/results/federation_overhead.jsonl (with the machine and the command).
Each site gets `images-per-site` images of all_taleqani (links, not copies) or generated images.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from leukfed.common.data import scan_dataset
from leukfed.common.machine import machine_info
from leukfed.common.partition import partition_samples
from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.simulations.loopback import LoopbackFederation

RESULTS = Path(__file__).resolve().parent / "results" / "federation_overhead.jsonl"


def site_folders(root: Path, sites: int, per_site: int) -> list[Path]:
    """Per-site folders of symbolic links into the real dataset (stratified), or generated data."""
    data_root = os.environ.get("LEUK_DATA_ROOT")
    if not data_root:
        return [make_synthetic_dataset(root / f"data-{i}", per_class=per_site // 4, size=96, seed=i) for i in range(sites)]
    manifest = scan_dataset(Path(data_root) / "all_taleqani")
    parts = partition_samples(manifest, [s.path for s in manifest.samples], sites, "iid", seed=0)
    folders = []
    for i, part in enumerate(parts):
        folder = root / f"data-{i}"
        for path in part[:: max(1, len(part) // per_site)][:per_site]:  # every class, in its share
            link = folder / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(manifest.root / path)
        folders.append(folder)
    return folders


def breakdown(row: dict) -> dict:
    """One round's time split; `overhead` = round − slowest site's training − server evaluation."""
    sites = [s["train"] for s in row["sites"].values() if s["train"]]
    slowest_train = max(s.get("train_seconds", 0.0) for s in sites)
    slowest_client = max(s.get("client_seconds", 0.0) for s in sites)
    round_s = row["round_seconds"]
    train_phase = row["train_phase_seconds"]
    return {
        "round": row["round"], "round_seconds": round_s, "slowest_site_train_seconds": slowest_train,
        "client_startup_and_load_seconds": slowest_client - slowest_train,
        "transfer_and_scheduling_seconds": train_phase - slowest_client - row["aggregation_seconds"],
        "aggregation_seconds": row["aggregation_seconds"], "evaluate_phase_seconds": row["evaluate_phase_seconds"],
        "server_evaluate_seconds": row["server_evaluate_seconds"],
        "overhead_share": (round_s - slowest_train - row["server_evaluate_seconds"]) / round_s,
        # The sites' federated evaluation is work too; this share counts only what federation adds to training.
        "overhead_share_without_site_evaluation": (round_s - slowest_train - row["server_evaluate_seconds"]
                                                   - row["evaluate_phase_seconds"]) / round_s,
        "bytes_sent": row["bytes_sent"], "bytes_received": row["bytes_received"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images-per-site", type=int, default=256)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--evaluate-every", type=int, default=1, help="sites score the global model every N rounds")
    parser.add_argument("--cold-start", action="store_true", help="Flower's default: a fresh process per task")
    parser.add_argument("--keep", default="", help="work in this folder and keep it (logs, state, history)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leuk-overhead-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        names = [f"h{i}" for i in range(args.sites)]
        fed = LoopbackFederation(root, names, model=args.model, image_size=args.image_size)
        folders = site_folders(root, args.sites, args.images_per_site)
        start = time.time()
        try:
            server = fed.server("--rounds", str(args.rounds), "--min-sites", str(args.sites),
                                "--local-epochs", str(args.local_epochs), "--pretrained", "none",
                                "--evaluate-every", str(args.evaluate_every))
            fed.wait_submitted()
            for name, folder in zip(names, folders):
                fed.client(name, folder, *(["--cold-start"] if args.cold_start else []))
            if server.wait(timeout=6 * 3600) != 0:
                sys.exit("the federated run failed:\n" + fed.log("server.log"))
            rounds = [breakdown(row) for row in fed.history()]
        finally:
            fed.close()
    steady = rounds[1:] or rounds  # round 1 includes the sites' first connection
    row = {"benchmark": "federation_overhead", "model": args.model, "image_size": args.image_size,
           "sites": args.sites, "images_per_site": args.images_per_site, "local_epochs": args.local_epochs,
           "evaluate_every": args.evaluate_every, "clientapp_start": "cold" if args.cold_start else "warm",
           "data": "all_taleqani" if os.environ.get("LEUK_DATA_ROOT") else "generated", "rounds": rounds,
           "median_overhead_share": statistics.median(r["overhead_share"] for r in steady),
           "median_overhead_share_without_site_evaluation": statistics.median(
               r["overhead_share_without_site_evaluation"] for r in steady),
           "wall_seconds": round(time.time() - start, 1), "machine": machine_info(),
           "command": "python benchmarks/federation_overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    for r in rounds:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    print(f"median federation overhead (rounds 2+): {100 * row['median_overhead_share']:.1f}% of the round, "
          f"{100 * row['median_overhead_share_without_site_evaluation']:.1f}% without the sites' evaluation phase")


if __name__ == "__main__":
    main()
