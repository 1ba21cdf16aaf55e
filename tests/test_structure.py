"""The house's standing rules, checked on the source: module size, top-level imports, docs that stay inside."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mast"
LAZY_DISPATCH = {"cli.py"}  # the command line imports each stage only when it runs


def _modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def _imports_mast(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "mast"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "mast" for a in node.names)
    return False


def nested_mast_imports(source: str) -> list[int]:
    """Line numbers of `mast` imports inside a function or class body (hidden structure)."""
    lines = []
    for scope in ast.walk(ast.parse(source)):
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            lines += [n.lineno for n in ast.walk(scope) if _imports_mast(n)]
    return sorted(set(lines))


def test_the_check_sees_an_import_inside_a_function():
    src = "import os\nfrom mast.files import InputError\n\ndef f():\n    from mast import grading\n    return grading\n"
    assert nested_mast_imports(src) == [5]


def test_mast_modules_import_each_other_at_the_top():
    found = {p.name: nested_mast_imports(p.read_text(encoding="utf-8")) for p in _modules()
             if p.name not in LAZY_DISPATCH}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_module_over_700_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in _modules()}
    assert {k: n for k, n in sizes.items() if n > 700} == {}


def test_docs_and_docstrings_stay_inside_the_repository():
    files = [*_modules(), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = re.compile(r"ARCHITECTURE\.md|\.\./shared/(?!data)")
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert hits == []
