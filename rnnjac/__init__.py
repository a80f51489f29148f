"""rnnjac: recurrent neural networks as dynamical systems.

Per-step hidden-to-hidden Jacobians, their verification by finite differences, spectra (singular
values, eigenvalues, Lyapunov exponents) as labelled xarray Datasets, plots, a command line and
differentiable penalties. Conventions are in the README ("Conventions").
"""

from ._version import __version__
from ._checks import NonFiniteError, RnnjacWarning
from .dynamics import CustomCell
from .jacobians import iter_jacobians, jacobians, trajectory

__all__ = [
    "__version__",
    "CustomCell",
    "NonFiniteError",
    "RnnjacWarning",
    "iter_jacobians",
    "jacobians",
    "trajectory",
]
