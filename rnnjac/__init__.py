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

#: public name -> the private module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    "analyze_checkpoints": "._sweeps",
    "CheckpointError": ".errors",
    "ConvergenceWarning": ".errors",
    "ConditioningWarning": ".errors",
    "CustomCell": "._custom_system",
    "NonFiniteError": ".errors",
    "RnnjacWarning": ".errors",
    "SpectraOptions": "._options",
    "SpectrumMonitor": ".monitor",
    "finite_difference_jacobians": "._verify",
    "fixed_points": "._fixed_points",
    "iter_jacobians": "._jacobians",
    "jacobians": "._jacobians",
    "load_checkpoint": "._checkpoints",
    "lyapunov_spectrum": "._spectra",
    "lyapunov_vectors": "._lyapunov_vectors",
    "open_dataset": "._io",
    "save": "._io",
    "spectra": "._spectra",
    "input_jacobians": "._sensitivity",
    "memory_profile": "._sensitivity",
    "sensitivity": "._sensitivity",
    "trajectory": "._jacobians",
    "verify": "._verify",
    "verify_lyapunov": "._lyapunov_check",
}
#: public modules (``rnnjac.lightning`` needs the optional Lightning extra and is imported explicitly)
_SUBMODULES = ("errors", "monitor", "plot", "regularizers", "tasks")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # static imports for type checkers and IDEs; at run time names load lazily
    from . import errors, monitor, plot, regularizers, tasks
    from ._checkpoints import load_checkpoint
    from ._custom_system import CustomCell
    from ._fixed_points import fixed_points
    from ._io import open_dataset, save
    from ._jacobians import iter_jacobians, jacobians, trajectory
    from ._lyapunov_check import verify_lyapunov
    from ._lyapunov_vectors import lyapunov_vectors
    from ._options import SpectraOptions
    from ._sensitivity import input_jacobians, memory_profile, sensitivity
    from ._spectra import lyapunov_spectrum, spectra
    from ._sweeps import analyze_checkpoints
    from ._verify import finite_difference_jacobians, verify
    from .errors import CheckpointError, ConditioningWarning, ConvergenceWarning, NonFiniteError, RnnjacWarning
    from .monitor import SpectrumMonitor


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
