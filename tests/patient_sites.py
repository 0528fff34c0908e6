"""Hospitals' own patient folders for patient-task tests: a few apl_aml patients each, with their patients.csv."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path


def make_site_folders(source: Path, root: Path, sites: dict[str, tuple[int, int]], cells: int) -> dict[str, Path]:
    """Per site (name -> (APL, AML) patients), copies of the first `cells` cells of distinct patients of
    `source` (apl_aml) and a patients.csv naming just them."""
    with (source / "patients.csv").open() as f:
        rows = list(csv.DictReader(f))
    pools = {d: [r for r in rows if r["diagnosis"] == d] for d in ("APL", "AML")}
    folders = {}
    for name, (apl, aml) in sites.items():
        chosen = [pools["APL"].pop(0) for _ in range(apl)] + [pools["AML"].pop(0) for _ in range(aml)]
        folder = root / name
        for row in chosen:
            for cell in sorted((source / row["patient"]).rglob("*.jpg"))[:cells]:
                target = folder / cell.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cell, target)
        (folder / "patients.csv").write_text("patient,diagnosis\n" + "".join(
            f"{r['patient']},{r['diagnosis']}\n" for r in chosen))
        folders[name] = folder
    return folders
