"""The package's shape (issue 17): module sizes, import rules, and the import paths held in strings.

String import paths (the worker preload list, ``xpcat``'s lazy names) are
invisible to tools: a stale one only warns at worker start or fails on first
use, so each is imported here.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import xpcat

PACKAGE = Path(xpcat.__file__).resolve().parent
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import statement in ``path`` (absolute form)."""
    tree = ast.parse(path.read_text())
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the tree uses absolute imports)"
            out.append((node.module or "", [alias.name for alias in node.names]))
    return out


def test_every_module_imports():
    for info in pkgutil.walk_packages(xpcat.__path__, "xpcat."):
        importlib.import_module(info.name)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {n} lines (> {MAX_LINES}): split it along its seams"


def test_model_is_pure_arrays():
    banned = ("xpcat.production", "xpcat.jobs", "pyarrow", "dask", "distributed", "astroquery")
    for path in (PACKAGE / "model").rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(banned), f"{path.relative_to(PACKAGE)} imports {module}"


def test_no_cross_module_private_imports():
    for path in _modules():
        here = _dotted(path)
        for module, names in _imports(path):
            if not module.startswith("xpcat") or module == here:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{here} imports private names {private} from {module}"
            last = module.rsplit(".", 1)[-1]
            assert not (last.startswith("_") and not last.startswith("__") and module.rsplit(".", 1)[0] != here.rsplit(".", 1)[0]), (
                f"{here} imports the private module {module} from another package")


def test_preload_modules_import():
    from xpcat.jobs import preload

    for name in preload.MODULES:
        importlib.import_module(name)


def test_lazy_names_resolve():
    for name in xpcat.__all__:
        assert getattr(xpcat, name) is not None
