"""client/ and server/ never import each other; only common/flower/ imports Flower inside common/."""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

def _imports(path: Path) -> set[str]:
    """Every module name an import statement in `path` names (at any depth, lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(folder: str, forbidden: str) -> set[tuple[str, str]]:
    found = set()
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if name == forbidden or name.startswith(forbidden + "."):
                found.add((path.relative_to(ROOT).as_posix(), _module_of(name)))
    return found


def _module_of(name: str) -> str:
    """`leukfed.server.secagg.secure_train` -> `leukfed.server.secagg` (the file imported)."""
    parts = name.split(".")
    for n in range(len(parts), 1, -1):
        candidate = ROOT.joinpath(*parts[1:n])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts[:n])
    return name


def test_client_does_not_import_server() -> None:
    assert _violations("client", "leukfed.server") == set()


def test_server_does_not_import_client() -> None:
    assert _violations("server", "leukfed.client") == set()


def test_only_the_adapter_imports_flower_in_common() -> None:
    offenders = set()
    for path in sorted((ROOT / "common").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("common/flower/"):
            continue
        if any(name == "flwr" or name.startswith("flwr.") for name in _imports(path)):
            offenders.add(relative)
    assert offenders == set()


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from leukfed.server import secagg\n    import flwr.app\n")
    assert {"leukfed.server", "leukfed.server.secagg", "flwr.app"} <= _imports(sample)
