"""Leak-free, class-stratified train/val/test splits grouped by duplicate, patient or file block."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukfed.common.atomic import atomic_write_json
from leukfed.common.data import Manifest, Sample
from leukfed.common.errors import LeukError

SPLIT_FILE_VERSION = 1
SIDES = ("train", "val", "test")
_TRAILING_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_ORDER_TRIES = 16
_ORDER_BUDGET = 8000  # group placements spent on retries


@dataclass(frozen=True)
class Split:
    """Sample paths of each side, plus what the split was made for and how."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    manifest_digest: str
    method: str
    seed: int
    fractions: tuple[float, float] = (0.0, 0.0)  # (val, test) as requested
    class_names: tuple[str, ...] = ()

    def side(self, name: str) -> tuple[str, ...]:
        if name not in SIDES:
            raise LeukError(f"unknown split side '{name}' (expected one of {', '.join(SIDES)})")
        return getattr(self, name)


# ---------------------------------------------------------------- grouping


def resolve_group_by(manifest: Manifest, group_by: str = "auto") -> str:
    """Validate `group_by` and turn "auto" into "patient" (ids known) or "image"."""
    if group_by == "auto":
        return "patient" if manifest.has_patients() else "image"
    if group_by == "image":
        return group_by
    if group_by == "patient":
        if not any(s.patient is not None for s in manifest.samples):
            raise LeukError(
                "group_by='patient' needs patient ids, and this dataset has none (use 'image' or 'block:N')"
            )
        return group_by
    if group_by.startswith("block:"):
        size = group_by.partition(":")[2]
        if not size.isdigit() or int(size) < 1:
            raise LeukError(f"bad group_by '{group_by}': the block size must be a positive integer")
        return f"block:{int(size)}"
    raise LeukError(f"unknown group_by '{group_by}' (expected auto, image, patient or block:N)")


def sample_groups(samples: Sequence[Sample], group_by: str) -> list[list[int]]:
    """Indices of `samples` in groups that must stay together.

    Identical files (same sha256) are always grouped; "patient" adds patients, "block:N" adds
    blocks of N consecutive file numbers within a folder. Groups are transitive (union-find).
    """
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[Any, ...], int] = {}
    for i, sample in enumerate(samples):
        for key in _group_keys(sample, group_by):
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(find(i), []).append(i)
    return list(members.values())


def _group_keys(sample: Sample, group_by: str) -> list[tuple[Any, ...]]:
    keys: list[tuple[Any, ...]] = [("sha256", sample.sha256)]
    if group_by == "patient" and sample.patient is not None:
        keys.append(("patient", sample.patient))
    elif group_by.startswith("block:"):
        path = Path(sample.path)
        number = _TRAILING_NUMBER.search(path.stem)
        if number is not None:
            block = int(number.group(1)) // int(group_by.partition(":")[2])
            keys.append(("block", sample.label, path.parent.as_posix(), block))
    return keys


