"""Figures over several plots or datasets: :func:`summary` and :func:`compare`."""

from __future__ import annotations

import numpy as np

from ._common import _SPEC, _axes, _curve, _label, _require, _select_checkpoint, _sweep_dim, _sweep_x, _why_not


def _compare_curve(ds, variable: str, where: str):
    """The 1-D curve :func:`compare` draws for one dataset (median over batch and time), checked."""
    dim = _sweep_dim(ds)
    if dim is not None and ds.sizes[dim] > 1:
        raise ValueError(
            f"compare draws one curve per dataset and {where} is a sweep of {ds.sizes[dim]} checkpoints; "
            f"pass one checkpoint (ds.isel({dim}=i)), or draw every checkpoint with lyapunov_spectrum(ds) "
            "or singular_values(ds)"
        )
    if dim is not None:
        ds = ds.isel({dim: 0})
    da = _require(ds, variable)
    med = da.median([d for d in ("batch", "time") if d in da.dims])
    if med.ndim != 1:
        raise ValueError(
            f"compare draws a spectrum by index; {variable!r} of {where} has dims {da.dims}, "
            "which leave more than one dim after the median over batch and time"
        )
    return med.values


def compare(datasets, labels, variable: str = "lyapunov_exponents", *, ax=None, **kwargs):
    """Overlay one spectrum (median over batch, and time where present) from several datasets.

    Each dataset is one model or one checkpoint (a sweep with one checkpoint is fine); a sweep of several
    checkpoints is refused: :func:`lyapunov_spectrum` and :func:`singular_values` draw all of them.

    Examples
    --------
    >>> rnnjac.plot.compare([ds_a, ds_b], ["before", "after"])  # doctest: +SKIP
    >>> rnnjac.plot.compare([sweep.isel(checkpoint=0), sweep.isel(checkpoint=-1)], ["first", "last"])  # doctest: +SKIP
    """
    datasets, labels = list(datasets), list(labels)
    if len(datasets) != len(labels):
        raise ValueError(f"compare needs one label per dataset; got {len(datasets)} datasets and {len(labels)} labels")
    if not datasets:
        raise ValueError("compare needs at least one dataset")
    curves = [_compare_curve(ds, variable, f"datasets[{i}]") for i, ds in enumerate(datasets)]
    ax = _axes(ax)
    import matplotlib as mpl

    colors = mpl.colormaps["viridis"](np.linspace(0.05, 0.9, len(datasets)))
    for med, label, color in zip(curves, labels, colors, strict=True):
        log = variable == "singular_values"
        _curve(
            ax, np.arange(1, med.size + 1), med, log=log, marker="o", ms=2.5, color=color, label=str(label), **kwargs
        )
    da0 = datasets[0][variable]
    if variable in ("singular_values",):
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("index i")
    ax.set_ylabel(_label(da0))
    ax.set_title(f"{da0.attrs.get('long_name', variable)}: comparison")
    ax.legend(fontsize="small", ncol=1 if len(labels) < 7 else 2)
    return ax


def summary(ds, *, checkpoint=None):
    """A figure with one panel per available plot; returns the Figure.

    On a sweep the curves over training come first (exponents and Kaplan–Yorke dimension against
    training step), then the per-checkpoint spectra; ``checkpoint=`` (a position or a path) gives the
    summary of one checkpoint instead.

    Examples
    --------
    >>> rnnjac.plot.summary(ds).savefig("summary.png")  # doctest: +SKIP
    >>> rnnjac.plot.summary(sweep, checkpoint=-1)  # the last checkpoint alone  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    from . import PLOTS, available  # the registry of the package; imported here, where it is complete

    if checkpoint is not None:
        ds = _select_checkpoint(ds, checkpoint)
    names = sorted(available(ds), key=lambda n: _SPEC[n][1] != "sweep")
    if not names:
        known = sorted({v for needs, _ in _SPEC.values() for v in needs})
        if not any(v in ds.data_vars for v in known):
            raise ValueError(f"nothing to plot: the dataset has none of {known}")
        reasons = {n: _why_not(n, ds) for n in PLOTS if any(v in ds.data_vars for v in _SPEC[n][0])}
        raise ValueError("nothing to plot: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    cols = 2 if len(names) == 4 else min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        PLOTS[name](ds, ax=ax)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(_summary_title(ds))
    return fig


def _summary_title(ds) -> str:
    arch = ds.attrs.get("architecture", "")
    if "fixed_point_states" in ds.data_vars:
        return f"rnnjac summary — {arch} fixed and slow points".strip()
    dim = _sweep_dim(ds)
    if dim is None:
        one = ds["checkpoint"].item() if "checkpoint" in ds.coords and ds["checkpoint"].ndim == 0 else ""
        return f"rnnjac summary — {arch} {ds.attrs.get('checkpoint', one)}".strip()
    x, label = _sweep_x(ds, dim)
    what = f", training steps {int(x.min())}–{int(x.max())}" if label.startswith("training") else ""
    return f"rnnjac summary — {arch} sweep of {ds.sizes[dim]} checkpoints{what}".strip()
