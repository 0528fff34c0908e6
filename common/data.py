"""Dataset scanning: the labelled, hashed samples of a dataset folder (its Manifest)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from leukfed.common.data_files import open_regular, shown
from leukfed.common.data_layouts import Discovery, check_root, discover
from leukfed.common.errors import LeukError

_HASH_BUFFER = 1 << 20
_WORKERS = min(8, 2 * (os.cpu_count() or 1))
_T = TypeVar("_T")
_R = TypeVar("_R")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labelled image of a dataset."""

    path: str  # POSIX path relative to the dataset root
    label: str
    sha256: str
    patient: str | None
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Manifest:
    """All samples of a dataset, sorted by path, with sorted class names."""

    root: Path
    layout: str
    class_names: tuple[str, ...]
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def digest(self) -> str:
        """sha256 over the (path, label, sha256, patient) rows: identifies the exact data."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.path}\t{s.label}\t{s.sha256}\t{s.patient or ''}\n".encode())
        return h.hexdigest()

    def labels(self) -> np.ndarray:
        """Class index of every sample (index into `class_names`)."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    def has_patients(self) -> bool:
        """True when every sample carries a patient / subject id."""
        return bool(self.samples) and all(s.patient is not None for s in self.samples)

    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.samples)

    def by_path(self) -> dict[str, Sample]:
        return {s.path: s for s in self.samples}


def scan_dataset(root: str | Path, hash_cache: Path | None = None) -> Manifest:
    """Detect the layout of `root`, list its images with labels and hashes; LeukError if unusable.
    `hash_cache`: a folder of the caller's own (a site's image cache) where each file's hash is kept with
    its size, mtime and inode, so that an unchanged file is not read again (a site's every task runs in a
    fresh process and would otherwise hash all its images each round)."""
    root = check_root(root)
    found = discover(root, strict=True)
    if found.skipped:
        _log.warning("skipped %d entries of %s that cannot be read safely: %s", len(found.skipped), root,
                     examples(found.skipped))
    if hash_cache is None:
        shas = parallel_map(lambda f: _sha256_file(root / f.path)[0], found.images)
        return _build_manifest(root, found, shas)
    cache = _hash_cache_file(hash_cache, root)
    known = _load_hashes(cache)
    hashed = [_unchanged(root / f.path, known.get(f.path)) for f in found.images]   # a stat each: no thread pool
    missing = [i for i, entry in enumerate(hashed) if entry is None]
    for i, entry in zip(missing, parallel_map(lambda i: _hash_entry(root / found.images[i].path), missing)):
        hashed[i] = entry
    if missing or len(known) != len(hashed):
        from leukfed.common.atomic import atomic_write_json

        atomic_write_json(cache, {"format": HASH_CACHE_FORMAT, "written_ns": time.time_ns(),
                                  "files": {f.path: entry for f, entry in zip(found.images, hashed)}})
    return _build_manifest(root, found, [entry[-1] for entry in hashed])


HASH_CACHE_FORMAT = "leukfed-file-hashes-1"
_RACY_NS = 2_000_000_000   # a file changed this close to the cache's writing may change again unseen: hash it


def _hash_cache_file(folder: Path, root: Path) -> Path:
    """One JSON file per dataset root in `folder` (no pickle: it is read back by the site's next task)."""
    return Path(folder) / f"file-hashes-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"


def _load_hashes(cache: Path) -> dict[str, list]:
    """path -> [size, mtime_ns, inode, sha256] of entries old enough to trust ({} for a missing or
    unreadable cache: everything is hashed again)."""
    try:
        data = json.loads(cache.read_text())
        cutoff = int(data["written_ns"]) - _RACY_NS
        files = data["files"] if data.get("format") == HASH_CACHE_FORMAT else {}
        return {p: e for p, e in files.items() if isinstance(e, list) and len(e) == 4 and e[1] < cutoff}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _unchanged(path: Path, entry: list | None) -> list | None:
    """The cached [size, mtime_ns, inode, sha256] while the file's stat still matches it, else None."""
    if entry is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return entry if [st.st_size, st.st_mtime_ns, st.st_ino] == entry[:3] else None


def _hash_entry(path: Path) -> list:
    sha, st = _sha256_file(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha]


def _build_manifest(root: Path, found: Discovery, shas: list[str]) -> Manifest:
    samples = sorted(
        (Sample(f.path, f.label, sha, f.patient, f.meta) for f, sha in zip(found.images, shas, strict=True)),
        key=lambda s: s.path,
    )
    classes = tuple(sorted({s.label for s in samples}))
    return Manifest(root=root, layout=found.layout, class_names=classes, samples=tuple(samples))


def _sha256_file(path: Path) -> tuple[str, os.stat_result]:
    """The file's sha256 and the stat of the very file read."""
    h = hashlib.sha256()
    try:
        with open_regular(path) as fh:
            st = os.fstat(fh.fileno())
            while chunk := fh.read(_HASH_BUFFER):
                h.update(chunk)
    except OSError as exc:
        raise LeukError(f"cannot read {shown(str(path))}: {exc.strerror or exc}") from None
    return h.hexdigest(), st


def parallel_map(fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    """Map in a thread pool: hashlib and Pillow's decoders release the GIL."""
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(fn, items, chunksize=32))


def examples(items: list[str], limit: int = 3) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
