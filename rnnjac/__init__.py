"""rnnjac: recurrent neural networks as dynamical systems.

Per-step hidden-to-hidden Jacobians, their verification by finite differences, spectra (singular
values, eigenvalues, Lyapunov exponents) as labelled xarray Datasets, plots, a command line and
differentiable penalties. Conventions are in the README ("Conventions").

Every public name is importable from here; the modules behind them are private (``rnnjac._*``), apart
from ``rnnjac.errors``, ``rnnjac.plot``, ``rnnjac.regularizers`` and ``rnnjac.tasks``. Names are
imported on first use (PEP 562), so ``import rnnjac`` and ``rnnjac --version`` do not load torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "analyze_checkpoints": ".sweeps",
    "CheckpointError": ".errors",
    "CustomCell": ".dynamics",
    "NonFiniteError": ".errors",
    "RnnjacWarning": ".errors",
    "finite_difference_jacobians": ".verify",
    "fixed_points": ".fixed_points",
    "iter_jacobians": ".jacobians",
    "jacobians": ".jacobians",
    "load_checkpoint": ".checkpoints",
    "lyapunov_spectrum": ".spectra",
    "open_dataset": "._io",
    "save": "._io",
    "spectra": ".spectra",
    "trajectory": ".jacobians",
    "verify": ".verify",
}
_SUBMODULES = ("errors", "plot", "regularizers", "tasks")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # static imports for type checkers and IDEs; at run time names load lazily
    from . import errors, plot, regularizers, tasks
    from ._io import open_dataset, save
    from .checkpoints import load_checkpoint
    from .dynamics import CustomCell
    from .errors import CheckpointError, NonFiniteError, RnnjacWarning
    from .fixed_points import fixed_points
    from .jacobians import iter_jacobians, jacobians, trajectory
    from .spectra import lyapunov_spectrum, spectra
    from .sweeps import analyze_checkpoints
    from .verify import finite_difference_jacobians, verify


# TEMPORARY until the modules named like functions become private (rename pass): bind them eagerly
from .fixed_points import fixed_points  # noqa: E402
from .jacobians import jacobians  # noqa: E402
from .spectra import spectra  # noqa: E402
from .verify import verify  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES or (not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}")):
        value = importlib.import_module(f".{name}", __name__)  # any submodule, as a plain package would
    else:
        raise AttributeError(f"module 'rnnjac' has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
