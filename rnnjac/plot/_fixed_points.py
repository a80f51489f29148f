"""Plots of a fixed-point Dataset (from :func:`rnnjac.fixed_points`)."""

from __future__ import annotations

import numpy as np

from ._common import _axes, _check, _title


def _fixed_point_data(name: str, ds, condition):
    """Check a :func:`rnnjac.fixed_points` Dataset for the plot ``name``; the rows of one ``condition`` (None: all)."""
    ds, _ = _check(name, ds)
    if condition is None or "condition_index" not in ds.data_vars:
        return ds
    n = ds.sizes.get("condition", 1)
    if not isinstance(condition, (int, np.integer)) or not 0 <= condition < n:
        raise ValueError(f"condition must be an integer in 0..{n - 1}; got {condition!r}")
    return ds.isel(fixed_point=np.flatnonzero(ds["condition_index"].values == condition))


#: marker styles of the point groups in :func:`fixed_points` and :func:`fixed_point_eigenvalues`
_POINT_STYLE = {
    "stable fixed points": dict(marker="o", s=60, facecolors="C0", edgecolors="k", zorder=3),
    "unstable fixed points": dict(marker="o", s=60, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=3),
    "slow points": dict(marker="x", s=12, color="0.3", linewidths=0.8, zorder=2),
}
_EIGENVALUE_STYLE = {
    "stable fixed points": dict(marker="o", s=10, color="C0", alpha=0.7),
    "unstable fixed points": dict(marker="x", s=18, color="C3", alpha=0.9),
    "slow points": dict(marker=".", s=6, color="0.5", alpha=0.5),
}


def _trajectory_array(trajectories, d: int):
    """``trajectories`` (a tensor or array, ``(B, T+1, D)`` or ``(T+1, D)``) as a float ``(B, T+1, d)`` array."""
    if trajectories is None:
        return None
    lines = np.asarray(trajectories.detach().cpu() if hasattr(trajectories, "detach") else trajectories, float)
    lines = lines[None] if lines.ndim == 2 else lines
    if lines.ndim != 3 or lines.shape[-1] != d:
        raise ValueError(f"trajectories must be (B, T+1, D) with D = {d} (as the points); got {lines.shape}")
    return lines


def _pca(data: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, components (k, D), explained variance ratios)`` of ``data (n, D)`` by SVD."""
    mean = data.mean(0)
    _, sv, vt = np.linalg.svd(data - mean, full_matrices=False)
    var = sv**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    return mean, vt[list(dims)], ratio[list(dims)]


def _fp_groups(ds):
    fixed = ds["is_fixed_point"].values.astype(bool)
    stable = ds["stable"].values.astype(bool)
    return {
        "stable fixed points": fixed & stable,
        "unstable fixed points": fixed & ~stable,
        "slow points": ~fixed,
    }


def fixed_points(ds, trajectories=None, *, ax=None, dims=(0, 1), condition=None, max_lines=200, **kwargs):
    """Fixed and slow points in a PCA projection, over the trajectories when given.

    The principal components are fitted (SVD) on the trajectories' states, or on the points without
    them; ``dims`` picks two of them (0-based). Stable fixed points are filled circles, unstable ones open
    circles, slow points small grey crosses; trajectories are thin lines.

    Parameters
    ----------
    ds : xarray.Dataset
        The output of :func:`rnnjac.fixed_points`.
    trajectories : array, optional
        ``(B, T+1, D)`` (or ``(T+1, D)``) states in the coordinates of ``ds.fixed_point_states`` (the full
        state, or the h parts for ``state="h"``), e.g. from :func:`rnnjac.trajectory`.
    dims : tuple of two ints
        Which principal components are drawn.
    condition : int, optional
        Draw the points of one input condition only.
    max_lines : int
        At most this many trajectories are drawn (all are used for the PCA).

    Examples
    --------
    >>> rnnjac.plot.fixed_points(ds, rnnjac.trajectory(gru, x))  # doctest: +SKIP
    """
    ds = _fixed_point_data("fixed_points", ds, condition)
    pts = ds["fixed_point_states"].values
    d = pts.shape[-1]
    lines = _trajectory_array(trajectories, d)
    if d == 1:  # a one-unit state: drawn on a line (a zero second coordinate)
        pts = np.concatenate([pts, np.zeros_like(pts)], -1)
        lines = None if lines is None else np.concatenate([lines, np.zeros_like(lines)], -1)
        d = 2
    if len(dims) != 2 or any(not isinstance(i, (int, np.integer)) or not 0 <= i < d for i in dims):
        raise ValueError(f"dims must be two principal components in 0..{d - 1}; got {dims!r}")
    fit = lines.reshape(-1, d) if lines is not None else pts
    if fit.shape[0] == 0:
        raise ValueError("nothing to draw: the dataset has no fixed or slow point and no trajectories were given")
    mean, comps, ratio = _pca(fit, dims) if fit.shape[0] > 1 else (fit[0], np.eye(d)[list(dims)], np.zeros(2))
    ax = _axes(ax, (5.5, 5.0))
    for line in [] if lines is None else lines[:max_lines]:
        xy = (line - mean) @ comps.T
        ax.plot(xy[:, 0], xy[:, 1], color="0.6", lw=0.4, alpha=0.5, zorder=1)
    for label, mask in _fp_groups(ds).items():
        if mask.any():
            xy = (pts[mask] - mean) @ comps.T
            ax.scatter(xy[:, 0], xy[:, 1], label=f"{label} ({int(mask.sum())})", **{**_POINT_STYLE[label], **kwargs})
    ax.set_xlabel(f"PC{dims[0] + 1} ({100 * ratio[0]:.0f}% var.)")
    ax.set_ylabel(f"PC{dims[1] + 1} ({100 * ratio[1]:.0f}% var.)")
    ax.set_title(_title(ds, "Fixed points"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    return ax


def fixed_point_eigenvalues(ds, *, ax=None, condition=None, slow_points=False, **kwargs):
    """Eigenvalues of ``J`` at the fixed points in the complex plane, with the unit circle.

    Eigenvalues of stable fixed points are blue dots, of unstable ones red crosses; ``slow_points=True``
    adds those of the slow points (grey).

    Examples
    --------
    >>> rnnjac.plot.fixed_point_eigenvalues(rnnjac.fixed_points(gru, initial_states=states))  # doctest: +SKIP
    """
    ds = _fixed_point_data("fixed_point_eigenvalues", ds, condition)
    re, im = ds["fixed_point_eigenvalues_real"].values, ds["fixed_point_eigenvalues_imag"].values
    ax = _axes(ax, (5, 5))
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="k", lw=0.8, label="unit circle")
    for label, mask in _fp_groups(ds).items():
        if mask.any() and (slow_points or label != "slow points"):
            style = {**_EIGENVALUE_STYLE[label], **kwargs}
            ax.scatter(re[mask].ravel(), im[mask].ravel(), label=f"{label} ({int(mask.sum())})", **style)
    ax.set_aspect("equal")
    ax.set_xlabel("Re(λ)")
    ax.set_ylabel("Im(λ)")
    ax.set_title(_title(ds, "Eigenvalues of J at fixed points"))
    ax.legend(fontsize="small", loc="upper left")
    return ax
