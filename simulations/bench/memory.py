"""Memory of a whole process tree (a simulation's Ray workers included), sampled in a background thread."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from leukfed.common.flower.processes import descendants


def proc_field(pid: int, file: str, field: str) -> int:
    """The number after `field:` in /proc/PID/<file> (kB for sizes), 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


class TreeMemorySampler:
    """Samples the RSS (and PSS) sum of a process tree every `interval` s in a background thread."""

    def __init__(self, root: int | None = None, interval: float = 0.5) -> None:
        self.root = root or os.getpid()
        self.interval = interval
        self.samples: list[dict] = []     # {"t": time.time(), "rss": bytes, "pss": bytes, "procs": n}
        self.peak_processes: list[str] = []
        self.max_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def sample(self) -> dict:
        pids = [self.root, *descendants(self.root)]
        rss = sum(proc_field(p, "status", "VmRSS") for p in pids) * 1024
        pss = sum(proc_field(p, "smaps_rollup", "Pss") for p in pids) * 1024   # shared pages split
        threads = sum(proc_field(p, "status", "Threads") for p in pids)
        entry = {"t": time.time(), "rss": rss, "pss": pss, "procs": len(pids), "threads": threads}
        if not self.samples or rss > max(s["rss"] for s in self.samples):
            self.peak_processes = [f"{p} {command_of(p)}" for p in pids]
        self.max_threads = max(self.max_threads, threads)
        self.samples.append(entry)
        return entry

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_rss(self) -> int:
        return max((s["rss"] for s in self.samples), default=0)

    @property
    def peak_pss(self) -> int:
        return max((s["pss"] for s in self.samples), default=0)

    def at(self, when: float) -> dict | None:
        """The first sample taken at or after `when` (the memory just after that moment)."""
        later = [s for s in self.samples if s["t"] >= when]
        return later[0] if later else (self.samples[-1] if self.samples else None)
