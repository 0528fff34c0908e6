"""The one assertion every CLI test makes about bad input: exit code 2 and one `error:` line."""
from __future__ import annotations

import subprocess


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Bad input: exit code 2, one `error:` line naming the problem (each of `needles`), no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
