"""Where a federated round's time goes, on loopback with TLS: local training, client start-up, transfer,
aggregation, evaluation; and the federation overhead as a share of the round.

Usage (from the repository root):
    LEUK_DATA_ROOT=../shared/datasets python benchmarks/federation_overhead.py \\
        [--model resnet18 --image-size 128 --images-per-site 256 --sites 3 --rounds 3] [--cold-start] [--evaluate-separately]
Appends one row to benchmarks/results/federation_overhead.jsonl (with the machine and the command).
The same measurement: `leuk bench overhead` (simulations/overhead.py).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from leukfed.common.cli_support import run_guarded
from leukfed.common.machine import git_state, machine_info
from leukfed.simulations.bench.measure import append_jsonl, utc_now
from leukfed.simulations.overhead import measure

RESULTS = Path(__file__).resolve().parent / "results" / "federation_overhead.jsonl"


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
    parser.add_argument("--evaluate-separately", action="store_true",
                        help="Flower's default: site evaluation in a message of its own each round")
    parser.add_argument("--keep", default="", help="work in this folder and keep it (logs, state, history)")
    args = parser.parse_args()
    result = measure(args.model, args.image_size, args.images_per_site, args.sites, args.rounds, args.local_epochs,
                     args.evaluate_every, args.cold_start, args.keep, args.evaluate_separately)
    row = {"benchmark": "federation_overhead", **result, "machine": machine_info(), "git": git_state(),
           "command": "python benchmarks/federation_overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "finished": utc_now()}
    append_jsonl(RESULTS, [row])
    for r in result["rounds"]:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    print(f"median federation overhead (rounds 2+): {100 * row['median_overhead_share']:.1f}% of the round, "
          f"{100 * row['median_overhead_share_without_site_evaluation']:.1f}% without the sites' evaluation phase")


if __name__ == "__main__":
    run_guarded(main)
