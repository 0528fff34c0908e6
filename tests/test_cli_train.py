"""`leuk train / evaluate / predict / data` as a user runs them: real processes on generated images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cli_errors import assert_one_line_error, leuk
from leukfed.common.synthetic import make_synthetic_dataset

TRAIN = ["--model", "tinycnn", "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--device", "cpu"]



@pytest.fixture(scope="module")
def smear_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "smears", per_class=20, size=40, seed=1)


@pytest.fixture(scope="module")
def trained_run(smear_data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    leuk("train", "--data", str(smear_data), "--out", str(run), *TRAIN)
    return run


def test_train_writes_a_complete_run_directory(trained_run: Path) -> None:
    for name in ("model.safetensors", "model.json", "metrics.json", "history.json", "checkpoint.safetensors",
                 "curves.png", "confusion_matrix.png", "split.json"):
        assert (trained_run / name).stat().st_size > 0, name
    description = json.loads((trained_run / "model.json").read_text())
    assert description["model"] == "tinycnn"
    assert description["class_names"] == ["Benign", "Early", "Pre", "Pro"]
    assert description["pretrained_source"].startswith("none")
    assert description["data_config"]["input_size"] == [3, 32, 32]
    assert len(description["manifest_digest"]) == 64 and len(description["split_digest"]) == 64
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"Benign", "Early", "Pre", "Pro"}
    assert len(json.loads((trained_run / "history.json").read_text())) == 2


def test_evaluate_on_the_runs_split_reproduces_its_test_metrics(trained_run: Path, smear_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = leuk("evaluate", "--model", str(trained_run), "--data", str(smear_data),
                  "--split", str(trained_run / "split.json"), "--out", str(out), "--device", "cpu")
    assert "sensitivity" in result.stdout
    evaluated = json.loads(out.read_text())
    saved = json.loads((trained_run / "metrics.json").read_text())
    assert evaluated["confusion_matrix"] == saved["confusion_matrix"]
    assert evaluated["accuracy"] == pytest.approx(saved["accuracy"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "auc_ovr", "confusion_matrix", "class_names"):
        assert key in evaluated


def test_predict_images_and_patient_folders(trained_run: Path, smear_data: Path) -> None:
    image = sorted((smear_data / "Pro").iterdir())[0]
    rows = json.loads(leuk("predict", "--model", str(trained_run), str(image), str(smear_data / "Benign"),
                           "--json", "--device", "cpu").stdout)
    assert [r["kind"] for r in rows] == ["image", "patient"]
    assert rows[1]["num_images"] == 20
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)
    csv_out = leuk("predict", "--model", str(trained_run), str(image), "--csv", "--device", "cpu").stdout
    assert csv_out.splitlines()[0] == "path,kind,num_images,predicted,Benign,Early,Pre,Pro"


def test_same_seed_same_metrics(smear_data: Path, trained_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    leuk("train", "--data", str(smear_data), "--out", str(again), *TRAIN)
    first = json.loads((trained_run / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert first["confusion_matrix"] == second["confusion_matrix"]
    assert first["log_loss"] == pytest.approx(second["log_loss"], abs=1e-6)


def test_resume_continues_an_interrupted_run(smear_data: Path, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumable"
    shutil.copytree(trained_run, run)
    refused = leuk("train", "--data", str(smear_data), "--out", str(run), *TRAIN, check=False)
    assert_one_line_error(refused, "--resume")
    more = [*TRAIN[:-6], "--epochs", "3", *TRAIN[-4:]]
    leuk("train", "--data", str(smear_data), "--out", str(run), *more, "--resume")
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    changed = leuk("train", "--data", str(smear_data), "--out", str(run), *more, "--lr", "0.5", "--resume", check=False)
    assert_one_line_error(changed, "lr")


def test_data_check_json_reports_duplicates_and_bad_files(smear_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(smear_data, data)
    first = sorted((data / "Pre").iterdir())[0]
    shutil.copy(first, data / "Pre" / "copy.png")
    (data / "Early" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "Early" / "notes.txt").write_text("not an image")
    report = json.loads(leuk("data", "check", str(data), "--json").stdout)
    assert report["num_images"] == 82  # broken.jpg counts as an image file, listed as unreadable
    assert report["num_patients"] is None
    assert report["duplicate_groups"] == 1
    assert any("broken.jpg" in p for p in report["unreadable"])
    refused = leuk("train", "--data", str(data), "--out", str(tmp_path / "r"), *TRAIN, check=False)
    assert_one_line_error(refused, "--skip-bad")
    leuk("train", "--data", str(data), "--out", str(tmp_path / "r2"), *TRAIN, "--skip-bad")
    assert (tmp_path / "r2" / "model.safetensors").exists()


def test_bad_inputs_get_one_line_errors(smear_data: Path, trained_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "classless"
    shutil.copytree(smear_data, no_images)
    shutil.rmtree(no_images / "Pro")
    three_classes = tmp_path / "three"
    shutil.copytree(no_images, three_classes)
    (no_images / "Pro").mkdir()
    cases = [
        (["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "not found"),
        (["train", "--data", str(empty), "--out", str(tmp_path / "x")], "no images"),
        (["train", "--data", str(no_images), "--out", str(tmp_path / "x")], "Pro"),
        (["train", "--data", str(smear_data), "--out", str(tmp_path / "x"), "--model", "alexnet"], "unknown model"),
        (["train", "--data", str(smear_data), "--out", str(tmp_path / "x"), "--model", "inception_v3",
          "--image-size", "32"], "inception_v3"),
        (["train", "--data", str(smear_data), "--out", str(tmp_path / "x"), "--model", "resnet18", "--image-size", "32",
          "--weights", str(trained_run / "model.safetensors")], "fit"),
        (["evaluate", "--model", str(trained_run), "--data", str(three_classes)], "classes differ"),
        (["predict", "--model", str(tmp_path / "no-run"), str(smear_data)], "not found"),
    ]
    for name, content in (("latin1", "{\"model\": \"caf\xe9\"}".encode("latin-1")), ("list", b"[1, 2]")):
        damaged = tmp_path / f"run-{name}"                   # a model description damaged by hand
        shutil.copytree(trained_run, damaged)
        (damaged / "model.json").write_bytes(content)
        cases.append((["predict", "--model", str(damaged), str(smear_data)], "model"))
    for args, needle in cases:
        assert_one_line_error(leuk(*args, check=False), needle)


def test_mode_conversions_do_not_crash_training(tmp_path: Path) -> None:
    data = tmp_path / "modes"
    for label, mode in (("A", "L"), ("B", "RGBA"), ("C", "P"), ("D", "I;16")):
        folder = data / label
        folder.mkdir(parents=True)
        for i in range(6):
            value = 40 * i + 10
            image = Image.new("RGB", (24, 24), (value, 255 - value, 128))
            if mode == "I;16":
                image = Image.new("I;16", (24, 24), value * 200)
            else:
                image = image.convert(mode)
            image.save(folder / f"{label}{i}.png")
    leuk("train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_samples"] > 0
