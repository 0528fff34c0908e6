"""benchmarks/bn_statistics.py on a real `leuk simulate --seeds` run: it reproduces each method's recorded test
accuracy with the saved statistics, recomputes them over the method's own images, and resumes."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from simulate_cli import run_simulate

pytestmark = pytest.mark.slow


def test_each_saved_model_is_rescored_with_its_statistics_saved_and_recomputed(tmp_path: Path, capsys) -> None:
    cell = tmp_path / "runs" / "smallcnn-iid"          # the layout benchmarks/papers.py leaves, seed 1 of 2
    run_simulate(cell, "--synthetic-per-class", "40", "--partition", "iid", "--sites", "2", "--rounds", "1",
                 "--seeds", "0,1", "--model", "tinycnn", "--image-size", "24", "--batch-size", "16", "--bootstrap", "0")
    bench = load_benchmark("bn_statistics", "bn_statistics_bench")
    rows_file = tmp_path / "rows.csv"
    args = ["--cells", "smallcnn-iid", "--seeds", "1", "--runs", str(tmp_path / "runs"), "--results", str(rows_file),
            "--batches", "3"]
    bench.main(args)
    rows = list(csv.DictReader(rows_file.open()))
    recorded = json.loads((cell / "seed-1" / "results.json").read_text())["methods"]
    methods = {"centralized", "federated-fedavg", "local-site-0", "local-site-1"}
    assert {r["method"] for r in rows} == methods == set(recorded)
    assert len(rows) == len(methods) * 2 * 2                        # saved/recomputed x val/test
    for r in rows:
        assert int(r["batches"]) == 3                               # tinycnn has BatchNorm: recomputed over 3 batches
        if r["statistics"] == "saved" and r["side"] == "test":      # as trained: the grid's own figure
            assert float(r["accuracy"]) == pytest.approx(recorded[r["method"]]["final"]["accuracy"], abs=1e-6)
    out = capsys.readouterr().out
    assert "| smallcnn-iid | federated-fedavg | 1 |" in out and "| smallcnn-iid (federated-fedavg) |" in out
    bench.main(args)                                                # resumes: nothing rescored twice
    assert len(list(csv.DictReader(rows_file.open()))) == len(rows)
    assert "test" not in capsys.readouterr().out.split("| cell |")[0]
