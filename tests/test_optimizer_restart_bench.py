"""benchmarks/optimizer_restart.py without training: its rows resume and summarise as paired differences."""
from __future__ import annotations

from pathlib import Path

from benchmark_scripts import load_benchmark


def test_rows_resume_and_summarise_site_by_site(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("optimizer_restart", "optimizer_restart_bench")
    path = tmp_path / "rows.csv"
    values = {0: (0.90, 0.50), 1: (0.88, 0.60), 2: (0.92, 0.52)}
    bench.append_csv(path, bench.FIELDS, [
        {"cell": "inception_v3-iid", "seed": 2, "site": site, "optimizer": mode, "metric": "test_accuracy",
         "value": value, "command": "c", "finished": "t"}
        for site, pair in values.items() for mode, value in zip(bench.MODES, pair)])
    assert bench.done(path) == {("inception_v3-iid", 2, s, m) for s in values for m in bench.MODES}
    bench.main(["--summary", "--results", str(path)])
    line = capsys.readouterr().out.strip()
    assert line.startswith("inception_v3-iid seed 2: kept vs restarted: site 0 90.0 vs 50.0")
    assert "restarted − kept -36.0 points [" in line and "(paired t over 3 sites)" in line
