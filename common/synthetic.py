"""Small generated smear-like datasets (no download) for tests, demos and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from leukfed.common.atomic import atomic_write_text
from leukfed.common.errors import LeukError

DEFAULT_CLASSES = {"class_folders": ("Benign", "Early", "Pre", "Pro"), "patient_folders": ("APL", "AML")}
CELL_TYPES = ("Blast", "Promyelocyte", "Lymphocyte", "Neutrophil")
AMBIGUOUS_FRACTION = 0.07  # cells drawn with another class's look: caps accuracy near 93%
_GOLDEN = 0.6180339887


@dataclass(frozen=True)
class _Look:
    """Nucleus appearance of one cell: radius (fraction of the image), elongation, texture, lobes."""

    radius: float
    elongation: float
    texture: float
    lobes: int


def make_synthetic_dataset(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    per_class: int = 60,
    size: int = 48,
    seed: int = 0,
    layout: str = "class_folders",
    patients_per_class: int = 4,
) -> Path:
    """Write a deterministic synthetic dataset to `root` and return its path.

    `classes` defaults to Benign/Early/Pre/Pro for "class_folders" and APL/AML for
    "patient_folders" (`Patient_XX/<cell type>/cell_NNNN.png` plus `patients.csv`).
    """
    if layout not in DEFAULT_CLASSES:
        raise LeukError(f"unknown synthetic layout '{layout}' (expected {', '.join(DEFAULT_CLASSES)})")
    names = tuple(classes) if classes is not None else DEFAULT_CLASSES[layout]
    _validate(names, per_class, size, patients_per_class, layout)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise LeukError(f"synthetic dataset folder is not empty: {root}")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if layout == "class_folders":
        _write_class_folders(root, names, per_class, size, rng)
    else:
        _write_patient_folders(root, names, per_class, size, patients_per_class, rng)
    return root


def _validate(names: tuple[str, ...], per_class: int, size: int, patients: int, layout: str) -> None:
    if len(names) < 2 or len(set(names)) != len(names):
        raise LeukError("synthetic dataset needs at least two distinct class names")
    if any(not n or "/" in n or n.startswith(".") for n in names):
        raise LeukError(f"bad class names for a synthetic dataset: {names}")
    if per_class < 1 or size < 16:
        raise LeukError("synthetic dataset needs per_class >= 1 and size >= 16")
    if layout == "patient_folders" and not 1 <= patients <= per_class:
        raise LeukError("patients_per_class must be between 1 and per_class")


def _write_class_folders(
    root: Path, names: tuple[str, ...], per_class: int, size: int, rng: np.random.Generator
) -> None:
    for k, name in enumerate(names):
        folder = root / name
        folder.mkdir()
        for i in range(per_class):
            look = _cell_look(k, len(names), rng)
            _save(render_cell(look, size, rng), folder / f"{name}_{i:04d}.png")


def _write_patient_folders(
    root: Path, names: tuple[str, ...], per_class: int, size: int, patients: int, rng: np.random.Generator
) -> None:
    diagnoses = [k for k in range(len(names)) for _ in range(patients)]
    rng.shuffle(diagnoses)  # patient numbers must not give the diagnosis away
    rows = ["patient,diagnosis"]
    cells_left = {k: np.array_split(np.arange(per_class), patients) for k in range(len(names))}
    for number, k in enumerate(diagnoses):
        patient = f"Patient_{number:02d}"
        rows.append(f"{patient},{names[k]}")
        shift = rng.normal(0.0, 0.01)  # patient-level variation of nucleus size
        for i in cells_left[k].pop():
            look = _cell_look(k, len(names), rng)
            look = _Look(look.radius + shift, look.elongation, look.texture, look.lobes)
            folder = root / patient / CELL_TYPES[int(rng.integers(len(CELL_TYPES)))]
            folder.mkdir(parents=True, exist_ok=True)
            _save(render_cell(look, size, rng), folder / f"cell_{i:04d}.png")
    atomic_write_text(root / "patients.csv", "\n".join(rows) + "\n")


def _cell_look(k: int, num_classes: int, rng: np.random.Generator) -> _Look:
    """Class k's nucleus look plus noise; a few cells borrow another class's look."""
    if rng.random() < AMBIGUOUS_FRACTION:
        k = int((k + rng.integers(1, num_classes)) % num_classes)
    t = k / (num_classes - 1)
    return _Look(
        radius=0.13 + 0.13 * t + rng.normal(0.0, 0.015),
        elongation=1.0 + 0.25 * ((k * 2) % 3) / 2 + abs(rng.normal(0.0, 0.08)),
        texture=float(np.clip(0.15 + 0.6 * ((k * _GOLDEN) % 1.0) + rng.normal(0.0, 0.08), 0.0, 1.0)),
        lobes=2 if k % 3 == 1 else 1,
    )


def render_cell(look: _Look, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one smear-like RGB cell image (uint8, size x size x 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    background = np.array([236.0, 202.0, 212.0]) + rng.normal(0.0, 6.0, 3)
    img = np.broadcast_to(background, (size, size, 3)).copy()
    for _ in range(int(rng.integers(2, 5))):  # red blood cells: pale discs with a lighter centre
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.14, 0.2)
        disc = _soft_disc(yy, xx, cy, cx, r, r)
        centre = _soft_disc(yy, xx, cy, cx, r * 0.45, r * 0.45)
        _paint(img, disc - 0.5 * centre, np.array([214.0, 140.0, 152.0]))
    cy, cx = 0.5 + rng.normal(0.0, 0.04, 2)
    _paint(img, _soft_disc(yy, xx, cy, cx, 0.33, 0.33), np.array([196.0, 176.0, 214.0]))
    _paint(img, _nucleus_mask(look, yy, xx, cy, cx, rng), _nucleus_colour(look, size, rng))
    img += rng.normal(0.0, 5.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _nucleus_mask(
    look: _Look, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, rng: np.random.Generator
) -> np.ndarray:
    mask = np.zeros_like(yy)
    angle = rng.uniform(0, np.pi)
    lobe_r = look.radius / np.sqrt(look.lobes) * 1.15
    for j in range(look.lobes):
        offset = (j - (look.lobes - 1) / 2) * lobe_r * 1.3
        ly, lx = cy + offset * np.sin(angle), cx + offset * np.cos(angle)
        mask = np.maximum(mask, _soft_disc(yy, xx, ly, lx, lobe_r * look.elongation, lobe_r, angle))
    return mask


def _nucleus_colour(look: _Look, size: int, rng: np.random.Generator) -> np.ndarray:
    """Purple nucleus with chromatin texture: smoothed noise whose strength is the class texture."""
    base = np.array([112.0, 58.0, 142.0]) + rng.normal(0.0, 8.0, 3)
    noise = rng.normal(0.0, 1.0, (size, size))
    smooth = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 2.0
    shade = 1.0 + 0.5 * look.texture * smooth
    return base[None, None, :] * shade[:, :, None]


def _soft_disc(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
) -> np.ndarray:
    """Ellipse mask in [0, 1] with a soft edge."""
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    dist = np.sqrt((u / ry) ** 2 + (v / rx) ** 2)
    return 1.0 / (1.0 + np.exp((dist - 1.0) * 12.0))


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    alpha = np.clip(mask, 0.0, 1.0)[:, :, None]
    img *= 1.0 - alpha
    img += alpha * colour


def _save(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="PNG")
