"""Dataset scanning, checking and image loading for the three supported folder layouts."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from leukfed.common.data_files import MAX_IMAGE_PIXELS, entry_problem, open_regular, shown
from leukfed.common.errors import LeukError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
LAYOUTS = ("class_folders", "patient_folders", "cnmc")
PATIENT_TABLE_NAMES = ("patients.csv", "patients.tsv")
PATIENT_COLUMNS = (
    "patient", "patient_id", "patientid", "patient_name", "subject", "subject_id", "case", "case_id", "id",
)
DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "label", "class", "target")
_ROOT_DOC_STEMS = frozenset(
    {"manifest", "readme", "license", "licence", "citation", "checksums", "sha256sums"}
)
_CNMC_FOLD = re.compile(r"^fold_\w+$", re.IGNORECASE)
_CNMC_CLASSES = ("all", "hem")
_CNMC_NAME = re.compile(r"^UID_([A-Za-z]?\d+)_.*?_(all|hem)$", re.IGNORECASE)
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


@dataclass
class _Found:
    """An image file found while walking the layout, before hashing."""

    path: str
    label: str
    patient: str | None
    meta: tuple[tuple[str, str], ...] = ()


@dataclass
class _Discovery:
    """What walking a dataset folder found: images, other files and problems."""

    layout: str
    images: list[_Found] = field(default_factory=list)
    non_image_files: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path (reason)": special files, symlinks out, bad names


# ---------------------------------------------------------------- scanning


def scan_dataset(root: str | Path) -> Manifest:
    """Detect the layout of `root`, list its images with labels and hashes; LeukError if unusable."""
    root = _check_root(root)
    found = _discover(root, strict=True)
    if found.skipped:
        _log.warning("skipped %d entries of %s that cannot be read safely: %s", len(found.skipped), root,
                     _examples(found.skipped))
    shas = _parallel_map(lambda f: _sha256_file(root / f.path), found.images)
    return _build_manifest(root, found, shas)


def detect_layout(root: str | Path) -> str:
    """Return which of LAYOUTS the folder `root` uses."""
    root = _check_root(root)
    dirs = _visible_dirs(root)
    if any(_CNMC_FOLD.match(d.name) and _cnmc_class_dirs(d) for d in dirs):
        return "cnmc"
    if _find_patient_table(root) is not None:
        return "patient_folders"
    if dirs and all(d.name.lower().startswith("patient") for d in dirs):
        return "patient_folders"
    return "class_folders"


def _check_root(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise LeukError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise LeukError(f"dataset path is not a folder: {path}")
    return path.resolve()


def _discover(root: Path, *, strict: bool) -> _Discovery:
    layout = detect_layout(root)
    walkers = {
        "class_folders": _discover_classes,
        "patient_folders": _discover_patients,
        "cnmc": _discover_cnmc,
    }
    found = _Discovery(layout)
    walkers[layout](root, found)
    if not found.images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise LeukError(f"no images found in {root} (looked for {exts})")
    if strict and found.empty_classes:
        raise LeukError(f"class '{found.empty_classes[0]}' has no images (in {root})")
    found.problems[:0] = [f"class '{c}' has no images" for c in found.empty_classes]
    return found


def _discover_classes(root: Path, found: _Discovery) -> None:
    """`<class>/<image>`: the top folder is the label (images in sub-folders count too)."""
    _note_root_files(root, found)
    for class_dir in _visible_dirs(root, found):
        before = len(found.images)
        for rel in _walk_files(root, class_dir, found):
            found.images.append(_Found(rel, class_dir.name, None))
        if len(found.images) == before:
            found.empty_classes.append(class_dir.name)


def _discover_patients(root: Path, found: _Discovery) -> None:
    """`Patient_XX/<cell type>/<image>` with the diagnosis per patient in the patients table."""
    table_path = _find_patient_table(root)
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
            found.images.append(_Found(rel, table[key], patient, meta))
    missing = sorted(set(table) - seen)
    if missing:
        found.problems.append(
            f"{len(missing)} patients in {table_path.name} have no images (e.g. {', '.join(missing[:3])})"
        )


def _discover_cnmc(root: Path, found: _Discovery) -> None:
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
                found.images.append(_Found(rel, label, subject, (("fold", top.name),)))
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


def _visible_dirs(folder: Path, found: _Discovery | None = None) -> list[Path]:
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


def _walk_files(root: Path, folder: Path, found: _Discovery) -> Iterator[str]:
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


def _note_root_files(root: Path, found: _Discovery, skip: Iterable[str] = ()) -> None:
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


def is_image_file(name: str) -> bool:
    """True for the supported image extensions (case-insensitive)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _build_manifest(root: Path, found: _Discovery, shas: list[str]) -> Manifest:
    samples = sorted(
        (Sample(f.path, f.label, sha, f.patient, f.meta) for f, sha in zip(found.images, shas, strict=True)),
        key=lambda s: s.path,
    )
    classes = tuple(sorted({s.label for s in samples}))
    return Manifest(root=root, layout=found.layout, class_names=classes, samples=tuple(samples))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open_regular(path) as fh:
            while chunk := fh.read(_HASH_BUFFER):
                h.update(chunk)
    except OSError as exc:
        raise LeukError(f"cannot read {shown(str(path))}: {exc.strerror or exc}") from None
    return h.hexdigest()


