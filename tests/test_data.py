"""Tests for dataset scanning, checking and image loading (leukfed.common.data, data_layouts, data_check, images, patients_table)."""

from __future__ import annotations

import csv
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.data_check import check_dataset, format_check_report
from leukfed.common.data_layouts import detect_layout
from leukfed.common.images import load_image
from leukfed.common.patients_table import read_patients_table
from leukfed.common.errors import LeukError

MakeImage = Callable[..., Path]

# ---------------------------------------------------------------- layouts


def test_class_folders_layout(class_dataset: Path) -> None:
    m = scan_dataset(class_dataset)
    assert m.layout == "class_folders"
    assert m.class_names == ("A", "B", "C")
    assert [s.path for s in m.samples] == sorted(s.path for s in m.samples)
    counts = {c: sum(s.label == c for s in m.samples) for c in m.class_names}
    assert counts == {"A": 4, "B": 3, "C": 2}
    assert "A/sub/a4.jpeg" in m.paths()
    assert not any(".hidden" in p or ".git" in p for p in m.paths())
    assert not m.has_patients()
    assert m.labels().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert all(len(s.sha256) == 64 for s in m.samples)


def test_digest_is_stable_and_tracks_content(class_dataset: Path, make_image: MakeImage) -> None:
    first = scan_dataset(class_dataset).digest()
    assert scan_dataset(class_dataset).digest() == first
    make_image(class_dataset / "C" / "c1.png", seed=99)
    assert scan_dataset(class_dataset).digest() != first


def test_hash_cache_skips_unchanged_files_and_sees_changed_ones(class_dataset: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    """A site's next task (a fresh process) hashes only what changed; a file changed around the cache's
    writing (same size and mtime, the racy case) is hashed again; a corrupt cache is ignored."""
    import os

    from leukfed.common import data

    hour_ago = time.time_ns() - 3600 * 10**9
    for image in class_dataset.rglob("*"):
        if image.is_file():
            os.utime(image, ns=(hour_ago, hour_ago))
    plain = scan_dataset(class_dataset)
    read: list[str] = []
    real = data._sha256_file
    monkeypatch.setattr(data, "_sha256_file", lambda path: (read.append(path.name), real(path))[1])
    assert scan_dataset(class_dataset, tmp_path) == plain and len(read) == len(plain)
    read.clear()
    assert scan_dataset(class_dataset, tmp_path) == plain and read == []          # nothing read again
    changed = class_dataset / plain.samples[0].path
    changed.write_bytes(changed.read_bytes() + b"\0")
    assert scan_dataset(class_dataset, tmp_path).samples[0].sha256 != plain.samples[0].sha256 and read == [changed.name]
    stat = changed.stat()                                                   # changed within 2 s of the cache:
    read.clear()
    assert scan_dataset(class_dataset, tmp_path) and read == [changed.name]  # it may change again unseen
    changed.write_bytes(bytes(b ^ 0xFF for b in changed.read_bytes()))      # as it does: same size, mtime kept
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert scan_dataset(class_dataset, tmp_path).samples[0].sha256 == data._sha256_file(changed)[0]
    for cache in tmp_path.glob("file-hashes-*.json"):
        cache.write_text("{not json")
    assert scan_dataset(class_dataset, tmp_path).samples[2] == plain.samples[2]


def test_patient_folders_layout(patient_dataset: Path) -> None:
    m = scan_dataset(patient_dataset)
    assert m.layout == "patient_folders"
    assert m.class_names == ("AML", "APL")
    assert m.has_patients()
    by_patient = {s.patient: s.label for s in m.samples}
    assert by_patient == {"Patient_00": "APL", "Patient_01": "AML", "Patient_02": "AML"}
    assert dict(m.samples[0].meta) == {"cell_type": "Blast"}
    assert len(m) == 9


def test_patients_table_header_variants(tmp_path: Path) -> None:
    table = tmp_path / "patients.csv"
    table.write_text("Age;Patient ID;Diagnosis\n30;P1;APL\n40;P2; AML \n\n")
    assert read_patients_table(table) == {"P1": "APL", "P2": "AML"}


def test_cnmc_layout(cnmc_dataset: Path) -> None:
    m = scan_dataset(cnmc_dataset)
    assert m.layout == "cnmc"
    assert m.class_names == ("all", "hem")
    subjects = {s.path.rsplit("/", 1)[1]: s.patient for s in m.samples}
    assert subjects["UID_11_1_1_all.bmp"] == "11"
    assert subjects["UID_H10_1_1_hem.bmp"] == "H10"
    assert subjects["UID_h3_4_1_hem.bmp"] == subjects["UID_H3_9_2_hem.bmp"] == "H3"
    assert all((s.label == "hem") == s.patient.startswith("H") for s in m.samples if s.patient)
    assert dict(m.samples[0].meta) == {"fold": "fold_0"}
    assert m.has_patients()
    report = check_dataset(cnmc_dataset)
    assert report["num_patients"] == 7 - 1  # H3 occurs in two folds
    assert report["problems"] == []


def test_cnmc_label_mismatch_is_reported(cnmc_dataset: Path, make_image: MakeImage) -> None:
    make_image(cnmc_dataset / "fold_1" / "all" / "UID_H5_1_1_hem.bmp", seed=50)
    report = check_dataset(cnmc_dataset)
    assert any("disagree with their folder" in p for p in report["problems"])


# ---------------------------------------------------------------- bad input


def _error(fn: Any, *args: Any) -> str:
    with pytest.raises(LeukError) as info:
        fn(*args)
    return str(info.value)


def test_missing_and_non_folder_roots(tmp_path: Path) -> None:
    assert "not found" in _error(scan_dataset, tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    assert "not a folder" in _error(scan_dataset, tmp_path / "file.txt")
    assert "not found" in _error(check_dataset, tmp_path / "nope")


def test_empty_and_imageless_roots(tmp_path: Path) -> None:
    assert "no images found" in _error(scan_dataset, tmp_path)
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "notes.txt").write_text("x")
    assert "no images found" in _error(scan_dataset, tmp_path)


def test_empty_class_folder(class_dataset: Path) -> None:
    (class_dataset / "D").mkdir()
    assert _error(scan_dataset, class_dataset).startswith("class 'D' has no images")
    report = check_dataset(class_dataset)  # reported, not raised
    assert report["classes"]["D"] == 0
    assert "class 'D' has no images" in report["problems"]
    assert report["ok"] is False


def test_patients_table_missing(patient_dataset: Path) -> None:
    (patient_dataset / "patients.csv").unlink()
    assert "patients table missing" in _error(scan_dataset, patient_dataset)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("patient,cohort\nPatient_00,x\n", "no diagnosis column"),
        ("", "is empty"),
        ('patient,diagnosis\n"Patient_00,APL\n', "cannot parse"),
        ("patient,diagnosis\nPatient_00,APL\nPatient_01,AML\nPatient_02,\n", "'Patient_02' has no diagnosis"),
        ("patient,diagnosis\nPatient_00,APL\nPatient_01,AML\n", "patient 'Patient_02' has no diagnosis"),
        ("patient,diagnosis\nPatient_00,APL\nPatient_00,AML\n", "two diagnoses"),
    ],
)
def test_bad_patients_table(patient_dataset: Path, content: str, message: str) -> None:
    (patient_dataset / "patients.csv").write_text(content)
    assert message in _error(scan_dataset, patient_dataset)


