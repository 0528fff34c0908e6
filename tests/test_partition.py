"""Tests for federated partitions (leukfed.common.partition)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from leukfed.common.data import Manifest
from leukfed.common.errors import LeukError
from leukfed.common.partition import parse_partition_spec, partition_samples, partition_summary
from leukfed.common.splits import make_split

SPECS = ["iid", "dirichlet:0.5", "quantity:1,2,3"]


def _assert_valid(m: Manifest, paths: list[str] | tuple[str, ...], parts: list[tuple[str, ...]]) -> None:
    """Every path exactly once; duplicates and patients at one site; summaries add up."""
    flat = [p for part in parts for p in part]
    assert sorted(flat) == sorted(paths)
    assert all(part for part in parts)
    site = {p: i for i, part in enumerate(parts) for p in part}
    index = m.by_path()
    by_key: dict[tuple[str, str], set[int]] = defaultdict(set)
    for p in paths:
        by_key[("sha", index[p].sha256)].add(site[p])
        if index[p].patient is not None:
            by_key[("patient", index[p].patient)].add(site[p])
    assert all(len(sites) == 1 for sites in by_key.values())
    summary = partition_summary(m, parts)
    totals = Counter(index[p].label for p in paths)
    for c in m.class_names:
        assert sum(s["classes"][c] for s in summary) == totals.get(c, 0)
    assert [s["num_images"] for s in summary] == [len(part) for part in parts]


@pytest.mark.parametrize("spec", SPECS)
def test_partitions_are_exact_and_keep_duplicates(synthetic_classes: Manifest, spec: str) -> None:
    paths = synthetic_classes.paths()
    parts = partition_samples(synthetic_classes, paths, 3, spec, seed=0)
    assert len(parts) == 3
    _assert_valid(synthetic_classes, paths, parts)


@pytest.mark.parametrize("spec", [*SPECS, "patient"])
def test_partitions_keep_patients_whole(synthetic_patients: Manifest, spec: str) -> None:
    parts = partition_samples(synthetic_patients, synthetic_patients.paths(), 3, spec, seed=1)
    _assert_valid(synthetic_patients, synthetic_patients.paths(), parts)


def test_partition_of_a_split_side(synthetic_classes: Manifest) -> None:
    train = make_split(synthetic_classes, seed=0).train
    parts = partition_samples(synthetic_classes, train, 4, "iid", seed=0)
    _assert_valid(synthetic_classes, train, parts)


@pytest.mark.parametrize("spec", [*SPECS, "dirichlet:0.1"])
def test_partitions_are_deterministic(synthetic_classes: Manifest, spec: str) -> None:
    paths = list(synthetic_classes.paths())
    a = partition_samples(synthetic_classes, paths, 3, spec, seed=4)
    assert partition_samples(synthetic_classes, paths[::-1], 3, spec, seed=4) == a
    assert partition_samples(synthetic_classes, paths, 3, spec, seed=5) != a


def test_iid_is_balanced_and_stratified(synthetic_classes: Manifest) -> None:
    parts = partition_samples(synthetic_classes, synthetic_classes.paths(), 4, "iid", seed=0)
    for site in partition_summary(synthetic_classes, parts):
        for count in site["classes"].values():
            assert 9 <= count <= 13  # 40-44 per class over 4 sites


def test_quantity_follows_weights(synthetic_classes: Manifest) -> None:
    parts = partition_samples(synthetic_classes, synthetic_classes.paths(), 3, "quantity:1,2,5", seed=0)
    sizes = np.array([len(p) for p in parts])
    assert np.allclose(sizes / sizes.sum(), [1 / 8, 2 / 8, 5 / 8], atol=0.02)


def test_patient_partition_spreads_each_diagnosis(synthetic_patients: Manifest) -> None:
    parts = partition_samples(synthetic_patients, synthetic_patients.paths(), 4, "patient", seed=0)
    for site in partition_summary(synthetic_patients, parts):
        assert site["patients_per_class"] == {"AML": 3, "APL": 3}
        assert 20 <= site["num_images"] <= 40


def _mean_label_entropy(m: Manifest, parts: list[tuple[str, ...]]) -> float:
    entropies = []
    for site in partition_summary(m, parts):
        p = np.array(list(site["classes"].values()), dtype=float)
        p = p[p > 0] / p.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_label_skew_grows_as_alpha_shrinks(synthetic_classes: Manifest) -> None:
    def entropy(alpha: float) -> float:
        spec = f"dirichlet:{alpha}"
        parts = [partition_samples(m, m.paths(), 4, spec, seed=s, min_per_site=5) for s in range(5)]
        return float(np.mean([_mean_label_entropy(m, p) for p in parts]))

    m = synthetic_classes
    low, high = entropy(0.1), entropy(10.0)
    assert low < high - 0.4
    assert high > 0.9 * np.log(4)


def test_dirichlet_minimum_per_site(synthetic_classes: Manifest) -> None:
    m = synthetic_classes
    for seed in range(3):
        parts = partition_samples(m, m.paths(), 4, "dirichlet:0.1", seed=seed, min_per_site=10)
        assert min(len(p) for p in parts) >= 10
    with pytest.raises(LeukError, match="raise alpha or use fewer sites"):
        partition_samples(m, m.paths(), 4, "dirichlet:0.5", seed=0, min_per_site=60)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random", "unknown partition spec"),
        ("dirichlet", "is not a number"),
        ("dirichlet:abc", "is not a number"),
        ("dirichlet:0", "alpha must be positive"),
        ("dirichlet:nan", "not a finite number"),
        ("quantity:1,2", "gives 2 weights for 3 sites"),
        ("quantity:1,0,2", "weights must be positive"),
        ("iid:3", "takes no parameter"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(LeukError, match=message):
        parse_partition_spec(spec, 3)


def test_bad_partition_requests(synthetic_classes: Manifest, synthetic_patients: Manifest) -> None:
    m = synthetic_classes
    with pytest.raises(LeukError, match="needs patient ids"):
        partition_samples(m, m.paths(), 2, "patient")
    with pytest.raises(LeukError, match="not in the dataset"):
        partition_samples(m, ["Pro/nope.png"], 2, "iid")
    with pytest.raises(LeukError, match="repeats"):
        partition_samples(m, [m.paths()[0]] * 2, 1, "iid")
    with pytest.raises(LeukError, match="num_sites"):
        partition_samples(m, m.paths(), 0, "iid")
    with pytest.raises(LeukError, match="cannot spread 24 patients over 30 sites"):
        partition_samples(synthetic_patients, synthetic_patients.paths(), 30, "patient")


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize("spec", ["iid", "patient", "dirichlet:0.5"])
def test_real_apl_aml_partitions(apl_manifest: Manifest, spec: str) -> None:
    train = make_split(apl_manifest, seed=0).train
    parts = partition_samples(apl_manifest, train, 4, spec, seed=0)
    _assert_valid(apl_manifest, train, parts)
    if spec == "patient":
        for site in partition_summary(apl_manifest, parts):
            assert site["patients_per_class"]["APL"] >= 3


@pytest.mark.realdata
@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "quantity:1,1,2,4"])
def test_real_taleqani_partitions(taleqani_manifest: Manifest, spec: str) -> None:
    train = make_split(taleqani_manifest, seed=0).train
    parts = partition_samples(taleqani_manifest, train, 4, spec, seed=0)
    _assert_valid(taleqani_manifest, train, parts)
