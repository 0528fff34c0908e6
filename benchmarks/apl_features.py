"""Extract and cache frozen backbone features of every apl_aml image (the heads in apl.py read them)."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from leukfed.common.cli_support import run_guarded
from leukfed.common.data import scan_dataset
from leukfed.common.patient_features import extract_features, feature_backbone, save_feature_cache

# variant name -> (backbone, image size, augmentation seed or None)
VARIANTS = {
    "lite0-160": ("efficientnet_lite0", 160, None),
    "lite0-96": ("efficientnet_lite0", 96, None),
    "lite2-160": ("efficientnet_lite2", 160, None),
    "lite0-160-jitter1": ("efficientnet_lite0", 160, 1),
    "lite2-96": ("efficientnet_lite2", 96, None),
    "lite0-160-jitter2": ("efficientnet_lite0", 160, 2),
}


def colour_jitter(seed: int):
    """kornia ColorJitter (stain/colour variation) plus flips on a float 0..1 batch."""
    import kornia.augmentation as K

    torch.manual_seed(seed)
    return K.AugmentationSequential(
        K.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.3, hue=0.04, p=1.0),
        K.RandomHorizontalFlip(), K.RandomVerticalFlip())


def cache_path(cache: Path, variant: str) -> Path:
    return cache / f"apl_aml-{variant}.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("LEUK_DATA_ROOT", "../shared/datasets")) / "apl_aml")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LEUK_FEATURE_CACHE", "/tmp/leukfed-apl-features")))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    manifest = scan_dataset(args.data)
    files = [manifest.root / s.path for s in manifest.samples]
    for variant in args.variants.split(","):
        out = cache_path(args.cache, variant)
        if out.exists():
            print(f"{variant}: cached {out}", flush=True)
            continue
        backbone, size, seed = VARIANTS[variant]
        model = feature_backbone(backbone, size)
        augment = colour_jitter(seed) if seed is not None else None
        start = time.perf_counter()
        feats = extract_features(model, files, augment=augment)
        seconds = time.perf_counter() - start
        save_feature_cache(out, [s.path for s in manifest.samples], [s.sha256 for s in manifest.samples], feats,
                           backbone=backbone, image_size=size, variant=variant)
        print(f"{variant}: {feats.shape} in {seconds:.0f} s ({len(files) / seconds:.1f} img/s) -> {out}", flush=True)


if __name__ == "__main__":
    run_guarded(main)