def group_class_counts(groups: list[list[int]], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_groups, num_classes) image counts per group and class."""
    counts = np.zeros((len(groups), num_classes), dtype=np.float64)
    for g, members in enumerate(groups):
        np.add.at(counts[g], labels[members], 1.0)
    return counts


# ---------------------------------------------------------------- balancing


def balance_groups(counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assign groups to bins so that per-class image and group counts approach `targets`.

    counts: (G, C) images per group and class; targets: (B, C) wanted images per bin and class.
    Greedy: groups in noisy largest-first order each go to the bin whose weighted L1 distance to
    its targets shrinks most. Several orders are tried and the closest result kept. Returns (G,).
    """
    # Singletons fill exactly in one pass; with many groups one pass is already close.
    singletons = counts.sum(axis=1).max(initial=0) <= 1
    tries = 1 if singletons else max(1, min(_ORDER_TRIES, _ORDER_BUDGET // max(len(counts), 1)))
    best, best_cost = np.zeros(len(counts), dtype=np.int64), np.inf
    for _ in range(tries):
        assignment, cost = _greedy_assign(counts, targets, rng)
        if cost < best_cost - 1e-12:
            best, best_cost = assignment, cost
    return _fill_empty_bins(best, counts.sum(axis=1), targets.sum(axis=1) > 0)


def _fill_empty_bins(assignment: np.ndarray, sizes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Give each wanted but empty bin the smallest group of the bin holding most groups (if it has 2+)."""
    assignment = assignment.copy()
    for b in np.flatnonzero(wanted):
        held = np.bincount(assignment, minlength=len(wanted))
        donor = int(held.argmax())
        if held[b] == 0 and held[donor] >= 2:
            members = np.flatnonzero(assignment == donor)
            assignment[members[np.argmin(sizes[members])]] = b
    return assignment


def _greedy_assign(
    counts: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    sizes = counts.sum(axis=1)
    shares = counts / np.maximum(sizes, 1.0)[:, None]  # a group counts once, split over its classes
    class_images = np.maximum(counts.sum(axis=0), 1.0)
    class_groups = np.maximum(shares.sum(axis=0), 1.0)
    group_targets = targets / class_images * class_groups
    safe_targets = np.maximum(targets, 1e-9)
    order = noisy_largest_first(sizes, rng)
    images = np.zeros_like(targets)
    groups = np.zeros_like(targets)
    assignment = np.zeros(len(counts), dtype=np.int64)
    for g in order:
        img_deficit, grp_deficit = targets - images, group_targets - groups
        cost = (np.abs(img_deficit - counts[g]) - np.abs(img_deficit)) / class_images
        cost += (np.abs(grp_deficit - shares[g]) - np.abs(grp_deficit)) / class_groups
        b = _pick_bin(cost.sum(axis=1), (img_deficit / safe_targets) @ shares[g], rng)
        assignment[g] = b
        images[b] += counts[g]
        groups[b] += shares[g]
    final = np.abs(targets - images) / class_images + np.abs(group_targets - groups) / class_groups
    return assignment, float(final.sum())


def noisy_largest_first(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Order for greedy packing: largest first, with mild noise so that seeds differ among similar sizes."""
    return np.argsort(-sizes * np.exp(rng.normal(0.0, 0.15, len(sizes))), kind="stable")


def _pick_bin(cost: np.ndarray, relative_deficit: np.ndarray, rng: np.random.Generator) -> int:
    """Cheapest bin; among equally cheap ones the least filled (relative to its target), then random.

    Without the fill tie-break, early groups (where every bin has room) would land uniformly at
    random and overfill small bins such as val/test.
    """
    tied = np.flatnonzero(cost <= cost.min() + 1e-9)
    fill = relative_deficit[tied] + rng.uniform(0.0, 1e-6, len(tied))
    return int(tied[np.argmax(fill)])


# ---------------------------------------------------------------- splits


def make_split(
    m: Manifest,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    group_by: str = "auto",
) -> Split:
    """Class-stratified train/val/test split; duplicates (and patients or blocks) never straddle sides."""
    _check_fractions(val_fraction, test_fraction)
    resolved = resolve_group_by(m, group_by)
    groups = sample_groups(m.samples, resolved)
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted = int(np.count_nonzero(fractions))
    if len(groups) < wanted:
        raise LeukError(f"too few independent groups ({len(groups)}, by {resolved}) for a {wanted}-way split")
    counts = group_class_counts(groups, m.labels(), len(m.class_names))
    targets = fractions[:, None] * counts.sum(axis=0)[None, :]
    assignment = balance_groups(counts, targets, np.random.default_rng(seed))
    sides = _collect(m, groups, assignment, 3)
    empty = [SIDES[i] for i in range(3) if fractions[i] > 0 and not sides[i]]
    if empty:
        raise LeukError(
            f"the {empty[0]} side of the split came out empty: too few groups ({len(groups)}) by {resolved}"
        )
    return Split(
        *sides,
        manifest_digest=m.digest(),
        method=f"stratified:{resolved}",
        seed=seed,
        fractions=(float(val_fraction), float(test_fraction)),
        class_names=m.class_names,
    )


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise LeukError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise LeukError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")


def _collect(
    m: Manifest, groups: list[list[int]], assignment: np.ndarray, num_bins: int
) -> list[tuple[str, ...]]:
    bins: list[list[str]] = [[] for _ in range(num_bins)]
    for members, b in zip(groups, assignment, strict=True):
        bins[int(b)].extend(m.samples[i].path for i in members)
    return [tuple(sorted(paths)) for paths in bins]


def save_split(split: Split, path: str | Path) -> Path:
    """Write the split as JSON (atomically)."""
    doc = {
        "version": SPLIT_FILE_VERSION,
        "method": split.method,
        "seed": split.seed,
        "fractions": {"val": split.fractions[0], "test": split.fractions[1]},
        "manifest_digest": split.manifest_digest,
        "class_names": list(split.class_names),
        "counts": {side: len(split.side(side)) for side in SIDES},
        **{side: list(split.side(side)) for side in SIDES},
    }
    return atomic_write_json(path, doc)


def load_split(path: str | Path, manifest: Manifest) -> Split:
    """Read a split file and check that it belongs to `manifest`'s data."""
    doc = _read_split_file(Path(path))
    digest = manifest.digest()
    if doc["manifest_digest"] != digest:
        raise LeukError(
            f"split was made for a different dataset (manifest digest {doc['manifest_digest'][:12]}, "
            f"data is {digest[:12]})"
        )
    sides = [tuple(doc[side]) for side in SIDES]
    _check_split_paths(sides, manifest, Path(path))
    fractions = doc.get("fractions", {})
    return Split(
        *sides,
        manifest_digest=digest,
        method=str(doc["method"]),
        seed=int(doc["seed"]),
        fractions=(float(fractions.get("val", 0.0)), float(fractions.get("test", 0.0))),
        class_names=tuple(doc.get("class_names", manifest.class_names)),
    )


def _read_split_file(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LeukError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeukError(f"cannot read split file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != SPLIT_FILE_VERSION:
        raise LeukError(f"split file {path} is not a version-{SPLIT_FILE_VERSION} leukfed split")
    missing = [k for k in ("method", "seed", "manifest_digest", *SIDES) if k not in doc]
    if missing:
        raise LeukError(f"split file {path} lacks {', '.join(missing)}")
    return doc


def _check_split_paths(sides: list[tuple[str, ...]], manifest: Manifest, path: Path) -> None:
    known = set(manifest.paths())
    listed = [p for side in sides for p in side]
    unknown = [p for p in listed if p not in known]
    if unknown:
        raise LeukError(
            f"split file {path} lists {len(unknown)} paths missing from the dataset (e.g. {unknown[0]})"
        )
    if len(set(listed)) != len(listed):
        raise LeukError(f"split file {path} lists some paths on more than one side")


def split_summary(split: Split, manifest: Manifest) -> dict[str, Any]:
    """Images (and patients) per class on each side of the split."""
    index = manifest.by_path()
    summary: dict[str, Any] = {"method": split.method, "seed": split.seed}
    for side in SIDES:
        summary[side] = samples_summary([index[p] for p in split.side(side)], manifest.class_names)
    return summary


def samples_summary(samples: Sequence[Sample], class_names: Sequence[str]) -> dict[str, Any]:
    """Counts for a list of samples: images, per-class images, patients (None when unknown)."""
    classes = {c: 0 for c in class_names}
    patients: dict[str, set[str]] = {c: set() for c in class_names}
    for s in samples:
        classes[s.label] += 1
        if s.patient is not None:
            patients[s.label].add(s.patient)
    known = any(s.patient is not None for s in samples)
    return {
        "num_images": len(samples),
        "classes": classes,
        "num_patients": len({s.patient for s in samples if s.patient is not None}) if known else None,
        "patients_per_class": {c: len(p) for c, p in patients.items()} if known else None,
    }
