"""rnnjac: recurrent neural networks as dynamical systems.

Per-step hidden-to-hidden Jacobians, their verification by finite differences, spectra (singular
values, eigenvalues, Lyapunov exponents) as labelled xarray Datasets, plots, a command line and
differentiable penalties. Conventions are in the README ("Conventions").
"""

from . import plot, regularizers
from ._checks import NonFiniteError, RnnjacWarning
from ._io import open_dataset, save
from ._version import __version__
from .checkpoints import load_checkpoint
from .dynamics import CustomCell
from .jacobians import iter_jacobians, jacobians, trajectory
from .spectra import lyapunov_spectrum, spectra
from .sweeps import analyze_checkpoints
from .verify import finite_difference_jacobians, verify

__all__ = [
    "__version__",
    "analyze_checkpoints",
    "CustomCell",
    "NonFiniteError",
    "RnnjacWarning",
    "finite_difference_jacobians",
    "iter_jacobians",
    "jacobians",
    "load_checkpoint",
    "lyapunov_spectrum",
    "open_dataset",
    "plot",
    "regularizers",
    "save",
    "spectra",
    "trajectory",
    "verify",
]