def _parallel_map(fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    """Map in a thread pool: hashlib and Pillow's decoders release the GIL."""
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        return list(pool.map(fn, items, chunksize=32))


# ---------------------------------------------------------------- patients table


def _find_patient_table(root: Path) -> Path | None:
    names = {p.name.lower(): p for p in root.iterdir() if not p.is_dir()}
    for name in PATIENT_TABLE_NAMES:
        if name in names:
            problem = entry_problem(names[name], root)
            if problem is not None:
                raise LeukError(f"cannot use patients table {names[name]}: {problem}")
            return names[name]
    return None


def read_patients_table(path: str | Path) -> dict[str, str]:
    """Map patient id -> diagnosis from a CSV/TSV whose header names the two columns."""
    path = Path(path)
    rows = _read_table_rows(path)
    if not rows:
        raise LeukError(f"patients table {path} is empty")
    header = [_normalise_column(h) for h in rows[0]]
    pid_col = _pick_column(header, PATIENT_COLUMNS, "patient", path)
    dx_col = _pick_column(header, DIAGNOSIS_COLUMNS, "diagnosis", path)
    table: dict[str, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(pid_col, dx_col):
            raise LeukError(f"patients table {path.name} line {line_no}: too few columns")
        patient, diagnosis = row[pid_col].strip(), row[dx_col].strip()
        if not patient:
            raise LeukError(f"patients table {path.name} line {line_no}: empty patient id")
        if table.get(patient, diagnosis) != diagnosis:
            raise LeukError(f"patients table {path.name}: patient '{patient}' has two diagnoses")
        table[patient] = diagnosis
    return table


def _read_table_rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LeukError(f"cannot read patients table {path}: {exc}") from None
    first = text.split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",;\t", key=first.count)
    try:
        return list(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True))
    except csv.Error as exc:
        raise LeukError(f"cannot parse patients table {path}: {exc}") from None


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _pick_column(header: list[str], candidates: tuple[str, ...], what: str, path: Path) -> int:
    for name in candidates:
        if name in header:
            return header.index(name)
    raise LeukError(
        f"patients table {path.name} has no {what} column (expected one of {', '.join(candidates)}; "
        f"found {', '.join(header) or 'no header'})"
    )


