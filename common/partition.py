"""Federated partitions of a sample set over sites: iid, Dirichlet label skew, by patient, by quantity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukfed.common.data import Manifest, Sample
from leukfed.common.errors import LeukError
from leukfed.common.splits import (
    balance_groups,
    group_class_counts,
    noisy_largest_first,
    sample_groups,
    samples_summary,
)

_DIRICHLET_DRAWS = 1000
_SPEC_HELP = "expected iid, dirichlet:ALPHA, patient or quantity:W1,W2,..."


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: its kind and parameters (alpha or weights)."""

    kind: str
    alpha: float | None = None
    weights: tuple[float, ...] = ()


def parse_partition_spec(spec: str, num_sites: int) -> PartitionSpec:
    """Parse `iid`, `dirichlet:ALPHA`, `patient` or `quantity:W1,W2,...`; LeukError if malformed."""
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind in ("iid", "patient"):
        if arg:
            raise LeukError(f"partition spec '{spec}': '{kind}' takes no parameter")
        return PartitionSpec(kind)
    if kind == "dirichlet":
        alpha = _parse_float(arg, spec)
        if not alpha > 0:
            raise LeukError(f"partition spec '{spec}': alpha must be positive")
        return PartitionSpec(kind, alpha=alpha)
    if kind == "quantity":
        weights = tuple(_parse_float(w, spec) for w in arg.split(","))
        if len(weights) != num_sites:
            raise LeukError(f"partition spec '{spec}' gives {len(weights)} weights for {num_sites} sites")
        if any(not w > 0 for w in weights):
            raise LeukError(f"partition spec '{spec}': weights must be positive")
        return PartitionSpec(kind, weights=weights)
    raise LeukError(f"unknown partition spec '{spec}' ({_SPEC_HELP})")


def _parse_float(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LeukError(f"partition spec '{spec}': '{text}' is not a number ({_SPEC_HELP})") from None
    if not math.isfinite(value):
        raise LeukError(f"partition spec '{spec}': '{text}' is not a finite number")
    return value


def partition_samples(
    manifest: Manifest,
    paths: Sequence[str],
    num_sites: int,
    spec: str,
    seed: int = 0,
    *,
    min_per_site: int | None = None,
) -> list[tuple[str, ...]]:
    """Split `paths` over `num_sites` sites; each path lands at exactly one site.

    Identical files and (when known) patients always stay at one site. The result depends only on
    the set of paths, the spec and the seed. `min_per_site` (default: up to 10) applies to dirichlet.
    """
    if num_sites < 1:
        raise LeukError(f"num_sites must be at least 1, got {num_sites}")
    parsed = parse_partition_spec(spec, num_sites)
    samples = _select(manifest, paths)
    has_patients = any(s.patient is not None for s in samples)
    if parsed.kind == "patient" and not has_patients:
        raise LeukError(
            "partition 'patient' needs patient ids, and this dataset has none (use iid or dirichlet)"
        )
    groups = sample_groups(samples, "patient" if has_patients else "image")
    if len(groups) < num_sites:
        unit = "patients" if has_patients else "distinct images"
        raise LeukError(f"cannot spread {len(groups)} {unit} over {num_sites} sites")
    labels = np.array([manifest.class_names.index(s.label) for s in samples], dtype=np.int64)
    counts = group_class_counts(groups, labels, len(manifest.class_names))
    rng = np.random.default_rng(seed)
    assignment = _assign(parsed, counts, num_sites, rng, min_per_site)
    return _collect(samples, groups, assignment, num_sites, spec)


def _select(manifest: Manifest, paths: Sequence[str]) -> list[Sample]:
    index = manifest.by_path()
    unknown = [p for p in paths if p not in index]
    if unknown:
        raise LeukError(f"{len(unknown)} paths to partition are not in the dataset (e.g. {unknown[0]})")
    unique = sorted(set(paths))
    if len(unique) != len(paths):
        raise LeukError("the paths to partition contain repeats")
    if not unique:
        raise LeukError("no paths to partition")
    return [index[p] for p in unique]


def _assign(
    spec: PartitionSpec,
    counts: np.ndarray,
    num_sites: int,
    rng: np.random.Generator,
    min_per_site: int | None,
) -> np.ndarray:
    totals = counts.sum(axis=0)
    if spec.kind == "iid":
        return balance_groups(counts, np.tile(totals / num_sites, (num_sites, 1)), rng)
    if spec.kind == "quantity":
        weights = np.array(spec.weights) / sum(spec.weights)
        return balance_groups(counts, weights[:, None] * totals[None, :], rng)
    if spec.kind == "patient":
        return _assign_patients(counts, num_sites, rng)
    assert spec.alpha is not None
    return _assign_dirichlet(counts, num_sites, spec.alpha, rng, min_per_site)


def _assign_dirichlet(
    counts: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator, min_per_site: int | None
) -> np.ndarray:
    """Per class, site shares ~ Dir(alpha); re-drawn until every site gets `min_per_site` images."""
    total = int(counts.sum())
    minimum = min_per_site if min_per_site is not None else max(1, min(10, total // (2 * num_sites)))
    for _ in range(_DIRICHLET_DRAWS):
        shares = rng.dirichlet(np.full(num_sites, alpha), size=counts.shape[1]).T  # (sites, classes)
        targets = shares * counts.sum(axis=0)[None, :]
        if targets.sum(axis=1).min() < minimum:
            continue
        assignment = balance_groups(counts, targets, rng)
        sizes = np.bincount(assignment, weights=counts.sum(axis=1), minlength=num_sites)
        if sizes.min() >= minimum:
            return assignment
    raise LeukError(
        f"no dirichlet:{alpha} partition with at least {minimum} images on each of {num_sites} sites "
        f"in {_DIRICHLET_DRAWS} draws: raise alpha or use fewer sites"
    )


def _assign_patients(counts: np.ndarray, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Whole patients per site: each diagnosis spread evenly over sites, image totals balanced."""
    majority = counts.argmax(axis=1)
    sizes = counts.sum(axis=1)
    per_class = np.zeros((num_sites, counts.shape[1]))
    images = np.zeros(num_sites)
    assignment = np.zeros(len(counts), dtype=np.int64)
    # Rare diagnoses first, so that they spread as evenly as possible.
    for c in sorted(range(counts.shape[1]), key=lambda c: int((majority == c).sum())):
        members = np.flatnonzero(majority == c)
        members = members[noisy_largest_first(sizes[members], rng)]
        for g in members:
            key = np.lexsort((rng.random(num_sites), images, per_class[:, c]))
            site = int(key[0])
            assignment[g] = site
            per_class[site, c] += 1
            images[site] += sizes[g]
    return assignment


def _collect(
    samples: list[Sample], groups: list[list[int]], assignment: np.ndarray, num_sites: int, spec: str
) -> list[tuple[str, ...]]:
    sites: list[list[str]] = [[] for _ in range(num_sites)]
    for members, site in zip(groups, assignment, strict=True):
        sites[int(site)].extend(samples[i].path for i in members)
    empty = [i for i, paths in enumerate(sites) if not paths]
    if empty:
        raise LeukError(
            f"partition '{spec}' left site {empty[0]} without samples: use fewer sites or other weights"
        )
    return [tuple(sorted(paths)) for paths in sites]


def partition_summary(manifest: Manifest, parts: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Per site: number of images, images per class and (when known) patients."""
    index = manifest.by_path()
    return [
        {"site": i, **samples_summary([index[p] for p in paths], manifest.class_names)}
        for i, paths in enumerate(parts)
    ]
