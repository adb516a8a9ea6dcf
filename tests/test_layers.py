"""The package's layers (issue 25, docs/architecture.md): imports go only down, as the
import-linter ``layers`` contract in pyproject.toml says (imports inside functions count), and no
module imports another module's private name."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ekd_lightning

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(ekd_lightning.__file__).parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path, src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contract of ``root``'s pyproject.toml on the package in ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_imports_go_only_down_the_layers():
    done = lint_imports(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    """The bottom layer importing the pipeline, inside a function as the old cycle did."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    units = tmp_path / "src" / "ekd_lightning" / "core" / "units.py"
    units.write_text(units.read_text() + "\n\ndef planted():\n    from ..workflow import pipeline\n\n"
                     "    return pipeline\n")
    done = lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode == 1, done.stdout[-3000:]
    assert "ekd_lightning.core.units -> ekd_lightning.workflow.pipeline" in done.stdout
    assert "Contracts: 0 kept, 1 broken." in done.stdout


def private_imports(path: Path, root: Path = SRC) -> list[str]:
    """``file:line: name`` for each private name (``_x``, not ``__x__``) that ``path`` imports
    from an ekd_lightning module (relative or absolute)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        internal = isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("ekd_lightning"))
        if internal:
            found += [f"{path.relative_to(root)}:{node.lineno}: {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.endswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another():
    assert [hit for path in sorted(SRC.rglob("*.py")) for hit in private_imports(path)] == []


def test_the_private_name_check_finds_a_planted_one(tmp_path):
    planted = tmp_path / "units.py"
    planted.write_text((SRC / "core" / "units.py").read_text()
                       + "\n\ndef f():\n    from ..analysis.md import _first\n")
    assert private_imports(planted, tmp_path) == [f"units.py:{len(planted.read_text().splitlines())}: _first"]


def imported_modules(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every ``from X import ...`` in ``path`` that names an
    ekd_lightning module, relative ones resolved against the file's package."""
    package = ["ekd_lightning", *path.parent.relative_to(root).parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ekd_lightning"):
            found.append((node.lineno, node.module))
    return found


def test_every_import_inside_the_package_resolves():
    """import-linter ignores an import of a module that does not exist; an import inside a
    function would fail only when called. Every module named must exist."""
    missing = [f"{path.relative_to(SRC)}:{line}: {module}" for path in sorted(SRC.rglob("*.py"))
               for line, module in imported_modules(path) if not exists(module)]
    assert missing == []


def exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
