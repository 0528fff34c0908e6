"""`leuk simulate` run as a user runs it: a real subprocess, its output returned, a failure shown whole."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_simulate(out: Path, *args: str, timeout: float = 900) -> str:
    """`leuk simulate --out OUT ARGS...`; asserts it succeeded and returns what it printed (stdout + stderr)."""
    result = subprocess.run([sys.executable, "-c", "from leukfed.cli import main; main()", "simulate",
                             "--out", str(out), *args],
                            capture_output=True, text=True, env={**os.environ, "LEUK_NO_PROGRESS": "1"}, timeout=timeout)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    return printed
