"""Plots of sweeps: one line per checkpoint coloured by training step, and curves over training."""

from __future__ import annotations

import numpy as np

from ._common import _axes, _check, _checkpoint_names, _curve, _indices, _integer_ticks, _label, _sweep_x, _title


def _sweep_colors(ax, ds, dim: str):
    """One viridis colour per checkpoint by training step, with a colorbar on ``ax``'s figure."""
    import matplotlib as mpl

    x, label = _sweep_x(ds, dim)
    norm = mpl.colors.Normalize(x.min(), x.max() if x.max() > x.min() else x.min() + 1)
    cmap = mpl.colormaps["viridis"]
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    ax.figure.colorbar(sm, ax=ax, label=label)
    return [cmap(norm(v)) for v in x]


def _lines_per_checkpoint(ax, ds, dim: str, da, log: bool = False, **kwargs) -> None:
    """One line per checkpoint of ``da`` (dims ``(dim, index)``) against index 1..n."""
    curves = da.transpose(dim, ...).values
    idx = np.arange(1, curves.shape[-1] + 1)
    for curve, color, name in zip(curves, _sweep_colors(ax, ds, dim), _checkpoint_names(ds, dim), strict=True):
        _curve(ax, idx, curve, log=log, marker="o", ms=2.5, lw=1.2, color=color, label=name, **kwargs)
    _integer_ticks(ax.xaxis)
    lost = [a for a in ax.lines if a.get_label().startswith("−∞")]
    if lost:  # the colorbar names the checkpoints; the legend only explains the markers
        ax.legend(handles=lost, fontsize="small")


def _against_steps(ax, ds, dim: str, da, label: str, band_label: str = "_band", **kwargs):
    """Median over the batch of ``da`` (dims ``(dim, batch)``) against training step, with the min–max band."""
    x, xlabel = _sweep_x(ds, dim)
    vals = da.transpose(dim, "batch").values
    order = np.argsort(x, kind="stable")
    x, vals = x[order], vals[order]
    line = _curve(ax, x, np.median(vals, 1), marker="o", ms=3, label=label, **kwargs)
    if vals.shape[1] > 1:
        ax.fill_between(x, vals.min(1), vals.max(1), color=line.get_color(), alpha=0.2, lw=0, label=band_label)
    ax.set_xlabel(xlabel)
    if xlabel.startswith("checkpoint"):
        names = [_checkpoint_names(ds, dim)[i].replace("\\", "/").rsplit("/", 1)[-1] for i in order]
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize="small")
    return line


def lyapunov_vs_training_step(ds, *, ax=None, indices=None, **kwargs):
    """Lyapunov exponents of a sweep against training step: median over the batch with its min–max band.

    Parameters
    ----------
    ds : xarray.Dataset
        A sweep (a ``checkpoint`` or ``training_step`` dim) with ``lyapunov_exponents``.
    ax : matplotlib.axes.Axes, optional
        Drawn into; a new figure when None.
    indices : list of int, optional
        Exponents to draw (0-based; default the first two, the middle one and the last).

    Examples
    --------
    >>> sweep = rnnjac.analyze_checkpoints(paths)  # doctest: +SKIP
    >>> rnnjac.plot.lyapunov_vs_training_step(sweep, indices=[0, 1, 2])  # doctest: +SKIP
    """
    ds, dim = _check("lyapunov_vs_training_step", ds)
    le = ds["lyapunov_exponents"]
    k = le.sizes["le_index"]
    indices = _indices(indices, k, (0, 1, k // 2, k - 1))
    ax = _axes(ax, (6.5, 4.0))
    for i in indices:
        _against_steps(ax, ds, dim, le.isel(le_index=i), f"λ_{i + 1}", **kwargs)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel(_label(le))
    ax.set_title(_title(ds, "Lyapunov exponents over training"))
    ax.legend(fontsize="small", ncol=2, title="median, min–max over batch", title_fontsize="small")
    return ax


def kaplan_yorke_vs_training_step(ds, *, ax=None, **kwargs):
    """Kaplan–Yorke dimension of a sweep against training step: median over the batch, min–max band.

    Examples
    --------
    >>> rnnjac.plot.kaplan_yorke_vs_training_step(sweep)  # doctest: +SKIP
    """
    ds, dim = _check("kaplan_yorke_vs_training_step", ds)
    kyd = ds["kaplan_yorke_dimension"]
    ax = _axes(ax, (6.5, 4.0))
    _against_steps(ax, ds, dim, kyd, "median over batch", "min–max over batch", **kwargs)
    ax.legend(fontsize="small")
    top = np.nanmax(kyd.values, initial=0.0)
    ax.set_ylim(0.0, max(1.0, 1.1 * top))  # the dimension is >= 0; a flat 0 sits on the axis
    ax.set_ylabel(_label(kyd))
    ax.set_title(_title(ds, "Kaplan–Yorke dimension over training"))
    return ax