# ---------------------------------------------------------------- images


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB; LeukError naming the file if it cannot, or if
    its header declares more than `max_pixels` pixels (checked before decoding)."""
    path = Path(path)
    try:
        with open_regular(path) as fh, Image.open(fh) as im:
            check_pixels(im, max_pixels)
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise LeukError(f"image not found: {shown(str(path))}") from None
    except LeukError as exc:
        raise LeukError(f"cannot read image {shown(str(path))}: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise LeukError(f"cannot read image {shown(str(path))}: {_reason(exc)}") from None


def check_pixels(im: Image.Image, max_pixels: int) -> None:
    """LeukError when an opened (not yet decoded) image declares more than `max_pixels` pixels."""
    if im.width * im.height > max_pixels:
        raise LeukError(f"{im.width}x{im.height} pixels is over the limit of {max_pixels:,} "
                        "(header checked before decoding)")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit/float rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        return _deep_to_rgb(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        im = im.convert("L")
    try:
        return im.convert("RGB")
    except ValueError:
        raise LeukError(f"unsupported image mode {mode}") from None


def _deep_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grey images to 8 bit."""
    arr = np.asarray(im).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        scaled = arr / 257.0  # 16-bit source: 65535 -> 255
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = arr / 257.0
    else:
        scaled = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return "the header declares more pixels than Pillow's decompression-bomb limit"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------- checking


@dataclass(frozen=True)
class _FileInfo:
    sha256: str | None
    size: str | None
    mode: str | None
    error: str | None


def check_dataset(root: str | Path, *, verify_images: bool = True, max_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """The report of `leuk data check`: counts, patients, sizes, unreadable files, duplicates, problems.

    Corrupt images are listed, not raised; only an unusable root (missing, no images, broken
    patients table) raises LeukError.
    """
    root = _check_root(root)
    found = _discover(root, strict=False)
    infos = _parallel_map(lambda f: _inspect_file(root / f.path, verify_images, max_pixels), found.images)
    report = _base_report(root, found, infos)
    report["images_verified"] = verify_images
    report.update(_patient_report(found))
    report.update(_duplicate_report(found, infos))
    report["problems"] = _problems(found, report)
    report["ok"] = not found.empty_classes and not report["unreadable"]
    return report


def _inspect_file(path: Path, decode: bool, max_pixels: int) -> _FileInfo:
    """Hash a file and read its size and mode (decoding it fully when `decode`)."""
    try:
        with open_regular(path) as fh:
            data = fh.read()
    except OSError as exc:
        return _FileInfo(None, None, None, exc.strerror or str(exc))
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            size, mode = f"{im.width}x{im.height}", im.mode
            check_pixels(im, max_pixels)
            if decode:
                im.load()
                to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError, LeukError, Image.DecompressionBombError) as exc:
        return _FileInfo(sha, None, None, _reason(exc))
    return _FileInfo(sha, size, mode, None)


def _base_report(root: Path, found: _Discovery, infos: list[_FileInfo]) -> dict[str, Any]:
    classes = Counter(f.label for f in found.images)
    class_names = sorted(set(classes) | set(found.empty_classes))
    sizes = Counter(i.size for i in infos if i.size)
    unreadable = sorted((f.path, i.error) for f, i in zip(found.images, infos, strict=True) if i.error)
    return {
        "root": str(root),
        "layout": found.layout,
        "num_images": len(found.images),
        "num_classes": len(class_names),
        "classes": {c: classes.get(c, 0) for c in class_names},
        "image_sizes": dict(sizes.most_common(10)),
        "num_image_sizes": len(sizes),
        "image_modes": dict(Counter(i.mode for i in infos if i.mode).most_common()),
        "unreadable": [path for path, _ in unreadable],
        "unreadable_reasons": dict(unreadable),
        "non_image_files": sorted(found.non_image_files),
        "skipped": sorted(found.skipped),
    }


def _patient_report(found: _Discovery) -> dict[str, Any]:
    per_patient = Counter(f.patient for f in found.images if f.patient is not None)
    if not per_patient:
        return {"num_patients": None, "patients_per_class": None, "images_per_patient": None}
    patient_classes: dict[str, set[str]] = defaultdict(set)
    for f in found.images:
        if f.patient is not None:
            patient_classes[f.label].add(f.patient)
    counts = sorted(per_patient.values())
    return {
        "num_patients": len(per_patient),
        "patients_per_class": {c: len(p) for c, p in sorted(patient_classes.items())},
        "images_per_patient": {"min": counts[0], "median": statistics.median(counts), "max": counts[-1]},
    }


