"""What every `leuk bench` measurement shares: interleaved timing, medians, result files and tables."""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import typer

from leukfed.common.errors import LeukError

DEFAULT_OUT = Path("benchmarks/results")
PERF_LOG = "perf.jsonl"


def out_option(help_text: str = "Folder for the JSON result and perf.jsonl."):
    return typer.Option(DEFAULT_OUT, "--out", help=help_text)


# -- timing -------------------------------------------------------------------------------------

def median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(cases: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every case `warmup` times, then `repeats` rounds in a rotating order; each case times itself.

    Rotating the order means slow drifts of a noisy machine (other jobs starting, thermal) hit
    every case alike, and the medians compare like with like.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(float(cases[name]()))
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repeats of times[numerator][r] / times[denominator][r].

    Cases of one repeat run back to back, so a slow drift of a shared machine (other jobs coming
    and going) cancels in each pair; the median of the pairs is steadier than a ratio of medians.
    """
    return median(a / b for a, b in zip(times[numerator], times[denominator]))


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer sees all of it."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch
        torch.set_num_threads(threads)


# -- results ------------------------------------------------------------------------------------

def command_line() -> str:
    """The exact command line (`python -m leukfed.simulations.bench` shows as such, not as a path)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bench":
        argv = [sys.executable, "-m", "leukfed.simulations.bench", *argv[1:]]
    return shlex.join(argv)


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append rows, one JSON object a line (the long-format results under benchmarks/results/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        for entry in rows:
            log.write(json.dumps(entry, default=str) + "\n")


def append_csv(path: Path, fields: Sequence[str], rows: Iterable[dict]) -> None:
    """Append long-format rows to a CSV results file, writing its header when the file is new."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def recorded_keys(path: Path, *columns: str) -> set[tuple[str, ...]]:
    """The distinct values of `columns` over the rows of a CSV results file (what a resumed benchmark skips)."""
    import csv

    if not path.exists():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        return {tuple(row[c] for c in columns) for row in csv.DictReader(f)}


def recorded_experiments(path: Path) -> set[str]:
    """The `experiment` of every row already in a results file (what a resumed benchmark skips)."""
    if not path.exists():
        return set()
    return {json.loads(line)["experiment"] for line in path.read_text().splitlines() if line.strip()}


def pending_experiments(names: Iterable[str], only: Sequence[str] | None, results: Path) -> list[str]:
    """The experiments still to run: those asked for (all when none) without a row in `results` yet."""
    done = recorded_experiments(results)
    return [name for name in names if (not only or name in only) and name not in done]


def experiment_parser(description: str, choices: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line every resumable benchmark script (benchmarks/*.py) shares: --only and --list."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=choices, help="experiments to run (default: all not yet done)")
    parser.add_argument("--list", action="store_true", help="list experiments and exit")
    return parser


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def row(case: str, metric: str, value: float | int | None, unit: str) -> dict:
    return {"case": case, "metric": metric, "value": value, "unit": unit}


def save_result(benchmark: str, params: dict, result: dict, rows: list[dict], out: Path) -> Path:
    """One JSON file per run plus long-format rows (benchmark, case, metric, value, unit) in perf.jsonl."""
    from leukfed.common.atomic import atomic_write_json   # numpy and torch: only when a result is saved
    from leukfed.common.machine import git_state, machine_info

    now = datetime.now(timezone.utc)
    machine = machine_info()
    git = git_state()
    payload = {"benchmark": benchmark, "timestamp": now.isoformat(timespec="seconds"),
               "command": command_line(), "params": params, "machine": machine, "git": git, **result}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    atomic_write_json(path, payload)
    common = {"timestamp": payload["timestamp"], "benchmark": benchmark, "git_commit": git["commit"],
              "git_dirty": git["dirty"], "cpu": machine["cpu"], "cores": machine["cores"],
              "gpu": machine["gpu"], "torch_threads": machine["torch_threads"]}
    append_jsonl(out / PERF_LOG, ({**common, **entry} for entry in rows))
    return path


def format_table(headers: Sequence[str], body: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            if not math.isfinite(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "-" if v is None else str(v)
    text = [[cell(v) for v in r] for r in body]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(lines)


def report(benchmark: str, params: dict, result: dict, rows: list[dict], out: Path) -> dict:
    """Save the result and say where: the last step of every sub-command."""
    typer.echo(f"saved {save_result(benchmark, params, result, rows, out)}")
    return result


# -- what a measurement runs on -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """`name:image_size:batch[:steps]` on the command line (image size 0: the model's default)."""

    name: str
    image_size: int
    batch: int
    steps: int | None = None

    @classmethod
    def parse(cls, text: str, default_steps: int | None = None) -> "ModelSpec":
        parts = text.split(":")
        try:
            name = parts[0]
            size = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            batch = int(parts[2]) if len(parts) > 2 and parts[2] else 32
            steps = int(parts[3]) if len(parts) > 3 and parts[3] else default_steps
        except ValueError:
            raise LeukError(f"bad model spec {text!r}; use name:image_size:batch[:steps]") from None
        if batch < 1 or (steps is not None and steps < 1):
            raise LeukError(f"bad model spec {text!r}: batch and steps must be >= 1")
        return cls(name, size, batch, steps)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.image_size or 'default'}px/b{self.batch}"
