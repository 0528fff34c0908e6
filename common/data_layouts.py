"""Walking the three supported dataset folder layouts: which files are samples, with which labels."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from leukfed.common.data_files import entry_problem, shown
from leukfed.common.errors import LeukError
from leukfed.common.images import IMAGE_EXTENSIONS, is_image_file
from leukfed.common.patients_table import PATIENT_TABLE_NAMES, find_patient_table, read_patients_table

LAYOUTS = ("class_folders", "patient_folders", "cnmc")
_ROOT_DOC_STEMS = frozenset(
    {"manifest", "readme", "license", "licence", "citation", "checksums", "sha256sums"}
)
_CNMC_FOLD = re.compile(r"^fold_\w+$", re.IGNORECASE)
_CNMC_CLASSES = ("all", "hem")
_CNMC_NAME = re.compile(r"^UID_([A-Za-z]?\d+)_.*?_(all|hem)$", re.IGNORECASE)


@dataclass
class Found:
    """An image file found while walking the layout, before hashing."""

    path: str
    label: str
    patient: str | None
    meta: tuple[tuple[str, str], ...] = ()


@dataclass
class Discovery:
    """What walking a dataset folder found: images, other files and problems."""

    layout: str
    images: list[Found] = field(default_factory=list)
    non_image_files: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path (reason)": special files, symlinks out, bad names


def detect_layout(root: str | Path) -> str:
    """Return which of LAYOUTS the folder `root` uses."""
    root = check_root(root)
    dirs = _visible_dirs(root)
    if any(_CNMC_FOLD.match(d.name) and _cnmc_class_dirs(d) for d in dirs):
        return "cnmc"
    if find_patient_table(root) is not None:
        return "patient_folders"
    if dirs and all(d.name.lower().startswith("patient") for d in dirs):
        return "patient_folders"
    return "class_folders"


def check_root(root: str | Path) -> Path:
    """`root` resolved; LeukError when it is missing or not a folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise LeukError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise LeukError(f"dataset path is not a folder: {path}")
    return path.resolve()


def discover(root: Path, *, strict: bool) -> Discovery:
    """Walk `root` in its layout; LeukError without images (or, when `strict`, with an empty class)."""
    layout = detect_layout(root)
    walkers = {
        "class_folders": _discover_classes,
        "patient_folders": _discover_patients,
        "cnmc": _discover_cnmc,
    }
    found = Discovery(layout)
    walkers[layout](root, found)
    if not found.images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise LeukError(f"no images found in {root} (looked for {exts})")
    if strict and found.empty_classes:
        raise LeukError(f"class '{found.empty_classes[0]}' has no images (in {root})")
    found.problems[:0] = [f"class '{c}' has no images" for c in found.empty_classes]
    return found


def _discover_classes(root: Path, found: Discovery) -> None:
    """`<class>/<image>`: the top folder is the label (images in sub-folders count too)."""
    _note_root_files(root, found)
    for class_dir in _visible_dirs(root, found):
        before = len(found.images)
        for rel in _walk_files(root, class_dir, found):
            found.images.append(Found(rel, class_dir.name, None))
        if len(found.images) == before:
            found.empty_classes.append(class_dir.name)


def _discover_patients(root: Path, found: Discovery) -> None:
    """`Patient_XX/<cell type>/<image>` with the diagnosis per patient in the patients table."""
    table_path = find_patient_table(root)
    if table_path is None:
        raise LeukError(f"patients table missing: expected {PATIENT_TABLE_NAMES[0]} in {root}")
    table = read_patients_table(table_path)
    lookup = {k.casefold(): k for k in table}
    _note_root_files(root, found, skip={table_path.name})
    seen: set[str] = set()
    for patient_dir in _visible_dirs(root, found):
        patient = patient_dir.name
        rels = list(_walk_files(root, patient_dir, found))
        if not rels:
            found.problems.append(f"patient folder '{patient}' has no images")
            continue
        key = lookup.get(patient.casefold())
        if key is None or not table[key]:
            raise LeukError(f"patient '{patient}' has no diagnosis in {table_path.name}")
        seen.add(key)
        for rel in rels:
            parts = rel.split("/")
            meta = (("cell_type", parts[1]),) if len(parts) > 2 else ()
            found.images.append(Found(rel, table[key], patient, meta))
    missing = sorted(set(table) - seen)
    if missing:
        found.problems.append(
            f"{len(missing)} patients in {table_path.name} have no images (e.g. {', '.join(missing[:3])})"
        )


