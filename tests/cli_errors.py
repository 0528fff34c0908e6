"""CLI test helpers: `leuk` run as a user runs it, and the one assertion about bad input (exit 2, one line)."""
from __future__ import annotations

import os
import subprocess
import sys

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]


def leuk(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`leuk ARGS` in a subprocess without progress bars; with `check`, a failure raises with its output."""
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    result = subprocess.run([*LEUK, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"leuk {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit code 2, one `error:` line naming the problem (each of `needles`), no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
