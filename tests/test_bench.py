"""`leuk bench`: every quick measurement runs on a tiny setting and writes a complete JSON result.

No timing thresholds here (the machine is shared and noisy): only that each measurement runs, saves
the machine description, the command line and its figures, and that ratios are positive and finite.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from leukfed.common.flower.wire import array_view
from leukfed.simulations.bench import bench_app
from leukfed.simulations.bench.flops import gpu_peak_tflops
from leukfed.simulations.bench.measure import PERF_LOG, ModelSpec
from leukfed.simulations.bench.memory import TreeMemorySampler
from leukfed.simulations.bench.simulation_scale import slope, summarize_rounds

runner = CliRunner()
MACHINE_KEYS = {"cpu", "cores", "torch_threads", "gpu", "python", "torch", "flwr", "platform"}


def invoke(*args: str) -> str:
    result = runner.invoke(bench_app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def saved(out: Path, benchmark: str) -> dict:
    files = sorted(out.glob(f"{benchmark}-*.json"))
    assert len(files) == 1, files
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == benchmark
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["command"] and data["timestamp"] and "params" in data and "git" in data
    rows = [json.loads(line) for line in (out / PERF_LOG).read_text().splitlines()]
    mine = [r for r in rows if r["benchmark"] == benchmark]
    assert mine and all({"case", "metric", "value", "unit", "timestamp", "cpu"} <= set(r) for r in mine)
    return data


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_trainer_quick(tmp_path: Path) -> None:
    invoke("trainer", "--models", "tinycnn:16:4:1", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--out", str(tmp_path))
    data = saved(tmp_path, "trainer")
    (case,) = data["cases"]
    assert set(case["images_per_s"]) == {"reference", "ours", "train_epoch+per_item_DataLoader"}
    assert all(positive(v) for v in case["images_per_s"].values())
    assert positive(case["ratio_ours_to_reference"])
    assert positive(case["train_flops_per_image"]) and positive(data["measured_matmul_peak_tflops"])


def test_pipeline_quick(tmp_path: Path) -> None:
    invoke("pipeline", "--models", "tinycnn:16:4", "--images", "8", "--workers", "0,1", "--decode-threads", "1",
           "--source", "synthetic", "--repeats", "1", "--consume-steps", "1", "--threads", "1", "--out", str(tmp_path))
    data = saved(tmp_path, "pipeline")
    assert data["source"].startswith("synthetic")
    (case,) = data["cases"]
    assert {"decode threads=1", "per-item __getitem__ paper002 DataLoader workers=0",
            "per-item __getitem__ paper002 DataLoader workers=1"} <= set(case["images_per_s"])
    assert any(k.startswith("make_loader (ours)") for k in case["images_per_s"])
    assert positive(case["consumption_images_per_s"])
    assert all(positive(v) for v in case["ratio_pipeline_to_consumption"].values())


def test_aggregation_quick(tmp_path: Path) -> None:
    invoke("aggregation", "--model", "tinycnn", "--num-classes", "4", "--updates", "3", "--repeats", "1",
           "--materialised", "--out", str(tmp_path))
    data = saved(tmp_path, "aggregation")
    assert set(data["ratio_reference_to_case"]) == {
        "numpy_sum_reference", "flower_aggregate_arrayrecords", "reply_guard_fedavg (ours)",
        "reply_guard_fedavg without numba (numpy/torch loop)",          # numba comes with the test extra
        "reply_guard materialised path (before; robust strategies)"}
    assert all(positive(v) for v in data["ratio_reference_to_case"].values())
    assert all(v >= 0 for v in data["ours_breakdown_seconds_for_all_updates"].values())
    assert data["ours_vs_flower_max_abs_difference"] < 1e-5


def test_transfer_bytes(tmp_path: Path) -> None:
    invoke("transfer-bytes", "--models", "tinycnn", "--out", str(tmp_path))
    data = saved(tmp_path, "transfer-bytes")
    ratios = {c["transfer_dtype"]: c["ratio_to_float32"] for c in data["cases"]}
    assert set(ratios) == {"float32", "float16", "bfloat16"}
    assert all(positive(v) for v in ratios.values())
    assert ratios["float32"] >= 1.0 > ratios["float16"] and ratios["bfloat16"] < 1.0
    for case in data["cases"]:  # packed on the wire: a few objects instead of two per array, same bytes + index
        assert case["flower_objects_packed"] < case["flower_objects_unpacked"]
        assert case["encoded_bytes"] < case["wire_bytes"] < 1.05 * case["encoded_bytes"] + 1000


@pytest.mark.slow
def test_overhead_runs_a_real_federation_and_splits_each_round(tmp_path: Path) -> None:
    """Real leuk-server and leuk-client processes with TLS on loopback, tiny model."""
    invoke("overhead", "--model", "tinycnn", "--image-size", "16", "--images-per-site", "16", "--sites", "2",
           "--rounds", "2", "--out", str(tmp_path))
    data = saved(tmp_path, "overhead")
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    for r in data["rounds"]:
        assert 0 <= r["overhead_share"] <= 1 and r["round_seconds"] >= r["slowest_site_train_seconds"] > 0
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
    assert 0 <= data["median_overhead_share_without_site_evaluation"] <= data["median_overhead_share"] <= 1


@pytest.mark.parametrize("array", [
    np.zeros((4, 3, 3, 3), np.float32), np.arange(5, dtype=np.int64), np.array(7, dtype=np.int64),
    np.asfortranarray(np.arange(12, dtype=np.float16).reshape(4, 3)), np.zeros((0, 4), np.float32),
    np.arange(6, dtype=">f4").reshape(2, 3),
])
def test_array_view_matches_numpy(array: np.ndarray) -> None:
    from flwr.app import Array

    record = Array(array)
    view = array_view(record)   # what the aggregation reference reads the replies with
    expected = record.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape and np.array_equal(view, expected)


def test_memory_sampler_sees_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(80_000_000); x[::4096] = b'1' * len(x[::4096]); time.sleep(3)"])
    try:
        with TreeMemorySampler(interval=0.1) as sampler:
            time.sleep(1.5)
    finally:
        child.wait()
    assert max(s["procs"] for s in sampler.samples) >= 2
    alone = TreeMemorySampler().sample()["rss"]
    assert sampler.peak_rss >= alone + 60_000_000
    assert sampler.peak_pss > 0


def test_round_summary_and_slope() -> None:
    assert slope([1, 2, 3], [10.0, 12.0, 14.0]) == pytest.approx(2.0)
    assert slope([1], [5.0]) == 0.0
    sampler = TreeMemorySampler()
    sampler.samples = [{"t": 10.0 + i, "rss": (100 + i) * 2**20, "pss": 50 * 2**20, "procs": 3, "threads": 9}
                       for i in range(6)]
    history = [{"round": r, "time": 10.5 + r, "round_seconds": 2.0, "sites": {"1": {"train": {"train_seconds": 1.0,
                "load_seconds": 0.5}}}} for r in (1, 2, 3)]
    summary = summarize_rounds(history, sampler)
    assert [r["rss_after_round_mb"] for r in summary["rounds"]] == [102.0, 103.0, 104.0]
    assert summary["rss_slope_mb_per_round"] == pytest.approx(1.0)
    assert summary["pss_slope_mb_per_round"] == pytest.approx(0.0)
    assert summary["median_round_seconds"] == 2.0


def test_model_spec_parsing() -> None:
    spec = ModelSpec.parse("resnet18:128:32:3")
    assert (spec.name, spec.image_size, spec.batch, spec.steps) == ("resnet18", 128, 32, 3)
    assert ModelSpec.parse("tinycnn").batch == 32
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA L40S") == 362.0 and gpu_peak_tflops(None) is None


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("LEUK_BENCH_SIM"),
                    reason="a real Flower simulation (minutes on 2 cores); set LEUK_BENCH_SIM=1")
def test_simulation_scale_small(tmp_path: Path) -> None:
    invoke("simulation-scale", "--sites", "3", "--rounds", "2", "--image-size", "16", "--per-class", "100",
           "--out", str(tmp_path))
    data = saved(tmp_path, "simulation-scale")
    assert len(data["rounds"]) == 2 and positive(data["peak_rss_mb"]) and data["max_processes"] > 1
