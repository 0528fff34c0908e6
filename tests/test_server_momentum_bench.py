"""benchmarks/server_momentum.py without training: its rows resume and rank each choice by its last round."""
from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


def test_rows_resume_and_rank_the_choices_by_their_last_round(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("server_momentum", "server_momentum_bench")
    path = tmp_path / "rows.csv"
    curves = {(0.0, 1.0): (0.70, 0.80), (0.5, 1.0): (0.90, 0.85), (0.9, 0.5): (0.60, 0.88)}
    bench.append_csv(path, bench.FIELDS, [
        {"cell": "smallcnn-iid", "seed": 0, "momentum": m, "rate": r, "round": rnd, "metric": "site_val_accuracy",
         "value": value, "command": "c", "finished": "t"}
        for (m, r), values in curves.items() for rnd, value in zip((30, 60), values)])
    assert bench.done(path) == {("smallcnn-iid", 0, m, r) for m, r in curves}
    bench.main(["--summary", "--results", str(path)])
    line = capsys.readouterr().out.strip()
    assert line == ("smallcnn-iid seed 0, sites' validation accuracy at the last round: momentum 0.9 rate 0.5 88.0, "
                    "momentum 0.5 rate 1 85.0, momentum 0 rate 1 (FedAvg) 80.0")
    with pytest.raises(SystemExit, match="MOMENTUM:RATE"):
        bench.parse_choice("0.5")
