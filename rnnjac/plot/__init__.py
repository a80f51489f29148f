"""Plots of spectra and fixed-point Datasets: ``f(ds, *, ax=None, **kwargs) -> matplotlib.axes.Axes``.

A figure is created only when ``ax`` is None; labels come from each variable's ``long_name`` and
``units``; nothing here calls ``show()`` or ``savefig`` (the command line and the analyses save).
Matplotlib is imported lazily so that ``import rnnjac`` stays light.

Sweeps (a Dataset with a ``checkpoint`` or ``training_step`` dim, from :func:`rnnjac.analyze_checkpoints`):
:func:`singular_values` and :func:`lyapunov_spectrum` draw one line per checkpoint, coloured by training
step; :func:`lyapunov_vs_training_step` and :func:`kaplan_yorke_vs_training_step` draw the exponents and
the Kaplan-Yorke dimension against training step; the plots over time or the complex plane
(:func:`singular_value_heatmap`, :func:`lyapunov_convergence`, :func:`eigenvalues`, :func:`end_to_end`)
draw one checkpoint chosen with ``checkpoint=`` (a position or a path) and refuse a sweep without it.
Fixed-point Datasets (from :func:`rnnjac.fixed_points`): :func:`fixed_points` draws the points in a PCA
projection (over trajectories when given), :func:`fixed_point_eigenvalues` their eigenvalues in the complex
plane. Every plot checks its Dataset before it creates a figure, :func:`available` lists exactly the plots
that can be drawn from a Dataset without keywords, and :func:`summary` puts them side by side in one figure.
"""

from ._common import SWEEP_DIMS as SWEEP_DIMS  # kept importable as rnnjac.plot.SWEEP_DIMS
from ._common import _why_not
from ._fixed_points import fixed_point_eigenvalues, fixed_points
from ._sensitivity import sensitivity
from ._spectra import (
    eigenvalues,
    end_to_end,
    lyapunov_convergence,
    lyapunov_spectrum,
    singular_value_heatmap,
    singular_values,
)
from ._summary import compare, summary
from ._sweeps import kaplan_yorke_vs_training_step, lyapunov_vs_training_step

__all__ = [
    "singular_values",
    "singular_value_heatmap",
    "lyapunov_spectrum",
    "lyapunov_convergence",
    "eigenvalues",
    "end_to_end",
    "lyapunov_vs_training_step",
    "kaplan_yorke_vs_training_step",
    "compare",
    "fixed_points",
    "fixed_point_eigenvalues",
    "sensitivity",
    "available",
    "summary",
    "PLOTS",
]

#: plot name -> plot function ``f(ds, *, ax=None, ...)``, in the order of :func:`summary` for one model
#: (each Dataset draws only its own kind: spectra, a sweep, or fixed points)
PLOTS = {
    "singular_values": singular_values,
    "singular_value_heatmap": singular_value_heatmap,
    "lyapunov_spectrum": lyapunov_spectrum,
    "lyapunov_convergence": lyapunov_convergence,
    "eigenvalues": eigenvalues,
    "end_to_end": end_to_end,
    "sensitivity": sensitivity,
    "lyapunov_vs_training_step": lyapunov_vs_training_step,
    "kaplan_yorke_vs_training_step": kaplan_yorke_vs_training_step,
    "fixed_points": fixed_points,
    "fixed_point_eigenvalues": fixed_point_eigenvalues,
}


def available(ds) -> list[str]:
    """Names of the plots in :data:`PLOTS` that ``PLOTS[name](ds)`` draws without further keywords.

    For one model: the plots whose variables ``ds`` has. For a sweep of several checkpoints: the
    per-checkpoint spectra and the curves over training (the others need ``checkpoint=``). For a
    fixed-point dataset with at least one point: :func:`fixed_points` and :func:`fixed_point_eigenvalues`.

    Examples
    --------
    >>> for name in rnnjac.plot.available(ds):  # doctest: +SKIP
    ...     rnnjac.plot.PLOTS[name](ds).figure.savefig(f"{name}.png")
    >>> import xarray as xr
    >>> from rnnjac import plot
    >>> plot.available(xr.Dataset())  # nothing to draw
    []
    """
    return [name for name in PLOTS if _why_not(name, ds) is None]
