"""In-memory torch datasets of smear images, decoded once and resized to the model's input."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from leukfed.common.atomic import atomic_save_npy
from leukfed.common.data import Manifest, Sample
from leukfed.common.errors import LeukError
from leukfed.common.images import load_image
from leukfed.common.transforms import BatchAugment, Normalize, augmentation, prepare_image


def decode_images(root: Path, samples: Sequence[Sample], data_config, *, workers: int = 4,
                  skip_bad: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Decode, convert and resize every sample once; returns uint8 NCHW and the kept indices."""

    def load(sample: Sample) -> torch.Tensor | None:
        try:
            return prepare_image(load_image(root / sample.path), data_config)
        except LeukError:
            if skip_bad:
                return None
            raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(pool.map(load, samples))
    kept = [i for i, t in enumerate(tensors) if t is not None]
    if not kept:
        raise LeukError(f"no readable images among {len(samples)} in {root}")
    return torch.stack([tensors[i] for i in kept]), kept


# A hospital's ClientApp runs every round in a fresh process; without a cache each round decodes and
# resizes the site's images again (0.3 to 1.4 s for 256 images here, more on a busy machine).
IMAGE_CACHE_FORMAT = 1
IMAGE_CACHE_ENTRIES = 4   # the latest few (split, input size) combinations a site has trained with


def image_cache_key(samples: Sequence[Sample], data_config) -> str:
    """Names what is decoded: every image's path and content digest, in order, and how it is prepared."""
    listing = [IMAGE_CACHE_FORMAT, repr(data_config), [(s.path, s.sha256) for s in samples]]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:32]


def decode_images_cached(root: Path, samples: Sequence[Sample], data_config, cache_dir: Path) -> torch.Tensor:
    """decode_images, kept as a uint8 .npy in `cache_dir` (site-local, owner-only) and read from there
    while the images and the preparation are the same; a damaged or foreign cache file is decoded anew."""
    path = Path(cache_dir) / f"decoded-{image_cache_key(samples, data_config)}.npy"
    expected = (len(samples), *data_config.input_size)
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.dtype == np.uint8 and cached.shape == expected:
            os.utime(path)  # recently used: pruned last
            return torch.from_numpy(cached)
    except (OSError, ValueError, EOFError):
        pass
    images, _ = decode_images(root, samples, data_config)
    try:
        atomic_save_npy(path, images.numpy())
        _prune_image_cache(Path(cache_dir))
    except OSError:  # a read-only or full disk costs speed, never the round
        pass
    return images


def _prune_image_cache(cache_dir: Path) -> None:
    entries = sorted(cache_dir.glob("decoded-*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[IMAGE_CACHE_ENTRIES:]:
        stale.unlink(missing_ok=True)


class SmearDataset(Dataset):
    """Images held as uint8 tensors; augmentation (train only) and normalisation per item."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, data_config, *, train: bool,
                 augment: str = "paper002", groups: Sequence[str | None] | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.groups = list(groups) if groups is not None else [None] * len(labels)
        self.augment_name = augment if train else "none"
        self.augment = augmentation(self.augment_name, data_config.input_size[1])
        self.normalize = Normalize(data_config)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.augment(self.images[index])), self.labels[index]


def build_dataset(manifest: Manifest, paths: Sequence[str], data_config, *, train: bool,
                  augment: str = "paper002", skip_bad: bool = False, cache_dir: Path | None = None) -> SmearDataset:
    """Dataset over the given sample paths of a manifest (labels and patients from it); with
    `cache_dir`, the decoded images are kept there for the next process that asks for the same."""
    by_path = {s.path: s for s in manifest.samples}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise LeukError(f"{len(missing)} split paths are not in the data, e.g. {missing[0]}")
    samples = [by_path[p] for p in paths]
    if cache_dir is not None and not skip_bad:
        images = decode_images_cached(manifest.root, samples, data_config, cache_dir)
    else:
        images, kept = decode_images(manifest.root, samples, data_config, skip_bad=skip_bad)
        samples = [samples[i] for i in kept]
    index = {name: i for i, name in enumerate(manifest.class_names)}
    labels = np.array([index[s.label] for s in samples], dtype=np.int64)
    return SmearDataset(images, labels, data_config, train=train, augment=augment,
                        groups=[s.patient for s in samples])


class BatchLoader:
    """Batches straight from the in-memory uint8 tensor: one index, one batched augmentation and
    normalisation per batch, no per-item Python work (the DataLoader's per-item path costs more than
    a small model's step). Seeded: shuffling and augmentation draw from the loader's generator."""

    def __init__(self, dataset: SmearDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        # A shuffled (training) loader never ends on a batch of one image: BatchNorm cannot normalise one
        # sample in training mode (BatchNorm1d raises); that image comes round in another epoch's order.
        single = shuffle and len(dataset) % batch_size == 1 and len(dataset) > 1
        self.drop_last = (drop_last and len(dataset) > batch_size) or single
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = BatchAugment(dataset.augment_name, self.generator)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.augment(self.dataset.images[index])
            yield self.dataset.normalize(images), self.dataset.labels[index]


def make_loader(dataset: SmearDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> BatchLoader:
    """A seeded batch iterator over an in-memory dataset."""
    return BatchLoader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
