"""PNG galleries of the cells that drove a patient's prediction (and their Grad-CAM overlays)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from leukfed.common.images import load_image

TILE_PX = 160          # tiles are shown at most this size; cells are small, the caption matters more
GALLERY_KEY = "leukfed-tiles"   # PNG text chunk: the tiles as JSON (file, weight), in gallery order


def top_cells(weights: Sequence[float], count: int) -> list[int]:
    """Indices of the `count` largest weights, largest first (ties: file order)."""
    w = np.asarray(weights, dtype=np.float64)
    return [int(i) for i in np.argsort(-w, kind="stable")[:count]]


def gallery_name(folder: Path, taken: set[str]) -> str:
    """A file stem for this patient's gallery: the folder name, made unique within one call."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name).strip("._") or "patient"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name)
    return name


def _thumbnail(path: Path) -> np.ndarray:
    image = load_image(path)
    image.thumbnail((TILE_PX, TILE_PX))
    return np.asarray(image.convert("RGB"))


def _caption(rank: int, weight_name: str, weight: float, file: Path) -> str:
    name = file.name if len(file.name) <= 26 else file.name[:11] + "..." + file.name[-12:]
    return f"#{rank} {weight_name} {weight:.3f}\n{name}"


def write_gallery(out_dir: Path, name: str, files: Sequence[Path], weights: Sequence[float], *,
                  weight_name: str, title: str, count: int = 12,
                  overlays: Callable[[list[Path]], list[np.ndarray]] | None = None) -> dict[str, str]:
    """`NAME.png` with the top `count` cells by weight; `NAME.gradcam.png` too when `overlays` is given.

    Returns {"gallery": path, "heatmap": path}; each PNG carries its tiles (file, weight) as JSON
    under the text key GALLERY_KEY, in the order shown."""
    from leukfed.common.plots import plot_tiles

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = top_cells(weights, count)
    picked = [Path(files[i]) for i in chosen]
    captions = [_caption(r + 1, weight_name, float(weights[i]), files[i]) for r, i in enumerate(chosen)]
    tiles = [{"file": str(files[i]), "weight": float(weights[i])} for i in chosen]
    metadata = {"Title": title, GALLERY_KEY: json.dumps({"weight": weight_name, "tiles": tiles})}
    written = {"gallery": str(plot_tiles([_thumbnail(f) for f in picked], captions, out_dir / f"{name}.png",
                                         title=title, metadata=metadata))}
    if overlays is not None:
        written["heatmap"] = str(plot_tiles(overlays(picked), captions, out_dir / f"{name}.gradcam.png",
                                            title=f"{title} (Grad-CAM)", metadata=metadata))
    return written
