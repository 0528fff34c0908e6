"""The patients table of the patient-folders layout: patient id -> diagnosis from a CSV/TSV."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from leukfed.common.data_files import entry_problem
from leukfed.common.errors import LeukError

PATIENT_TABLE_NAMES = ("patients.csv", "patients.tsv")
PATIENT_COLUMNS = (
    "patient", "patient_id", "patientid", "patient_name", "subject", "subject_id", "case", "case_id", "id",
)
DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "label", "class", "target")


def find_patient_table(root: Path) -> Path | None:
    """The patients table at the root of a dataset folder, if there is one."""
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
