"""benchmarks/papers.py without training: every cell's settings validate, and the table renders from a
results file with finished and missing cells."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from leukfed.models import resolve_data_config
from leukfed.simulations.config import SimulateConfig

@pytest.fixture(scope="module")
def papers():
    return load_benchmark("papers", "papers_bench")


def test_every_cell_builds_a_valid_config(papers, tmp_path):
    assert len(papers.CELLS) == 2 * len(papers.MODELS) == 14
    assert set(papers.TABLE_ORDER) == set(papers.MODELS)
    for name in papers.CELLS:
        cfg = papers.config_for(name, tmp_path, papers.CELLS, tmp_path / "runs")
        assert isinstance(cfg, SimulateConfig)
        assert cfg.data == str(tmp_path / "all_taleqani") and cfg.out == str(tmp_path / "runs" / name)
        assert cfg.seed_list() == (0, 1, 2) and cfg.seed == 0 and cfg.sites == 4
        assert cfg.strategies == ("fedavg",)
        assert cfg.partition == ("iid" if name.endswith("-iid") else "dirichlet:0.5")
        assert cfg.baselines == name.endswith("-iid")    # Dirichlet pairs with the iid cell's centralized
        resolve_data_config(cfg.model, cfg.image_size or None)   # a known model at a size it accepts
        assert cfg.pretrained == ("package" if cfg.model == "efficientnet_lite0" else "none")
    assert papers.config_for("dscnet-iid", tmp_path, papers.CELLS).bn_recalibration == 50
    assert papers.config_for("inception_v3-iid", tmp_path, papers.CELLS).image_size >= 75


def test_the_papers_sizes_are_a_grid_of_their_own_that_needs_a_gpu(papers, tmp_path, monkeypatch):
    assert set(papers.PAPER_CELLS) == {f"{m}-{p}-{px}px" for m, px in (
        ("dscnet", 224), ("vgg16", 224), ("efficientnet_b0_attn", 224), ("efficientnet_lite0", 224),
        ("inception_v3", 299)) for p in ("iid", "dirichlet0.5")}
    for name, spec in papers.PAPER_CELLS.items():
        cfg = papers.config_for(name, tmp_path, papers.PAPER_CELLS, tmp_path / "runs")
        assert cfg.image_size == int(name.rsplit("-", 1)[1].removesuffix("px")) and cfg.gpus_per_site == 0.25
        cpu = papers.CELLS[name.rsplit("-", 1)[0]]
        assert {k: v for k, v in spec.items() if k not in ("image_size", "gpus_per_site")} == \
            {k: v for k, v in cpu.items() if k not in ("image_size", "gpus_per_site")}   # only the size differs
    assert papers.selected(["dscnet"], "paper") == ["dscnet-iid-224px", "dscnet-dirichlet0.5-224px"]
    table = papers.render_table(tmp_path / "none", None, tmp_path / "none", size="paper")
    assert "`resnet50`" not in table and "`smallcnn`" not in table and "--only dscnet-iid-224px" in table
    assert "| 224 px, 15×1 ep" in table and "| 299 px, 10×1 ep" in table
    if not papers.gpu_present():                  # CI's machines: a clear refusal, not days of CPU training
        monkeypatch.setenv("LEUK_DATA_ROOT", str(tmp_path))
        with pytest.raises(SystemExit, match="need a GPU"):
            papers.main(["--size", "paper", "--only", "dscnet", "--results", str(tmp_path / "r.jsonl")])


def test_list_and_only(papers, tmp_path, capsys):
    papers.main(["--list", "--results", str(tmp_path / "none.jsonl"), "--elsewhere", str(tmp_path / "none.jsonl"),
                 "--seed-results", str(tmp_path / "none.jsonl")])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [*papers.CELLS, *papers.REMEDY_CELLS]
    assert all("not run" in line for line in listed)
    assert papers.selected(["dscnet", "vgg16-iid"]) == ["dscnet-iid", "dscnet-dirichlet0.5", "vgg16-iid"]


def _across(values):
    from leukfed.common.stats import across_seeds
    return {"accuracy": across_seeds(values)}


def _row(name, methods, split="abc", seeds=(0, 1, 2)):
    return {"experiment": name, "methods": {m: {"across_seeds": _across(v), "sample_passes": 1, "seconds": 1.0}
                                            for m, v in methods.items()},
            "seeds": list(seeds), "split_sha256": split, "test_images": 415, "overrides": {}}


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_table_marks_missing_cells_not_run(papers, tmp_path):
    iid = _row("smallcnn-iid", {"federated-fedavg": [0.80, 0.82, 0.84], "centralized": [0.90, 0.91, 0.92],
                                "local-site-0": [0.70, 0.75, 0.72], "local-site-1": [0.78, 0.71, 0.70],
                                "local-site-2": [0.60, 0.60, 0.60], "local-site-3": [0.65, 0.66, 0.67]})
    def seed_row(name, seed, **accuracies):
        return {"experiment": name, "seed": seed,
                "results": {"methods": {m.replace("_", "-"): {"final": {"accuracy": a}} for m, a in accuracies.items()}}}
    seeds = _write(tmp_path / "seeds.jsonl", [
        seed_row("dscnet-dirichlet0.5", 0, federated_fedavg=0.612),
        seed_row("vgg16-iid", 0, federated_fedavg=0.5, centralized=0.7, local_site_0=0.4, local_site_1=0.45),
        seed_row("vgg16-iid", 1, federated_fedavg=0.55, centralized=0.75, local_site_0=0.5, local_site_1=0.4)])
    table = papers.render_table(_write(tmp_path / "papers.jsonl", [iid]), elsewhere=None, seed_results=seeds)
    lines = table.splitlines()
    assert lines[0].startswith("| paper | model |") and len(lines[2:2 + len(papers.MODELS)]) == 7
    row = next(line for line in lines if "`smallcnn`" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "97.6 %"
    assert cells[4].startswith("91.0 [")                       # centralized mean [95 % CI]
    assert cells[5].startswith("82.0 [") and "Δ -9.0" in cells[5]
    assert cells[6] == "not run: `python benchmarks/papers.py --only smallcnn-dirichlet0.5`"
    assert cells[7].startswith("75.0 [")                       # per seed the best site: 0.78, 0.75, 0.72
    dscnet = next(line for line in lines if "`dscnet`" in line)
    assert dscnet.count("not run") == 3 and "--only dscnet-iid" in dscnet and "99.85 %" in dscnet
    assert "seed 0: 61.2 (1 of 3 seeds; the rest: `python benchmarks/papers.py --only dscnet-dirichlet0.5`)" in dscnet
    vgg16 = [c.strip() for c in next(line for line in lines if "`vgg16`" in line).strip("|").split("|")]
    rest = "(2 of 3 seeds; the rest: `python benchmarks/papers.py --only vgg16-iid`)"
    assert vgg16[4:] == [f"seed 0: 70.0, seed 1: 75.0 {rest}", f"seed 0: 50.0, seed 1: 55.0 {rest}",
                         "not run: `python benchmarks/papers.py --only vgg16-dirichlet0.5`",
                         f"seed 0: 45.0, seed 1: 50.0 {rest}"]   # per seed the best site alone
    for claim in ("99.42 %", "94 %", "94.06 % val"):
        assert claim in table


def test_dirichlet_pairs_with_the_iid_centralized_only_on_the_same_split(papers, tmp_path):
    iid = _row("resnet50-iid", {"federated-fedavg": [0.9, 0.9, 0.9], "centralized": [0.95, 0.96, 0.97]})
    same = _row("resnet50-dirichlet0.5", {"federated-fedavg": [0.85, 0.86, 0.87]})
    row = next(line for line in papers.render_table(_write(tmp_path / "a.jsonl", [iid, same]), seed_results=tmp_path / "none").splitlines()
               if "`resnet50`" in line)
    assert "86.0" in row and "Δ -10.0" in row
    other = _row("resnet50-dirichlet0.5", {"federated-fedavg": [0.85, 0.86, 0.87]}, split="other")
    row = next(line for line in papers.render_table(_write(tmp_path / "b.jsonl", [iid, other]), seed_results=tmp_path / "none").splitlines()
               if "`resnet50`" in line)
    assert "not paired" in row and "Δ -10.0" not in row


def test_a_remedy_cell_is_the_iid_cell_with_one_change_paired_with_its_fedavg(papers, tmp_path):
    for name, spec in papers.REMEDY_CELLS.items():
        model, change = name.split("-iid-")
        iid = papers.CELLS[f"{model}-iid"]
        assert spec == {**iid, "baselines": False, **papers.REMEDIES[change][1]}   # FedAvg only, one change
        cfg = papers.config_for(name, tmp_path, papers.ALL_CELLS)
        assert cfg.local_optimizer_state is change.startswith("keep-optimizer")
        assert cfg.bn_recalibration == (50 if change == "bn-recalibration" else iid.get("bn_recalibration", 0))
        assert cfg.baselines is (change == "bn-recalibration")   # it changes the centralized model too
        assert cfg.bn_statistics_round == (50 if change == "bn-statistics-round" else 0)
        assert cfg.strategies == (("fedavgm",) if change.endswith("fedavgm") else ("fedavg",))
    iid = _row("inception_v3-iid", {"federated-fedavg": [0.80, 0.84, 0.79], "centralized": [0.97, 0.97, 0.97]})
    kept = _row("inception_v3-iid-keep-optimizer", {"federated-fedavg": [0.95, 0.96, 0.94]})
    table = papers.render_remedies(_write(tmp_path / "a.jsonl", [iid, kept]), tmp_path / "none")
    row = next(line for line in table.splitlines() if "`inception_v3`" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith("97.0") and "Δ vs centralized -16.0" in cells[3]
    assert cells[4].startswith("95.0 [") and "Δ vs centralized -2.0" in cells[4]
    assert cells[5].startswith("Δ +14.0")                       # paired with the iid cell's FedAvg, seed by seed
    assert "`smallcnn`" not in table                              # no iid cell to compare with yet
    momentum = _row("inception_v3-iid-fedavgm", {"federated-fedavgm": [0.90, 0.91, 0.92]})
    table = papers.render_remedies(_write(tmp_path / "m.jsonl", [iid, momentum]), tmp_path / "none")
    row = next(line for line in table.splitlines() if "`inception_v3`" in line and "FedAvgM" in line)
    assert "91.0 [" in row and "Δ +10.0" in row                 # the cell's one strategy, paired with FedAvg
    other = _row("inception_v3-iid-keep-optimizer", {"federated-fedavg": [0.95, 0.96, 0.94]}, split="other")
    table = papers.render_remedies(_write(tmp_path / "b.jsonl", [iid, other]), tmp_path / "none")
    assert "not paired" in table and "Δ +14.0" not in table


def test_overrides_are_typed_and_kept_out_of_the_grid_results(papers, tmp_path):
    assert papers.parse_overrides(["sites=2", "rounds=1", "seeds=0,1", "baselines=false", "lr=0.01"]) == \
        {"sites": 2, "rounds": 1, "seeds": "0,1", "baselines": False, "lr": 0.01}
    with pytest.raises(SystemExit):
        papers.main(["--only", "smallcnn-iid", "--override", "rounds=1"])   # would write the grid's file
    with pytest.raises(SystemExit):
        papers.parse_overrides(["no_such_setting=1"])


def test_a_cell_that_federated_py_ran_with_the_same_settings_is_reused(papers, tmp_path, capsys):
    import dataclasses

    config = dataclasses.asdict(papers.config_for("efficientnet_lite0-dirichlet0.5", Path("/x"), papers.CELLS))
    config = {k: v for k, v in config.items() if k != "local_batchnorm"}   # a row from before the setting existed
    wider = dict(config, strategies=["fedavg", "fedprox"], baselines=True, out="/elsewhere/run")
    row = dict(_row("taleqani-dirichlet-3seeds", {"federated-fedavg": [0.95, 0.96, 0.97],
                                                  "centralized": [0.99, 0.99, 0.99]}, split=None),
               config=wider, command="python benchmarks/federated.py --only taleqani-dirichlet-3seeds")
    other = dict(row, experiment="other", config=dict(wider, lr=0.01), command="python other")
    elsewhere = _write(tmp_path / "federated.jsonl", [row, other])
    assert set(papers.measured_elsewhere(elsewhere)) == {"efficientnet_lite0-dirichlet0.5"}
    table = papers.render_table(tmp_path / "none.jsonl", elsewhere, tmp_path / "none.jsonl")
    lite0 = next(line for line in table.splitlines() if "`efficientnet_lite0`" in line)
    assert "96.0 [" in lite0 and "Δ -3.0" in lite0       # paired with the same row's own centralized
    assert "--only taleqani-dirichlet-3seeds" in table and "python other" not in table
    papers.main(["--list", "--results", str(tmp_path / "none.jsonl"), "--elsewhere", str(elsewhere),
                 "--seed-results", str(tmp_path / "none.jsonl")])
    listed = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()}
    assert listed["efficientnet_lite0-dirichlet0.5"] == ["done", "(federated.py)"]


def test_federated_py_tables_a_multi_seed_row_and_reads_the_sites_validation():
    federated = load_benchmark("federated", "federated_bench")
    row = _row("x-3seeds", {"federated-fedavg": [0.80, 0.82, 0.84], "centralized": [0.90, 0.91, 0.92]})
    lines = federated.seeds_table(row).splitlines()
    assert lines[2].startswith("| federated-fedavg | 82.00 ± 2.00 [") and "(80.00, 82.00, 84.00)" in lines[2]
    assert "-9.00 pp [" in lines[2] and lines[3].endswith("| 0 |")
    with pytest.raises(SystemExit):
        federated.seeds_table({"experiment": "one", "methods": {"centralized": {"accuracy": 0.9}}})
    history = [{"round": 1, "evaluate": {}}, {"round": 10, "evaluate": {"eval_accuracy": 0.7}},
               {"round": 40, "evaluate": {"eval_accuracy": 0.75}}, {"round": 41, "evaluate": {}}]
    assert federated.site_validation_accuracy(history) == 0.75 and federated.site_validation_accuracy([]) is None


def test_federated_py_compares_single_seed_runs_on_their_saved_predictions(tmp_path, monkeypatch):
    import numpy as np

    from leukfed.common.stats import Predictions, save_predictions

    federated = load_benchmark("federated", "federated_bench")
    labels = np.arange(40) % 2
    rows = []
    for name, right in (("base", 30), ("better", 38)):
        proba = np.eye(2)[np.where(np.arange(40) < right, labels, 1 - labels)]
        paths = tuple(f"img{i}.png" for i in range(40))
        save_predictions(tmp_path / "runs" / name / "predictions" / "federated-fedavg" / "global-test.npz",
                         Predictions(proba, labels, ("a", "b"), paths, (None,) * 40))
        rows.append({"experiment": name, "methods": {"federated-fedavg": {"site_validation_accuracy": right / 40}}})
    monkeypatch.setattr(federated, "RESULTS", _write(tmp_path / "federated.jsonl", rows))
    lines = federated.compare_runs(["base", "better"], tmp_path / "runs", resamples=200).splitlines()
    assert lines[2].startswith("| `base` | 75.0 [") and lines[2].endswith("| 75.0 | reference |")
    assert lines[3].startswith("| `better` | 95.0 [") and "+20.00 pp [" in lines[3]
    with pytest.raises(SystemExit):
        federated.compare_runs(["base", "missing"], tmp_path / "runs")


def test_federated_py_compares_multi_seed_runs_seed_by_seed(tmp_path, monkeypatch):
    federated = load_benchmark("federated", "federated_bench")
    rows = [_row("plain-3seeds", {"federated-fedavg": [0.80, 0.70, 0.90]}),
            _row("fedbn-3seeds", {"federated-fedavg": [0.90, 0.81, 0.99]})]
    monkeypatch.setattr(federated, "RESULTS", _write(tmp_path / "federated.jsonl", rows))
    lines = federated.compare_runs(["plain-3seeds", "fedbn-3seeds"], tmp_path / "runs").splitlines()
    assert lines[2].startswith("| `plain-3seeds` | 80.00 ± 10.00 [") and lines[2].endswith("| reference |")
    assert "(90.00, 81.00, 99.00)" in lines[3] and "+10.00 pp [" in lines[3]   # paired: 10, 11, 9 points


@pytest.mark.slow
def test_a_cell_resumes_seed_by_seed_from_the_recorded_seeds(tmp_path):
    """A real (tiny) cell: each finished seed is recorded with its scores; on another machine (a fresh
    runs folder) the cell trains only the seeds not recorded and tables the same figures."""
    import os
    import subprocess
    import sys

    from leukfed.common.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data" / "all_taleqani", per_class=12, size=24, seed=5)
    seeds_file = tmp_path / "seeds.jsonl"

    def run_cell(runs: str, results: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "LEUK_DATA_ROOT": str(tmp_path / "data"), "LEUK_NO_PROGRESS": "1"}
        found = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "papers.py"), "--only", "smallcnn-iid",
             "--runs", str(tmp_path / runs), "--results", str(tmp_path / results), "--seed-results", str(seeds_file),
             "--override", "model=tinycnn", "image_size=24", "sites=2", "rounds=1", "batch_size=16", "seeds=0,1",
             "baselines=false", "bootstrap=50", "evaluate_every=1"],
            capture_output=True, text=True, env=env, timeout=600)
        assert found.returncode == 0, found.stdout + found.stderr
        return found

    run_cell("runs-a", "a.jsonl")
    rows = [json.loads(line) for line in seeds_file.read_text().splitlines()]
    assert [(r["experiment"], r["seed"]) for r in rows] == [("smallcnn-iid", 0), ("smallcnn-iid", 1)]
    assert all("history" not in m for r in rows for m in r["results"]["methods"].values())
    first = json.loads((tmp_path / "a.jsonl").read_text())
    seeds_file.write_text(json.dumps(rows[0]) + "\n")          # seed 1 was cut short: only seed 0 landed

    resumed = run_cell("runs-b", "b.jsonl")
    assert "seed 0: recorded in" in resumed.stdout and "not trained again" in resumed.stdout
    assert not (tmp_path / "runs-b" / "smallcnn-iid" / "seed-0" / "methods").exists()   # nothing trained for seed 0
    assert (tmp_path / "runs-b" / "smallcnn-iid" / "seed-1" / "methods").exists()
    assert [json.loads(line)["seed"] for line in seeds_file.read_text().splitlines()] == [0, 1]
    again = json.loads((tmp_path / "b.jsonl").read_text())
    accuracy = again["methods"]["federated-fedavg"]["across_seeds"]["accuracy"]
    assert accuracy["values"] == first["methods"]["federated-fedavg"]["across_seeds"]["accuracy"]["values"]
    assert again["seeds"] == [0, 1]


def test_every_recorded_seed_still_matches_its_cell(papers, tmp_path):
    """A setting added to the product since a seed was recorded (at its default) must not make the grid
    train that seed again: each committed row still matches its cell's settings."""
    import dataclasses

    rows = papers.recorded_seeds(papers.SEED_RESULTS)
    assert rows, "benchmarks/results/papers-seeds.jsonl holds the grid's finished seeds"
    for name, seeds in rows.items():
        cfg = papers.config_for(name, tmp_path, papers.ALL_CELLS, tmp_path / "runs")
        for seed, row in seeds.items():
            settings = papers.seed_settings(dataclasses.replace(cfg, seeds="", seed=seed))
            assert papers.same_settings(row["settings"], settings), (name, seed)
            assert not papers.same_settings(row["settings"], {**settings, "server_momentum": 0.9})
            assert papers.short_of_compute(row["results"]) is None, (name, seed)    # every site, every round


