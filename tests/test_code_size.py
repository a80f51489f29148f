"""Module and function sizes: each module under ~400 lines, each function under ~80 lines of code.

Measured over the whole ``rnnjac`` package; asserted for ``rnnjac/plot/`` and ``rnnjac/cli/`` (the other modules'
offenders are printed, run with ``-s`` to see them, until the assertion is extended to them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rnnjac

PACKAGE = Path(rnnjac.__file__).parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
ASSERTED = ("plot", "cli")  # folders of the package whose sizes are asserted, not only reported


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the end of the body, without the docstring (decorators not counted)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def sizes(path: Path) -> tuple[int, dict[str, int]]:
    """``(lines in the file, {qualified function name: lines of code})``, nested functions and methods included."""
    text = path.read_text(encoding="utf-8")
    found: dict[str, int] = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[name] = function_lines(child)
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(text, filename=str(path)), "")
    return len(text.splitlines()), found


def offenders(path: Path) -> list[str]:
    n, functions = sizes(path)
    out = [f"{n} lines (limit {MAX_FILE_LINES})"] if n > MAX_FILE_LINES else []
    return out + [
        f"{f}: {k} lines (limit {MAX_FUNCTION_LINES})" for f, k in functions.items() if k > MAX_FUNCTION_LINES
    ]


def test_the_measure_counts_code_not_the_docstring():
    src = 'def f(x):\n    """One.\n\n    Two.\n    """\n    y = x\n    return y\n\n\ndef g():\n    return 1\n'
    f, g = ast.parse(src).body
    assert (function_lines(f), function_lines(g)) == (3, 2)


def test_module_and_function_sizes():
    report, failures = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        bad = offenders(path)
        if bad:
            (failures if rel.parts[0] in ASSERTED else report).append(f"rnnjac/{rel.as_posix()}: " + "; ".join(bad))
    if report:
        print("\nsizes over the limits (reported, not yet asserted):\n  " + "\n  ".join(report))
    assert not failures, "\n".join(failures)
    assert any(PACKAGE.joinpath(d).is_dir() for d in ASSERTED)  # the asserted folder exists: the test is not empty
