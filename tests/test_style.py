"""The reading rules the project holds its code to (STYLE.md): lines of at most 100 characters,
one statement per line: no `;`, no lambda bound to a name, no `a, b = x, y` packing (unpacking
what a call returns is fine). The files are found by pattern, so a new test or script is held to
them too."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = ["star.py", "train.py", *sorted(glob.glob("tests/**/*.py", root_dir=ROOT, recursive=True))]
SHELL = [".ci/run", *sorted(glob.glob("tests/**/*.sh", root_dir=ROOT, recursive=True))]


@pytest.mark.parametrize("name", [*PYTHON, "scan_cuda.cu", *SHELL])
def test_no_line_over_100_characters(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        wide = [i for i, line in enumerate(f.read().split("\n"), 1) if len(line) > 100]
    assert not wide, f"{name}: lines over 100 characters: {wide}"


@pytest.mark.parametrize("name", PYTHON)
def test_one_statement_per_line(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    lines = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            lines.setdefault(node.lineno, []).append(node)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            pytest.fail(f"{name}:{node.lineno}: a lambda bound to a name; write a def")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and isinstance(
                node.targets[0], ast.Tuple):
            pytest.fail(f"{name}:{node.lineno}: several assignments packed into one; one a line")
    packed = [n for n, stmts in lines.items() if len(stmts) > 1 and not any(
        isinstance(s, (ast.If, ast.For, ast.While, ast.With, ast.Try)) for s in stmts)]
    assert not packed, f"{name}: several statements on lines {packed}"
