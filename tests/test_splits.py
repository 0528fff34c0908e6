"""Tests for leak-free stratified splits (leukfed.common.splits)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from leukfed.common.data import Manifest, scan_dataset
from leukfed.common.errors import LeukError
from leukfed.common.splits import SIDES, Split, load_split, make_split, save_split, split_summary


def _side_of(split: Split) -> dict[str, str]:
    return {p: side for side in SIDES for p in split.side(side)}


def _assert_no_leak(split: Split, m: Manifest) -> None:
    """Every sample on exactly one side; identical files and patients never on two sides."""
    side = _side_of(split)
    assert sorted(side) == sorted(m.paths())
    assert sum(len(split.side(s)) for s in SIDES) == len(m)
    by_sha: dict[str, set[str]] = defaultdict(set)
    by_patient: dict[str, set[str]] = defaultdict(set)
    for s in m.samples:
        by_sha[s.sha256].add(side[s.path])
        if s.patient is not None and split.method.endswith("patient"):
            by_patient[s.patient].add(side[s.path])
    assert all(len(sides) == 1 for sides in by_sha.values())
    assert all(len(sides) == 1 for sides in by_patient.values())


def test_split_is_stratified_and_groups_duplicates(synthetic_classes: Manifest) -> None:
    m = synthetic_classes
    split = make_split(m, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert split.method == "stratified:image"
    _assert_no_leak(split, m)
    summary = split_summary(split, m)
    for c in m.class_names:
        total = sum(summary[side]["classes"][c] for side in SIDES)
        assert total == sum(s.label == c for s in m.samples)
        for side, fraction in (("val", 0.2), ("test", 0.2)):
            assert abs(summary[side]["classes"][c] - fraction * total) <= 2


def test_split_is_deterministic_per_seed(synthetic_classes: Manifest) -> None:
    a = make_split(synthetic_classes, seed=7)
    assert make_split(synthetic_classes, seed=7) == a
    assert make_split(synthetic_classes, seed=8).test != a.test


def test_patient_split_keeps_patients_whole(synthetic_patients: Manifest) -> None:
    m = synthetic_patients
    for seed in range(5):
        split = make_split(m, val_fraction=0.25, test_fraction=0.25, seed=seed)
        assert split.method == "stratified:patient"
        _assert_no_leak(split, m)
        summary = split_summary(split, m)
        for side in ("val", "test"):
            assert summary[side]["patients_per_class"] == {"AML": 3, "APL": 3}


def test_block_grouping_keeps_neighbouring_numbers_together(synthetic_classes: Manifest) -> None:
    split = make_split(synthetic_classes, seed=1, group_by="block:5")
    assert split.method == "stratified:block:5"
    side = _side_of(split)
    blocks: dict[tuple[str, int], set[str]] = defaultdict(set)
    for s in synthetic_classes.samples:
        number = re.search(r"_(\d+)\.png$", s.path)
        if number:
            blocks[(s.label, int(number.group(1)) // 5)].add(side[s.path])
    assert len(blocks) == 4 * 8
    assert all(len(sides) == 1 for sides in blocks.values())
    _assert_no_leak(split, synthetic_classes)


def test_zero_validation_fraction(synthetic_classes: Manifest) -> None:
    split = make_split(synthetic_classes, val_fraction=0.0, test_fraction=0.3)
    assert split.val == () and len(split.test) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": -0.1}, "val_fraction must be in"),
        ({"test_fraction": 1.0}, "test_fraction must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
        ({"group_by": "patient"}, "needs patient ids"),
        ({"group_by": "block:x"}, "block size"),
        ({"group_by": "subject"}, "unknown group_by"),
    ],
)
def test_bad_split_arguments(synthetic_classes: Manifest, kwargs: dict, message: str) -> None:
    with pytest.raises(LeukError, match=message):
        make_split(synthetic_classes, **kwargs)


def test_too_few_groups(patient_dataset: Path) -> None:
    make_split(scan_dataset(patient_dataset), val_fraction=0.3, test_fraction=0.3)  # three patients suffice
    shutil.rmtree(patient_dataset / "Patient_02")
    (patient_dataset / "patients.csv").write_text("patient,diagnosis\nPatient_00,APL\nPatient_01,AML\n")
    with pytest.raises(LeukError, match="too few"):
        make_split(scan_dataset(patient_dataset))


def test_save_and_load_round_trip(synthetic_classes: Manifest, tmp_path: Path) -> None:
    split = make_split(synthetic_classes, seed=3)
    path = save_split(split, tmp_path / "split.json")
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["seed"] == 3 and doc["method"] == "stratified:image"
    assert doc["fractions"] == {"val": 0.15, "test": 0.15}
    assert doc["manifest_digest"] == synthetic_classes.digest()
    assert doc["class_names"] == list(synthetic_classes.class_names)
    assert load_split(path, synthetic_classes) == split


def test_load_rejects_other_data(
    synthetic_classes: Manifest, synthetic_patients: Manifest, tmp_path: Path
) -> None:
    path = save_split(make_split(synthetic_classes), tmp_path / "split.json")
    message = r"split was made for a different dataset \(manifest digest \w+, data is \w+\)"
    with pytest.raises(LeukError, match=message):
        load_split(path, synthetic_patients)


def test_load_rejects_unknown_paths_and_bad_files(synthetic_classes: Manifest, tmp_path: Path) -> None:
    path = save_split(make_split(synthetic_classes), tmp_path / "split.json")
    doc = json.loads(path.read_text())
    doc["test"].append("Pro/not_there.png")
    path.write_text(json.dumps(doc))
    with pytest.raises(LeukError, match="missing from the dataset"):
        load_split(path, synthetic_classes)
    path.write_text("{ not json")
    with pytest.raises(LeukError, match="cannot read split file"):
        load_split(path, synthetic_classes)
    with pytest.raises(LeukError, match="not found"):
        load_split(tmp_path / "nope.json", synthetic_classes)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize("group_by", ["auto", "block:10"])
def test_real_taleqani_split(taleqani_manifest: Manifest, group_by: str) -> None:
    split = make_split(taleqani_manifest, seed=0, group_by=group_by)
    _assert_no_leak(split, taleqani_manifest)
    summary = split_summary(split, taleqani_manifest)
    for c, total in {"Benign": 435, "Early": 821, "Pre": 825, "Pro": 687}.items():
        for side in ("val", "test"):
            assert abs(summary[side]["classes"][c] - 0.15 * total) <= 8


@pytest.mark.realdata
def test_real_apl_aml_split(apl_manifest: Manifest) -> None:
    split = make_split(apl_manifest, seed=0)
    assert split.method == "stratified:patient"
    _assert_no_leak(split, apl_manifest)
    summary = split_summary(split, apl_manifest)
    assert sum(summary[s]["num_patients"] for s in SIDES) == 82
    for side in ("val", "test"):
        assert summary[side]["patients_per_class"]["APL"] >= 3
        assert summary[side]["patients_per_class"]["AML"] >= 8
    patients = Counter(s.patient for s in apl_manifest.samples if s.path in set(split.test))
    assert len(patients) == summary["test"]["num_patients"]
