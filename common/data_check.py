"""The `leuk data check` report: counts, patients, sizes, unreadable files, duplicates and problems."""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from leukfed.common.data import examples, parallel_map
from leukfed.common.data_files import MAX_IMAGE_PIXELS, open_regular
from leukfed.common.data_layouts import Discovery, Found, check_root, discover
from leukfed.common.errors import LeukError
from leukfed.common.images import check_pixels, image_error_reason, to_rgb


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
    root = check_root(root)
    found = discover(root, strict=False)
    infos = parallel_map(lambda f: _inspect_file(root / f.path, verify_images, max_pixels), found.images)
    report = _base_report(root, found, infos)
    report["images_verified"] = verify_images
    report.update(_patient_report(found))
    report.update(_duplicate_report(found, infos))
    report["problems"] = _problems(found, report)
    report["ok"] = not found.empty_classes and not report["unreadable"]
    return report


def _inspect_file(path: Path, decode: bool, max_pixels: int) -> _FileInfo:
    """Hash a file and read its size and mode (decoding it fully when `decode`). The file is streamed,
    never held whole: eight threads over a folder with a few huge files must not exhaust memory."""
    try:
        with open_regular(path) as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
            fh.seek(0)
            return _inspect_image(fh, sha, decode, max_pixels)
    except OSError as exc:
        return _FileInfo(None, None, None, exc.strerror or str(exc))


def _inspect_image(fh: BinaryIO, sha: str, decode: bool, max_pixels: int) -> _FileInfo:
    try:
        with Image.open(fh) as im:
            size, mode = f"{im.width}x{im.height}", im.mode
            check_pixels(im, max_pixels)
            if decode:
                im.load()
                to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError, LeukError, Image.DecompressionBombError) as exc:
        return _FileInfo(sha, None, None, image_error_reason(exc))
    return _FileInfo(sha, size, mode, None)


def _base_report(root: Path, found: Discovery, infos: list[_FileInfo]) -> dict[str, Any]:
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


def _patient_report(found: Discovery) -> dict[str, Any]:
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


def _duplicate_report(found: Discovery, infos: list[_FileInfo]) -> dict[str, Any]:
    by_sha: dict[str, list[Found]] = defaultdict(list)
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


def _problems(found: Discovery, report: dict[str, Any]) -> list[str]:
    problems = list(found.problems)
    if report["unreadable"]:
        problems.append(
            f"{len(report['unreadable'])} images cannot be decoded (corrupt or truncated): "
            + examples(report["unreadable"])
        )
    if report["skipped"]:
        problems.append(f"{len(report['skipped'])} entries were skipped (not regular files, symlinks leading out "
                        f"of the folder or names that are not UTF-8): {examples(report['skipped'])}")
    if report["non_image_files"]:
        skipped = report["non_image_files"]
        problems.append(f"{len(skipped)} non-image files were skipped: {examples(skipped)}")
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