def test_undecodable_patients_table(patient_dataset: Path) -> None:
    (patient_dataset / "patients.csv").write_bytes(b"\xff\xfe\x00garbage\x9c")
    assert "patients table" in _error(scan_dataset, patient_dataset)


# ---------------------------------------------------------------- images


def _rgb_array(path: Path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_load_grey_and_bilevel(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 77).save(tmp_path / "l.png")
    Image.new("1", (4, 3), 1).save(tmp_path / "one.png")
    assert (_rgb_array(tmp_path / "l.png") == 77).all()
    assert (_rgb_array(tmp_path / "one.png") == 255).all()


def test_load_alpha_composites_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (2, 2), (0, 128)).save(tmp_path / "la.png")
    out = _rgb_array(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 3].tolist() == [255, 0, 0]
    assert np.abs(_rgb_array(tmp_path / "la.png").astype(int) - 127).max() <= 1


def test_load_palette(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert _rgb_array(tmp_path / "p.png")[0, 0].tolist() == [10, 200, 30]
    pal.save(tmp_path / "pt.png", transparency=1)
    assert _rgb_array(tmp_path / "pt.png")[0, 0].tolist() == [255, 255, 255]


def test_load_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 30, 40)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert np.abs(_rgb_array(tmp_path / "c.jpg").astype(int) - [200, 30, 40]).max() < 12