def test_a_recorded_seed_with_a_failed_site_is_not_taken(papers):
    """A seed whose federated run lost a site for rounds trained fewer sample passes: it is trained again."""
    rows = papers.recorded_seeds(papers.SEED_RESULTS)
    results = rows["efficientnet_b0_attn-iid"][0]["results"]
    fedavg = results["methods"]["federated-fedavg"]
    one_site_one_round = sum(results["partition"][2]["train"].values())
    dropped = {**results, "methods": {**results["methods"], "federated-fedavg": {
        **fedavg, "sample_passes": fedavg["sample_passes"] - one_site_one_round}}}
    assert papers.short_of_compute(dropped) == (f"federated-fedavg trained {fedavg['sample_passes'] - one_site_one_round}"
                                                f" of {fedavg['sample_passes']} sample passes")


@pytest.mark.slow
def test_a_benchmark_stopped_with_sigterm_leaves_no_flower_process(tmp_path):
    """`kill` of a benchmark mid-run stops the simulation's SuperLink, SuperExec, Ray and ClientApp actors too
    (they held gigabytes after the script had gone), and the stop is one line, not a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from leukfed.common.flower.processes import _alive, descendants
    from leukfed.common.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data" / "all_taleqani", per_class=12, size=24, seed=5)
    output = tmp_path / "output.txt"
    env = {**os.environ, "LEUK_DATA_ROOT": str(tmp_path / "data"), "LEUK_NO_PROGRESS": "1"}
    with output.open("w") as sink:
        run = subprocess.Popen(
            [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "papers.py"), "--only", "smallcnn-iid",
             "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "r.jsonl"), "--seed-results",
             str(tmp_path / "s.jsonl"), "--override", "model=tinycnn", "image_size=24", "sites=2", "rounds=200",
             "batch_size=16", "seeds=0", "baselines=false", "bootstrap=0", "evaluate_every=50"],
            stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while "round 1/200" not in output.read_text() and time.monotonic() < deadline and run.poll() is None:
                time.sleep(0.5)
            assert "round 1/200" in output.read_text(), output.read_text()[-2000:]
            tree = descendants(run.pid)
            names = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in tree
                             if Path(f"/proc/{pid}/cmdline").exists())
            assert "flwr-simulation" in names and "superlink" in names     # Flower's processes were running
            run.send_signal(signal.SIGTERM)
            assert run.wait(timeout=90) == 143
        finally:
            if run.poll() is None:
                run.kill()
    deadline = time.monotonic() + 10
    while any(map(_alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in tree if _alive(pid)]
    assert "Traceback" not in output.read_text()
