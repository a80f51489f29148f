"""The layering that the README's "Architecture" section describes, checked against the real imports.

Every ``import``/``from ... import`` of a module of the package (at module level or inside a function) must go
to the same layer or a lower one: the model protocol knows nothing of kernels, the tensor core nothing of
Datasets, files, plots or the command line. The table below is the README's list; if one changes, so must the other.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rnnjac"

#: lowest first; a module may import from its own layer and the layers below
LAYERS = [
    (
        "foundations",
        {
            "_version",
            "errors",
            "_elementwise",
            "_fused_rows",
            "_cells",
            "_recurrence",
            "_linalg",
            "_io",
            "_submodule",
            "tasks",
        },
    ),
    ("model protocol", {"_linearization", "_system", "_builtin_system", "_custom_system", "_dynamics", "_datasets"}),
    ("checks and options", {"_checks", "_options"}),
    (
        "tensor core",
        {
            "_kernels",
            "_lyapunov_qr",
            "_orthonormalise",
            "_fd",
            "_input_output",
            "_uncertainty",
            "_transients",
            "_input_jacobians",
            "_clv",
        },
    ),
    (
        "labelled layer",
        {
            "_jacobians",
            "_spectra",
            "_verify",
            "_fixed_points",
            "_lyapunov_check",
            "_penalties",
            "regularizers",
            "_sensitivity",
            "_lyapunov_vectors",
        },
    ),
    (
        "applications",
        {"_checkpoints", "_user_model", "_pipeline", "_sweeps", "_distributed", "monitor", "lightning", "plot", "cli"},
    ),
]
LAYER = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _unit(path: Path) -> str:
    """The layer unit of a file: its module name, or its top-level subpackage (``plot``, ``cli``)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for rnnjac/x.py, 1 for rnnjac/plot/x.py
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the package root, then the first part names the unit
                if node.level - 1 < depth:
                    continue  # inside the same subpackage
                parts = (node.module or "").split(".")
                names = [parts[0]] if parts[0] else [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "rnnjac":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rnnjac" and len(parts) > 1:
                    out.add(parts[1])
    return {n for n in out if n in LAYER}


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__main__.py",) and p != PACKAGE / "__init__.py")


def test_every_module_has_a_layer():
    missing = sorted({_unit(p) for p in FILES} - set(LAYER))
    assert not missing, f"modules missing from the layer table (add them here and to the README): {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path):
    unit = _unit(path)
    upward = sorted(n for n in _imported_units(path) if LAYER[n] > LAYER[unit])
    assert not upward, f"{unit} ({LAYERS[LAYER[unit]][0]}) imports from higher layers: " + ", ".join(
        f"{n} ({LAYERS[LAYER[n]][0]})" for n in upward
    )
