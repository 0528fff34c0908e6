"""Shared fixtures: the real-data root, and small image folders generated in tmp_path."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.synthetic import make_synthetic_dataset

MakeImage = Callable[..., Path]


def write_image(
    path: Path, *, mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0, **save: object
) -> Path:
    """Write a small noise image in `mode` (format from the suffix); distinct seeds give distinct files."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


@pytest.fixture
def make_image() -> MakeImage:
    return write_image


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real datasets ($LEUK_DATA_ROOT); tests that need them skip without it."""
    value = os.environ.get("LEUK_DATA_ROOT")
    if not value or not Path(value).is_dir():
        pytest.skip("LEUK_DATA_ROOT not set: real-data test needs the shared datasets")
    return Path(value)


@pytest.fixture(scope="session")
def taleqani_manifest(data_root: Path) -> Manifest:
    return scan_dataset(data_root / "all_taleqani")


@pytest.fixture(scope="session")
def apl_manifest(data_root: Path) -> Manifest:
    return scan_dataset(data_root / "apl_aml")


@pytest.fixture
def class_dataset(tmp_path: Path) -> Path:
    """`A`(4) `B`(3) `C`(2) images in mixed formats, a root MANIFEST.csv and README, a hidden file."""
    root = tmp_path / "classes"
    files = [
        "A/a1.jpg", "A/a2.JPG", "A/a3.png", "A/sub/a4.jpeg",
        "B/b1.bmp", "B/b2.tif", "B/b3.TIFF",
        "C/c1.png", "C/c2.Png",
    ]
    for seed, rel in enumerate(files):
        write_image(root / rel, seed=seed)
    (root / "MANIFEST.csv").write_text("path,class\n")
    (root / "README.md").write_text("about\n")
    (root / "A" / ".hidden.jpg").write_bytes(b"not an image")
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"")
    return root


@pytest.fixture
def patient_dataset(tmp_path: Path) -> Path:
    """Three patients (two AML, one APL) with cell-type folders and a patients.csv."""
    root = tmp_path / "patients"
    layout = {"Patient_00": ("Blast", 3), "Patient_01": ("Lymphocyte", 2), "Patient_02": ("Blast", 4)}
    seed = 0
    for patient, (cell, n) in layout.items():
        for i in range(n):
            seed += 1
            write_image(root / patient / cell / f"{cell[:2].upper()}_{i}.jpg", seed=seed)
    (root / "patients.csv").write_text(
        "patient,diagnosis,cohort\nPatient_00,APL,Discovery\nPatient_01,AML,Discovery\nPatient_02,AML,Discovery\n"
    )
    return root


@pytest.fixture
def cnmc_dataset(tmp_path: Path) -> Path:
    """C-NMC-like: two folds, ALL subjects numbered, normal subjects `H` (one written `h3`)."""
    root = tmp_path / "cnmc"
    files = [
        "fold_0/all/UID_11_1_1_all.bmp",
        "fold_0/all/UID_11_2_1_all.bmp",
        "fold_0/all/UID_7_1_2_all.bmp",
        "fold_0/hem/UID_H10_1_1_hem.bmp",
        "fold_0/hem/UID_h3_4_1_hem.bmp",
        "fold_1/all/UID_12_3_1_all.bmp",
        "fold_1/hem/UID_H3_9_2_hem.bmp",
        "fold_1/hem/UID_H22_1_1_hem.bmp",
    ]
    for seed, rel in enumerate(files):
        write_image(root / rel, seed=seed)
    return root


@pytest.fixture(scope="session")
def synthetic_classes(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Synthetic 4-class dataset (40 per class) plus byte-identical copies (pairs and one triple)."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "cf", per_class=40, size=24, seed=3)
    copies = {
        "Pro/Pro_0001.png": ["Pro/Pro_copy_a.png"],
        "Pro/Pro_0002.png": ["Pro/Pro_copy_b.png", "Pro/Pro_copy_c.png"],
        "Benign/Benign_0005.png": ["Benign/Benign_copy.png"],
        "Early/Early_0007.png": ["Early/Early_copy.png"],
    }
    for source, targets in copies.items():
        for target in targets:
            shutil.copyfile(root / source, root / target)
    return scan_dataset(root)


@pytest.fixture(scope="session")
def synthetic_patients(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Synthetic APL/AML patient-folder dataset: 12 patients per diagnosis, 60 cells per diagnosis."""
    root = tmp_path_factory.mktemp("synthetic") / "pf"
    make_synthetic_dataset(
        root, layout="patient_folders", per_class=60, patients_per_class=12, size=24, seed=5
    )
    return scan_dataset(root)


@pytest.fixture(autouse=True)
def hospital_share_source():
    """After each test, sites read a hospital's own folder again: importing the simulation's ClientApp
    (tests/inprocess_federation.py) switches this process's sites to the simulation's partition file."""
    yield
    from leukfed.common.site import hospital_share, use_share_source

    use_share_source(hospital_share)


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital's folder for the real ClientApp: patient folders, so there are patient IDs and cell-type
    names that must not leave the site."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("site") / "hospital", per_class=12, size=24,
                                  layout="patient_folders", classes=("AML", "APL"), patients_per_class=3)