def _duplicate_report(found: _Discovery, infos: list[_FileInfo]) -> dict[str, Any]:
    by_sha: dict[str, list[_Found]] = defaultdict(list)
    for f, info in zip(found.images, infos, strict=True):
        if info.sha256 is not None:
            by_sha[info.sha256].append(f)
    groups = [sorted(g, key=lambda f: f.path) for g in by_sha.values() if len(g) > 1]
    groups.sort(key=lambda g: g[0].path)
    return {
        "duplicate_groups": len(groups),
        "duplicate_files": sum(len(g) for g in groups),
        "duplicates": [[f.path for f in g] for g in groups],
        "duplicate_groups_across_classes": sum(len({f.label for f in g}) > 1 for g in groups),
        "duplicate_groups_across_patients": sum(len({f.patient for f in g}) > 1 for g in groups),
    }


def _problems(found: _Discovery, report: dict[str, Any]) -> list[str]:
    problems = list(found.problems)
    if report["unreadable"]:
        problems.append(
            f"{len(report['unreadable'])} images cannot be decoded (corrupt or truncated): "
            + _examples(report["unreadable"])
        )
    if report["skipped"]:
        problems.append(f"{len(report['skipped'])} entries were skipped (not regular files, symlinks leading out "
                        f"of the folder or names that are not UTF-8): {_examples(report['skipped'])}")
    if report["non_image_files"]:
        skipped = report["non_image_files"]
        problems.append(f"{len(skipped)} non-image files were skipped: {_examples(skipped)}")
    if report["duplicate_groups"]:
        problems.append(
            f"{report['duplicate_groups']} groups of byte-identical images "
            f"({report['duplicate_files']} files): splits and partitions keep each group on one side"
        )
    if n := report["duplicate_groups_across_classes"]:
        problems.append(f"{n} groups of identical images carry different labels")
    if n := report["duplicate_groups_across_patients"]:
        problems.append(f"{n} groups of identical images belong to different patients")
    counts = [n for n in report["classes"].values() if n]
    if len(counts) > 1 and max(counts) >= 3 * min(counts):
        problems.append(f"classes are imbalanced (largest/smallest = {max(counts) / min(counts):.1f})")
    if report["num_patients"] is None:
        problems.append("no patient ids: an image-level split is optimistic (consider group_by='block:N')")
    return problems


def _examples(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def format_check_report(report: dict[str, Any]) -> str:
    """Render a `check_dataset` report as a readable multi-line table."""
    lines = [
        f"dataset     {report['root']}",
        f"layout      {report['layout']}",
        f"images      {report['num_images']} in {len(report['classes'])} classes",
        f"patients    {report['num_patients'] if report['num_patients'] is not None else 'unknown'}",
        "",
        *_class_table(report),
        "",
        "image sizes " + _counter_text(report["image_sizes"], report.get("num_image_sizes")),
        "modes       " + _counter_text(report["image_modes"]),
    ]
    ipp = report.get("images_per_patient")
    if ipp:
        lines.append(f"per patient {ipp['min']} .. {ipp['median']} (median) .. {ipp['max']} images")
    lines += [
        f"duplicates  {report['duplicate_groups']} groups ({report.get('duplicate_files', 0)} files)",
        f"unreadable  {len(report['unreadable'])}",
        f"non-images  {len(report['non_image_files'])}",
        f"skipped     {len(report.get('skipped', []))}",
    ]
    for path in report["unreadable"][:20]:
        lines.append(f"  unreadable: {path} ({report.get('unreadable_reasons', {}).get(path, '')})")
    lines.append("problems:" if report["problems"] else "problems    none")
    lines += [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines)


def _class_table(report: dict[str, Any]) -> list[str]:
    per_patient = report.get("patients_per_class") or {}
    width = max([5, *(len(c) for c in report["classes"])])
    rows = [f"{'class':<{width}}  {'images':>7}  {'patients':>8}"]
    for name, count in report["classes"].items():
        patients = per_patient.get(name, "") if per_patient else ""
        rows.append(f"{name:<{width}}  {count:>7}  {patients!s:>8}")
    return rows


def _counter_text(counts: dict[str, int], distinct: int | None = None) -> str:
    text = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"
    if distinct is not None and distinct > len(counts):
        text += f" ... ({distinct} distinct)"
    return text