def test_load_16_bit_scales_to_8_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert _rgb_array(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 1, 128, 255]
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "deep.tif")
    assert _rgb_array(tmp_path / "deep.tif")[0, :, 1].tolist() == [0, 1, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert _rgb_array(tmp_path / "float.tif")[0, :, 2].tolist() == [0, 128, 255]


def test_load_rejects_corrupt_truncated_and_missing(tmp_path: Path, make_image: MakeImage) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg at all")
    good = make_image(tmp_path / "good.jpg", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("junk.jpg", "cut.jpg"):
        message = _error(load_image, tmp_path / name)
        assert name in message and "\n" not in message
    assert "truncated" in _error(load_image, tmp_path / "cut.jpg")
    assert "not found" in _error(load_image, tmp_path / "missing.png")
    assert load_image(good).size == (64, 64)


# ---------------------------------------------------------------- check


def test_check_lists_corrupt_truncated_non_images_and_duplicates(
    class_dataset: Path, make_image: MakeImage
) -> None:
    good = make_image(class_dataset / "B" / "big.jpg", size=(64, 64), seed=40)
    (class_dataset / "B" / "cut.jpg").write_bytes(good.read_bytes()[:600])
    (class_dataset / "C" / "junk.png").write_bytes(b"\x89PNG garbage")
    (class_dataset / "C" / "notes.txt").write_text("hello")
    (class_dataset / "stray.csv").write_text("a,b\n")
    shutil.copyfile(class_dataset / "A" / "a1.jpg", class_dataset / "A" / "a1_copy.jpg")
    report = check_dataset(class_dataset)
    assert report["unreadable"] == ["B/cut.jpg", "C/junk.png"]
    assert "truncated" in report["unreadable_reasons"]["B/cut.jpg"].lower()
    assert report["non_image_files"] == ["C/notes.txt", "stray.csv"]
    assert report["duplicate_groups"] == 1
    assert report["duplicates"] == [["A/a1.jpg", "A/a1_copy.jpg"]]
    assert report["num_images"] == 13
    assert report["ok"] is False
    assert any("cannot be decoded" in p for p in report["problems"])
    assert any("non-image" in p for p in report["problems"])
    assert report["image_sizes"]["12x10"] == 10
    assert report["num_patients"] is None and report["images_per_patient"] is None
    text = format_check_report(report)
    assert "unreadable: B/cut.jpg" in text and "class_folders" in text


def test_check_without_decoding_skips_truncation(class_dataset: Path, make_image: MakeImage) -> None:
    good = make_image(class_dataset / "B" / "big.jpg", size=(64, 64), seed=40)
    (class_dataset / "B" / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert check_dataset(class_dataset)["unreadable"] == ["B/cut.jpg"]
    assert check_dataset(class_dataset, verify_images=False)["unreadable"] == []


def test_check_patient_report(patient_dataset: Path) -> None:
    (patient_dataset / "patients.csv").write_text(
        "patient,diagnosis\nPatient_00,APL\nPatient_01,AML\nPatient_02,AML\nPatient_09,AML\n"
    )
    report = check_dataset(patient_dataset)
    assert report["ok"] is True
    assert report["classes"] == {"AML": 6, "APL": 3}
    assert report["num_patients"] == 3
    assert report["patients_per_class"] == {"AML": 2, "APL": 1}
    assert report["images_per_patient"] == {"min": 2, "median": 3, "max": 4}
    assert any("Patient_09" in p for p in report["problems"])
    assert "per patient" in format_check_report(report)


def test_layout_detection_without_table(tmp_path: Path, make_image: MakeImage) -> None:
    make_image(tmp_path / "Patient_1" / "Blast" / "x.png")
    assert detect_layout(tmp_path) == "patient_folders"
    assert "patients table missing" in _error(scan_dataset, tmp_path)


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def taleqani_report(data_root: Path) -> dict[str, Any]:
    return _timed_check(data_root / "all_taleqani")


@pytest.fixture(scope="module")
def apl_report(data_root: Path) -> dict[str, Any]:
    return _timed_check(data_root / "apl_aml")


def _timed_check(root: Path) -> dict[str, Any]:
    start = time.perf_counter()
    report = check_dataset(root)
    report["_seconds"] = time.perf_counter() - start
    return report


@pytest.mark.realdata
def test_real_taleqani_check(taleqani_report: dict[str, Any]) -> None:
    r = taleqani_report
    assert r["layout"] == "class_folders"
    assert r["num_images"] == 2768
    assert r["classes"] == {"Benign": 435, "Early": 821, "Pre": 825, "Pro": 687}
    assert r["num_patients"] is None
    assert r["duplicate_groups"] == 35 and r["duplicate_files"] == 70
    assert all(p.startswith("Pro/") for group in r["duplicates"] for p in group)
    assert ["Pro/WBC-Malignant-Pro-011.jpg", "Pro/WBC-Malignant-Pro-012.jpg"] in r["duplicates"]
    assert r["unreadable"] == [] and r["non_image_files"] == []
    assert r["image_sizes"] == {"224x224": 2768}
    assert r["_seconds"] < 30


@pytest.mark.realdata
def test_real_apl_aml_check(apl_report: dict[str, Any]) -> None:
    r = apl_report
    assert r["layout"] == "patient_folders"
    assert r["num_images"] == 12133
    assert r["num_patients"] == 82
    assert r["patients_per_class"] == {"AML": 60, "APL": 22}
    assert r["images_per_patient"]["min"] == 52 and r["images_per_patient"]["max"] == 526
    assert r["unreadable"] == [] and r["ok"] is True
    assert r["_seconds"] < 40


@pytest.mark.realdata
def test_real_hashes_match_shipped_manifests(taleqani_manifest: Manifest, apl_manifest: Manifest) -> None:
    for m in (taleqani_manifest, apl_manifest):
        with open(m.root / "MANIFEST.csv", newline="") as fh:
            shipped = {row["path"]: row["sha256"] for row in csv.DictReader(fh)}
        assert {s.path: s.sha256 for s in m.samples} == shipped


@pytest.mark.realdata
def test_real_apl_aml_cell_types(apl_manifest: Manifest) -> None:
    assert len(apl_manifest) == 12133
    cell_types = {dict(s.meta)["cell_type"] for s in apl_manifest.samples}
    assert len(cell_types) == 18  # the README says 21; this copy's folders hold 18
    assert {s.label for s in apl_manifest.samples if s.patient == "Patient_00"} == {"APL"}


# ---------------------------------------------------------------- decoded-image cache (a site's rounds)


def test_image_cache_serves_later_processes_and_tracks_images_and_size(class_dataset: Path, make_image: MakeImage,
                                                                         tmp_path: Path) -> None:
    from leukfed.common.dataset import IMAGE_CACHE_ENTRIES, build_dataset
    from leukfed.models import resolve_data_config

    cache = tmp_path / "image-cache"
    manifest = scan_dataset(class_dataset)
    paths = list(manifest.paths())
    config = resolve_data_config("tinycnn", 16)
    decoded = build_dataset(manifest, paths, config, train=False).images
    first = build_dataset(manifest, paths, config, train=False, cache_dir=cache).images
    assert torch_equal(first, decoded)
    [entry] = cache.glob("decoded-*.npy")
    assert entry.stat().st_mode & 0o777 == 0o600  # decoded copies of patient images: owner-only

    # A later build reads the cache file (proved by planting other pixels of the same shape there).
    np.save(entry, np.full(tuple(first.shape), 7, dtype=np.uint8))
    assert int(build_dataset(manifest, paths, config, train=False, cache_dir=cache).images.max()) == 7
    # A damaged cache file is decoded anew and replaced.
    entry.write_bytes(b"not a numpy file")
    assert torch_equal(build_dataset(manifest, paths, config, train=False, cache_dir=cache).images, decoded)

    # Changed image content or another input size: another entry, never stale pixels.
    make_image(class_dataset / "C" / "c1.png", seed=123)
    changed = scan_dataset(class_dataset)
    fresh = build_dataset(changed, paths, config, train=False).images
    assert torch_equal(build_dataset(changed, paths, config, train=False, cache_dir=cache).images, fresh)
    for size in (20, 24, 28, 32):
        build_dataset(changed, paths, resolve_data_config("tinycnn", size), train=False, cache_dir=cache)
    assert len(list(cache.glob("decoded-*.npy"))) == IMAGE_CACHE_ENTRIES


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_a_training_loader_never_ends_on_a_single_image_batchnorm_cannot_train_on() -> None:
    """A site with 33 training images at batch 32 crashed a model with BatchNorm1d in its head
    (efficientnet_b0_attn: "Expected more than 1 value per channel when training")."""
    import torch
    from torch import nn

    from leukfed.common.dataset import SmearDataset, make_loader
    from leukfed.common.train import make_loss, make_optimizer, select_hardware, train_epoch
    from leukfed.models import create_model

    config = create_model("tinycnn", 2).leuk_info.data_config
    images = torch.randint(0, 256, (33, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    dataset = SmearDataset(images, np.arange(33) % 2, config, train=True, augment="flip")
    loader = make_loader(dataset, 32, shuffle=True, seed=0)
    assert len(loader) == 1 and [len(y) for _, y in loader] == [32]
    assert [len(y) for _, y in make_loader(dataset, 32, shuffle=False)] == [32, 1]   # scoring sees every image
    assert [len(y) for _, y in make_loader(dataset, 16, shuffle=True)] == [16, 16]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    stats = train_epoch(model, loader, make_optimizer(model, "adam", 1e-3), make_loss("ce", 2), select_hardware("cpu"))
    assert stats.num_examples == 32
