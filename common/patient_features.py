"""Frozen pretrained cell features: one vector per image from an ImageNet backbone, cached as .npz."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leukfed.common.atomic import _atomic_write
from leukfed.common.errors import LeukError
from leukfed.common.images import load_image
from leukfed.common.transforms import Normalize, prepare_image

CACHE_FORMAT = "leukfed-features/1"


def feature_backbone(name: str, image_size: int) -> nn.Module:
    """ImageNet backbone `name` from its offline weights package, classifier removed, eval mode."""
    from leukfed.models import create_model

    model = create_model(name, 1, pretrained="package", image_size=image_size)
    if not hasattr(model, "forward_head"):
        raise LeukError(f"model {name} cannot give pooled features (not a timm model)")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features of a normalised NCHW batch."""
    return model.forward_head(model.forward_features(images), pre_logits=True).float()


@torch.no_grad()
def extract_features(model: nn.Module, files: Sequence[Path], *, batch_size: int = 64,
                     augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """float32 (N, D) features of image files; `augment` maps a float 0..1 NCHW batch to another."""
    config = model.leuk_info.data_config
    normalize = Normalize(config)
    out = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([prepare_image(load_image(f), config) for f in files[start:start + batch_size]])
        if augment is not None:
            batch = (augment(batch.float() / 255.0).clamp(0, 1) * 255.0)
        device = next(model.parameters()).device
        out.append(embed(model, normalize(batch.to(device))).cpu().numpy())
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    if not out:
        raise LeukError("no images to extract features from")
    return np.concatenate(out).astype(np.float32)


def save_feature_cache(path: str | Path, paths: Sequence[str], sha256: Sequence[str], features: np.ndarray,
                       *, backbone: str, image_size: int, variant: str = "clean") -> Path:
    """Write features with the image paths and hashes they belong to (.npz, no pickled objects)."""
    arrays = {"format": np.array(CACHE_FORMAT), "paths": np.array(list(paths), dtype=str),
              "sha256": np.array(list(sha256), dtype=str), "features": features.astype(np.float32),
              "backbone": np.array(backbone), "image_size": np.array(image_size), "variant": np.array(variant)}
    return _atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_feature_cache(path: str | Path, paths: Sequence[str], sha256: Sequence[str]) -> np.ndarray:
    """Features of `paths` in that order; LeukError if the cache lacks one or holds other image bytes."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            if str(z["format"]) != CACHE_FORMAT:
                raise LeukError(f"{path} is not a leukfed feature cache")
            index = {p: i for i, p in enumerate(z["paths"].tolist())}
            cached_sha, features = z["sha256"], z["features"]
    except (OSError, KeyError, ValueError) as exc:
        raise LeukError(f"cannot read feature cache {path}: {exc}") from None
    rows = []
    for p, h in zip(paths, sha256):
        i = index.get(p)
        if i is None or cached_sha[i] != h:
            raise LeukError(f"feature cache {path} does not match image {p}")
        rows.append(i)
    return features[np.asarray(rows, dtype=np.int64)]


def timed_extract(model: nn.Module, files: Sequence[Path], **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    return extract_features(model, files, **kwargs), time.perf_counter() - start
