"""The memory profile of a sensitivity Dataset (:func:`rnnjac.sensitivity`): how far back the state remembers."""

from __future__ import annotations

import numpy as np

from ._common import _axes, _check, _integer_ticks, _title

#: beyond this many nats the norms leave the float64 range: the profile is then drawn as its log
_LINEAR_LIMIT = 700.0


def _variable(ds, output: bool):
    kind = "output" if output else "input"
    name = f"{kind}_sensitivity_log_norm"
    if name not in getattr(ds, "data_vars", {}):
        have = ", ".join(sorted(ds.data_vars)) if hasattr(ds, "data_vars") else type(ds).__name__
        how = "rnnjac.sensitivity(..., readout=...)" if output else "rnnjac.sensitivity(..., max_lag=L)"
        raise ValueError(
            f"this plot needs the variable {name!r}, which the dataset lacks (it has: {have}); compute it with {how}"
        )
    da = ds[name]
    if "lag" not in da.dims:
        raise ValueError(f"{name} must have a 'lag' dim; it has {da.dims}")
    return da


def sensitivity(ds, *, ax=None, output: bool = False, quantiles=(0.25, 0.75), checkpoint=None, label=None, **kwargs):
    """Memory profile: the norm of ``ds_t/dx_{t-lag}`` against lag, median over batch and time with a band.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`rnnjac.sensitivity` (or a spectra Dataset it was merged into).
    ax : matplotlib.axes.Axes, optional
    output : bool
        Draw ``dy_t/dx_{t-lag}`` (a Dataset computed with ``readout=``) instead of the state's.
    quantiles : (float, float)
        The band (default the inter-quartile range), over batch and time; NaN entries (``t - lag < 1``) are left out.
    label : str, optional
        Legend label of the median (default "median"; with a label the band is not labelled, so that several
        models can share one axes).
    checkpoint : int or str, optional
        For a sweep (:func:`rnnjac.analyze_checkpoints`): the checkpoint to draw (position or path).
    **kwargs
        Passed to the median's ``ax.plot``.

    Returns
    -------
    matplotlib.axes.Axes
        Log y axis (the norms themselves); when they leave the float64 range (over 700 nats) the natural log is
        drawn on a linear axis instead. A straight line at long lags decays at the top Lyapunov exponent.

    Examples
    --------
    >>> import torch, rnnjac
    >>> ds = rnnjac.sensitivity(torch.nn.GRU(2, 8, batch_first=True), torch.randn(4, 40, 2), max_lag=20)
    >>> rnnjac.plot.sensitivity(ds).get_yscale()
    'log'
    """
    ds = _check("sensitivity", ds, checkpoint)[0] if not output else ds
    da = _variable(ds, output)
    lo_q, hi_q = quantiles
    if not 0 <= lo_q <= hi_q <= 1:
        raise ValueError(f"quantiles must be two numbers with 0 <= low <= high <= 1; got {quantiles!r}")
    other = [d for d in da.dims if d != "lag"]
    values = da.transpose("lag", *other).values.reshape(da.sizes["lag"], -1)
    values = np.where(np.isneginf(values), np.nan, values)  # an exact zero block: no log scale to draw
    med, lo, hi = (np.nanquantile(values, q, axis=1) for q in (0.5, lo_q, hi_q))
    lag = da["lag"].values
    finite = np.abs(np.concatenate([lo, hi])[np.isfinite(np.concatenate([lo, hi]))])
    linear = finite.size == 0 or finite.max() < _LINEAR_LIMIT
    ax = _axes(ax)
    tr = np.exp if linear else (lambda v: v)
    line = ax.plot(lag, tr(med), marker="o", ms=3, label=label or "median", **kwargs)[0]
    band = f"quantiles {lo_q:g}–{hi_q:g}" if label is None else None
    ax.fill_between(lag, tr(lo), tr(hi), color=line.get_color(), alpha=0.25, lw=0, label=band)
    what = (
        r"$\Vert\partial y_t/\partial x_{t-\tau}\Vert_F$"
        if output
        else r"$\Vert\partial s_t/\partial x_{t-\tau}\Vert_F$"
    )
    if linear:
        ax.set_yscale("log")
        ax.set_ylabel(what)
    else:
        ax.set_ylabel(f"log {what} [nats]")
    ax.set_xlabel("lag τ [step]")
    _integer_ticks(ax.xaxis)
    ax.set_title(_title(ds, "Memory profile" + (" (readout)" if output else "")))
    ax.legend(fontsize="small")
    return ax