def _discover_cnmc(root: Path, found: Discovery) -> None:
    """C-NMC 2019: `fold_*/all|hem/UID_<subject>_<image>_<cell>_<all|hem>.bmp`."""
    _note_root_files(root, found)
    counts: Counter[str] = Counter()
    present: set[str] = set()
    unnamed: list[str] = []
    mismatched: list[str] = []
    for top in _visible_dirs(root, found):
        class_dirs = _cnmc_class_dirs(top) if _CNMC_FOLD.match(top.name) else []
        if not class_dirs:
            found.problems.append(f"folder '{top.name}' is not a C-NMC fold (fold_*/all|hem) and was ignored")
            continue
        for class_dir in class_dirs:
            label = class_dir.name.lower()
            present.add(label)
            for rel in _walk_files(root, class_dir, found):
                subject = _cnmc_subject(rel, label, mismatched)
                if subject is None:
                    unnamed.append(rel)
                found.images.append(Found(rel, label, subject, (("fold", top.name),)))
                counts[label] += 1
    found.empty_classes.extend(sorted(c for c in present if counts[c] == 0))
    if unnamed:
        found.problems.append(
            f"{len(unnamed)} C-NMC files do not follow UID_<subject>_..._<all|hem> names, "
            f"so their subject is unknown (e.g. {unnamed[0]})"
        )
    if mismatched:
        found.problems.append(
            f"{len(mismatched)} C-NMC files disagree with their folder's label (e.g. {mismatched[0]})"
        )


def _cnmc_subject(rel: str, label: str, mismatched: list[str]) -> str | None:
    """Subject id from a C-NMC file name; `H` subjects are normal (`hem`), numbered ones have ALL."""
    match = _CNMC_NAME.match(Path(rel).stem)
    if match is None:
        return None
    subject = match.group(1).upper()  # `UID_h3_` occurs next to `UID_H3_`: the same subject
    name_label = match.group(2).lower()
    is_normal = subject.startswith("H")
    if name_label != label or is_normal != (label == "hem"):
        mismatched.append(rel)
    return subject


def _cnmc_class_dirs(fold: Path) -> list[Path]:
    return [d for d in _visible_dirs(fold) if d.name.lower() in _CNMC_CLASSES]


def _visible_dirs(folder: Path, found: Discovery | None = None) -> list[Path]:
    """Sub-folders not hidden; those with non-UTF-8 names or leading out of `folder` are skipped."""
    kept = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_dir():
            continue
        problem = entry_problem(p, folder)
        if problem is None:
            kept.append(p)
        elif found is not None:
            found.skipped.append(f"{shown(p.name)}/ ({problem})")
    return kept


def _walk_files(root: Path, folder: Path, found: Discovery) -> Iterator[str]:
    """Yield image paths (relative to root) under `folder`; record other files as non-images."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            problem = entry_problem(Path(dirpath, name), root)
            if problem is not None:
                found.skipped.append(f"{shown(rel)} ({problem})")
                continue
            if is_image_file(name):
                yield rel
            else:
                found.non_image_files.append(rel)


def _note_root_files(root: Path, found: Discovery, skip: Iterable[str] = ()) -> None:
    """Files at the root are no samples: documentation is ignored, anything else is reported."""
    skipped = set(skip)
    stray_images = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.name in skipped or p.is_dir():
            continue
        problem = entry_problem(p, root)
        if problem is not None:
            found.skipped.append(f"{shown(p.name)} ({problem})")
            continue
        if p.stem.lower() in _ROOT_DOC_STEMS:
            continue
        if is_image_file(p.name):
            stray_images.append(p.name)
        else:
            found.non_image_files.append(p.name)
    if stray_images:
        found.problems.append(
            f"{len(stray_images)} images lie at the root, outside any class folder, and were ignored "
            f"(e.g. {stray_images[0]})"
        )
