"""`leuk train / calibrate / predict --gallery --heatmap / evaluate` on patient folders, as a user runs them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cli_errors import assert_one_line_error, leuk
from leukfed.common.data import scan_dataset
from leukfed.common.errors import LeukError
from leukfed.common.gallery import GALLERY_KEY
from leukfed.common.inference import predict_paths
from leukfed.common.splits import make_split, save_split
from leukfed.common.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.slow   # one 1-epoch training and a handful of `leuk` processes, shared by the module

TOP = 4



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "patients", layout="patient_folders",
                                  per_class=48, size=40, patients_per_class=8, seed=2)


@pytest.fixture(scope="module")
def split(data: Path, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("split") / "split.json"
    save_split(make_split(scan_dataset(data), val_fraction=0.3, test_fraction=0.2, seed=0), path)
    return {"path": path, **json.loads(path.read_text())}


@pytest.fixture(scope="module")
def trained(data: Path, split: dict, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "trained"
    leuk("train", "--data", str(data), "--out", str(run), "--split", str(split["path"]), "--model", "tinycnn",
         "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu")
    return run


@pytest.fixture(scope="module")
def calibrated(trained: Path, data: Path, split: dict) -> tuple[Path, str]:
    run = trained.parent / "calibrated"
    shutil.copytree(trained, run)
    result = leuk("calibrate", "--model", str(run), "--data", str(data), "--split", str(split["path"]),
                  "--positive", "APL", "--target-sensitivity", "0.9", "--device", "cpu")
    return run, result.stdout


def val_patients(data: Path, split: dict) -> dict[str, str]:
    """Folder -> diagnosis of each validation patient."""
    rows = (data / "patients.csv").read_text().splitlines()
    diagnosis = dict(line.split(",")[:2] for line in rows[1:])
    return {str(data / pid): diagnosis[pid] for pid in sorted({p.split("/")[0] for p in split["val"]})}


@pytest.fixture(scope="module")
def predicted(calibrated: tuple[Path, str], data: Path, split: dict, tmp_path_factory) -> tuple[list[dict], Path]:
    gallery = tmp_path_factory.mktemp("gallery")
    result = leuk("predict", "--model", str(calibrated[0]), *val_patients(data, split), "--gallery", str(gallery),
                  "--heatmap", "--top", str(TOP), "--json", "--device", "cpu")
    return json.loads(result.stdout), gallery


def test_train_calibrates_on_its_own_validation_patients(trained: Path, split: dict) -> None:
    stored = json.loads((trained / "calibration.json").read_text())
    assert stored["level"] == "patient" and stored["subset"] == "val"
    assert stored["num_samples"] == len({p.split("/")[0] for p in split["val"]})
    assert stored["threshold"] is None and stored["positive"] is None   # `leuk train` names no positive class
    assert 0.05 <= stored["temperature"] <= 20 and stored["ece_bins"] == 15
    with Image.open(trained / "reliability.png") as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_the_stored_threshold_flags_the_validation_apl_patients(calibrated, predicted, data: Path, split: dict) -> None:
    run, stdout = calibrated
    stored = json.loads((run / "calibration.json").read_text())
    assert stored["positive"] == "APL" and stored["target_sensitivity"] == 0.9 and "threshold" in stdout
    truth = val_patients(data, split)
    assert "APL" in truth.values() and "AML" in truth.values()
    rows, _ = predicted
    assert {r["path"] for r in rows} == set(truth)
    for row in rows:
        decision = row["decision"]
        assert row["calibrated"] and decision["threshold"] == stored["threshold"]
        assert decision["flagged"] == (decision["probability"] >= stored["threshold"])
        assert row["predicted"] == ("APL" if decision["flagged"] else "AML")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    apl = [r for r in rows if truth[r["path"]] == "APL"]
    assert sum(r["decision"]["flagged"] for r in apl) / len(apl) >= 0.9
    evaluated = leuk("evaluate", "--model", str(run), "--data", str(data), "--split", str(split["path"]),
                     "--subset", "val", "--device", "cpu").stdout
    assert "at the stored threshold" in evaluated and f"sensitivity 100.0% ({len(apl)}/{len(apl)})" in evaluated


def tiles_of(png: Path) -> list[dict]:
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size[0] >= TOP * 200
        return json.loads(image.text[GALLERY_KEY])["tiles"]


def test_the_gallery_shows_the_patients_top_cells_and_their_grad_cam(predicted, calibrated) -> None:
    rows, gallery = predicted
    assert sorted(p.name for p in gallery.iterdir()) == sorted(
        name for r in rows for name in (Path(r["path"]).name + ".png", Path(r["path"]).name + ".gradcam.png"))
    row = rows[0]
    folder = Path(row["path"])
    tiles = tiles_of(Path(row["gallery"]))
    assert tiles == tiles_of(Path(row["heatmap"]))
    assert len(tiles) == TOP and all(Path(t["file"]).parent.parent == folder for t in tiles)
    weights = [t["weight"] for t in tiles]
    assert weights == sorted(weights, reverse=True)
    # The same cells come out on top when each cell is predicted on its own (P(APL) ranks them).
    cells = sorted(str(p) for p in folder.rglob("*.png"))
    alone = predict_paths(calibrated[0], cells, device="cpu")
    ranked = sorted(alone, key=lambda r: -r["probabilities"]["APL"])
    assert [t["file"] for t in tiles] == [r["path"] for r in ranked[:TOP]]


def test_a_corrupt_calibration_is_one_error_line(calibrated, data: Path) -> None:
    broken = calibrated[0].parent / "broken"
    shutil.copytree(calibrated[0], broken)
    (broken / "calibration.json").write_text('{"temperature": 1.0, ')
    patient = str(next(p for p in sorted(data.iterdir()) if p.is_dir()))
    assert_one_line_error(leuk("predict", "--model", str(broken), patient, "--device", "cpu", check=False),
                          "calibration.json", "unusable")


def test_a_heatmap_needs_a_gallery(calibrated, data: Path) -> None:
    with pytest.raises(LeukError, match="--gallery"):
        predict_paths(calibrated[0], [data / "Patient_00"], heatmap=True, device="cpu")
