"""benchmarks/apl_federated.py: FedAvg of a patient head and the server's histogram threshold/temperature."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark
import torch

from leukfed.common.errors import LeukError
from leukfed.common.metrics import binary_auc
from leukfed.common.patient_heads import continue_training, head_scores, make_head
from leukfed.common.patient_protocol import fit_temperature, sensitivity_specificity, threshold_for_sensitivity

@pytest.fixture(scope="module")
def fed():
    return load_benchmark("apl_federated", "apl_federated")


@pytest.fixture(scope="module")
def bags(data_root: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """16 real apl_aml patients (their ids and diagnoses) with random small bags: APL cells shifted."""
    with (data_root / "apl_aml" / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    chosen = [r for r in rows if r["diagnosis"] == "APL"][:6] + [r for r in rows if r["diagnosis"] != "APL"][:10]
    y = np.array([int(r["diagnosis"] == "APL") for r in chosen])
    rng = np.random.default_rng(0)
    out = [(rng.normal(size=(int(rng.integers(8, 30)), 6)) + 0.8 * t * np.eye(6)[0]).astype(np.float32) for t in y]
    return out, y


def _split(bags, y, parts):
    return [([bags[i] for i in idx], y[idx]) for idx in parts]


@pytest.mark.slow
@pytest.mark.realdata
def test_fedavg_over_one_site_is_local_training_and_standardisation_is_pooled(fed, bags) -> None:
    b, y = bags
    site = [(b, y)]
    init = fed.initial_head("meanprob", site, seed=3)
    cells = torch.from_numpy(np.concatenate(b))
    assert torch.allclose(init.center, cells.mean(0), atol=1e-5)
    assert torch.allclose(init.scale, cells.std(0), atol=1e-5)
    # one round of E epochs over one site = E epochs of local training from the same start
    one = fed.fedavg(init, site, rounds=1, epochs=3, weight_decay=1e-2, seed=7)
    local = continue_training(init, b, y, epochs=3, weight_decay=1e-2, seed=7)
    for (name, p), q in zip(one.named_parameters(), local.parameters()):
        assert torch.equal(p, q), name
    # R rounds over one site = R chained local updates (a round's seed is seed + 1000 r)
    chained = init
    for r in range(3):
        chained = continue_training(chained, b, y, epochs=2, weight_decay=1e-2, lr=fed.round_lr(0.1, r, 3),
                                    seed=7 + 1000 * r)
    three = fed.fedavg(init, site, rounds=3, epochs=2, weight_decay=1e-2, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(three.parameters(), chained.parameters()))
    assert not torch.equal(init.linear.weight, three.linear.weight)  # it did train
    with pytest.raises(LeukError, match="linear"):
        continue_training(make_head("attention", 6), b, y, epochs=1)


@pytest.mark.slow
@pytest.mark.realdata
def test_fedavg_over_sites_learns_and_averages_by_patients(fed, bags) -> None:
    b, y = bags
    sites = _split(b, y, [np.array([0, 1, 6, 7, 8, 9]), np.array([2, 3, 10, 11, 12]), np.array([4, 5, 13, 14, 15])])
    init = fed.initial_head("meanprob", sites, seed=0)
    head = fed.fedavg(init, sites, rounds=10, epochs=2, weight_decay=1e-2, seed=0)
    assert binary_auc(y, head_scores(head, b)[0]) > 0.9  # separable synthetic signal, learnt across sites
    # one round, weights: sites' patient shares (6, 5, 5 of 16)
    updates = [continue_training(init, sb, sy, epochs=1, weight_decay=1e-2, seed=1000 * 0 + k,
                                 class_counts=(10, 6)) for k, (sb, sy) in enumerate(sites)]
    expected = sum(w * u.linear.weight for w, u in zip((6 / 16, 5 / 16, 5 / 16), updates))
    averaged = fed.fedavg(init, sites, rounds=1, epochs=1, weight_decay=1e-2, seed=0)
    assert torch.allclose(averaged.linear.weight, expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.realdata
def test_histogram_threshold_matches_pooled_scores_when_bins_are_fine(fed, bags) -> None:
    _, y = bags
    rng = np.random.default_rng(1)
    logits = np.where(y == 1, rng.normal(2, 1.5, len(y)), rng.normal(-1, 1.5, len(y)))
    halves = [np.arange(8), np.arange(8, 16)]
    low, high = -10.0, 10.0
    for bins in (50, 200_000):
        hists = [fed.logit_histogram(logits[h], y[h], bins, low, high) for h in halves]
        assert np.sum(hists) == len(y) and np.sum(hists, axis=0)[1].sum() == y.sum()
        threshold, temperature = fed.histogram_calibration(hists, low, high, 0.9)
        pooled = threshold_for_sensitivity(y, logits, 0.9)
        width = (high - low) / bins
        assert pooled - width < threshold <= pooled  # never above: validation sensitivity >= 90 % still holds
        assert sensitivity_specificity(y, logits, threshold)[0] >= 0.9
    # fine bins: the same decisions on these patients as the pooled threshold, and the pooled temperature
    assert sensitivity_specificity(y, logits, threshold) == sensitivity_specificity(y, logits, pooled)
    assert math.isclose(temperature, fit_temperature(logits, y), rel_tol=0.03)
    # out-of-range logits land in the open outer bins; a bottom-bin threshold flags everything
    h = fed.logit_histogram(np.array([-50.0, 50.0, 0.0]), np.array([1, 0, 1]), 10, low, high)
    assert h[1, 0] == 1 and h[0, 9] == 1 and h[1, 5] == 1
    assert fed.histogram_calibration([h], low, high, 0.9)[0] == -math.inf


@pytest.mark.realdata
def test_flower_site_trees_hold_exactly_the_partitions_patients_and_their_rows(fed, data_root: Path,
                                                                                 tmp_path: Path) -> None:
    """flower-fedavg's sites: partition_sites' patients dealt into folders of their own (hard-linked images,
    a patients.csv of just their rows) that leukfed reads as patient folders."""
    from leukfed.common.data import scan_dataset

    source = data_root / "apl_aml"
    with (source / "patients.csv").open() as f:
        rows = {r["patient"]: r for r in csv.DictReader(f)}
    chosen = [p for p, r in rows.items() if r["diagnosis"] == "APL"][:3] + \
             [p for p, r in rows.items() if r["diagnosis"] != "APL"][:3]
    cohort = fed.Cohort(fed.site_tree(source, chosen, tmp_path / "cohort"), tmp_path / "no-features")
    parts = fed.partition_sites(cohort, cohort.patients, 2, 0)
    assert sorted(p for part in parts for p in part) == sorted(chosen) and all(parts)
    for k, part in enumerate(parts):
        tree = fed.site_tree(cohort.manifest.root, part, tmp_path / f"site-{k}")
        assert sorted(d.name for d in tree.iterdir() if d.is_dir()) == sorted(part)
        with (tree / "patients.csv").open() as f:
            assert list(csv.DictReader(f)) == [rows[p] for p in part]
        manifest = scan_dataset(tree)
        assert manifest.has_patients() and sorted({s.patient for s in manifest.samples}) == sorted(part)
        images = sorted(s.path for s in cohort.manifest.samples if s.path.split("/")[0] in part)
        assert sorted(s.path for s in manifest.samples) == images
        assert (tree / images[0]).samefile(source / images[0])   # hard links: no copies of the images
