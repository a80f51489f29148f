"""Plots of one model's spectra (one line per checkpoint on a sweep where that makes sense)."""

from __future__ import annotations

import numpy as np

from ._common import _axes, _check, _curve, _indices, _integer_ticks, _label, _title
from ._sweeps import _lines_per_checkpoint


def singular_values(ds, *, ax=None, time=None, quantiles=(0.1, 0.9), log=True, checkpoint=None, **kwargs):
    """Singular values of ``J_t`` by index: median over batch (and time) with a quantile band.

    On a sweep, one line per checkpoint (median over batch and time) coloured by training step.

    Parameters
    ----------
    ds : xarray.Dataset
        With ``singular_values``; a sweep has a ``checkpoint`` (or ``training_step``) dim.
    ax : matplotlib.axes.Axes, optional
        Drawn into; a new figure when None.
    time : int or slice, optional
        Steps to use (labels of the ``time`` coordinate).
    quantiles : (float, float)
        The band around the median (one model or one checkpoint only).
    log : bool
        Logarithmic y axis.
    checkpoint : int or str, optional
        On a sweep, draw only this checkpoint (a position or a path).

    Examples
    --------
    >>> rnnjac.plot.singular_values(ds, time=slice(50, None))  # doctest: +SKIP
    >>> rnnjac.plot.singular_values(sweep)  # one line per checkpoint  # doctest: +SKIP
    """
    ds, dim = _check("singular_values", ds, checkpoint)
    sv = ds["singular_values"]
    if time is not None:
        sv = sv.sel(time=time)
    if dim is not None:
        ax = _axes(ax, (6.5, 4.0))
        med = sv.median([d for d in ("batch", "time") if d in sv.dims])
        _lines_per_checkpoint(ax, ds, dim, med, log=log, **kwargs)
        ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("index i (descending)")
        ax.set_ylabel(_label(sv))
        ax.set_title(_title(ds, "Singular values of J_t (median per checkpoint)"))
        return ax
    flat = sv.values.reshape(-1, sv.sizes["sv_index"])
    idx = np.arange(1, flat.shape[-1] + 1)
    ax = _axes(ax)
    med = np.median(flat, 0)
    lo, hi = np.quantile(flat, quantiles, axis=0)
    line = _curve(ax, idx, med, log=log, marker="o", ms=3, label=kwargs.pop("label", "median"), **kwargs)
    ax.fill_between(
        idx,
        lo,
        hi,
        color=line.get_color(),
        alpha=0.25,
        label=f"{int(quantiles[0] * 100)}–{int(quantiles[1] * 100)}% over batch × time",
    )
    ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("index i (descending)")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(_label(sv))
    ax.set_title(_title(ds, "Singular values of J_t"))
    ax.legend(fontsize="small")
    return ax


def singular_value_heatmap(ds, *, ax=None, batch=None, cmap="viridis", checkpoint=None, **kwargs):
    """log10 singular values of ``J_t`` over time (x) and index (y); median over batch unless ``batch`` is given.

    A sweep needs ``checkpoint=`` (a position or a path): the heatmap is one checkpoint's.

    Examples
    --------
    >>> rnnjac.plot.singular_value_heatmap(ds, batch=0)  # doctest: +SKIP
    >>> rnnjac.plot.singular_value_heatmap(sweep, checkpoint=-1)  # the last checkpoint  # doctest: +SKIP
    """
    ds, _ = _check("singular_value_heatmap", ds, checkpoint)
    sv = ds["singular_values"]
    data = sv.sel(batch=batch).values if batch is not None else sv.median("batch").values
    if data.ndim != 2:
        raise ValueError(f"batch={batch!r} must select one sample (a label of the 'batch' coordinate)")
    ax = _axes(ax, (7, 4))
    t = ds["time"].values
    with np.errstate(divide="ignore"):
        img = ax.imshow(
            np.log10(data.T),
            aspect="auto",
            origin="upper",
            cmap=cmap,
            extent=(t[0] - 0.5, t[-1] + 0.5, data.shape[1] + 0.5, 0.5),
            interpolation="nearest",
            **kwargs,
        )
    cb = ax.figure.colorbar(img, ax=ax)
    cb.set_label(f"log10 {sv.attrs.get('long_name', 'singular value')}")
    ax.set_xlabel(f"time t [{ds['time'].attrs.get('units', 'step')}]")
    ax.set_ylabel("singular value index")
    ax.set_title(_title(ds, "Singular values over time" + (f" (sample {batch})" if batch is not None else "")))
    return ax


def lyapunov_spectrum(ds, *, ax=None, checkpoint=None, **kwargs):
    """Lyapunov exponents by index: median with the min–max spread over the batch, zero line, D_KY.

    When the Dataset has the intervals (``lyapunov_exponents_bounds``, the default of :func:`rnnjac.spectra`), the
    line is the mean over the batch with error bars spanning its confidence interval (level ``ds.attrs["ci"]``),
    and exponents that have not converged (``lyapunov_converged == 0``) get an open marker. On a sweep, one line
    per checkpoint (median over the batch) coloured by training step; ``checkpoint=``
    (a position or a path) draws one checkpoint alone.

    Examples
    --------
    >>> rnnjac.plot.lyapunov_spectrum(ds)  # doctest: +SKIP
    >>> rnnjac.plot.lyapunov_spectrum(sweep)  # one line per checkpoint  # doctest: +SKIP
    """
    ds, dim = _check("lyapunov_spectrum", ds, checkpoint)
    le = ds["lyapunov_exponents"]
    if dim is not None:
        ax = _axes(ax, (6.5, 4.0))
        _lines_per_checkpoint(ax, ds, dim, le.median("batch"), **kwargs)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("exponent index i")
        ax.set_ylabel(_label(le))
        ax.set_title(_title(ds, "Lyapunov spectrum (median per checkpoint)"))
        return ax
    vals = le.values
    idx = np.arange(1, vals.shape[-1] + 1)
    ax = _axes(ax)
    if "lyapunov_exponents_bounds" in ds:
        line = _interval_bars(ax, ds, idx, kwargs)
    else:
        med = np.median(vals, 0)
        line = _curve(ax, idx, med, marker="o", ms=3, label=kwargs.pop("label", "median over batch"), **kwargs)
    if vals.shape[0] > 1:
        ax.fill_between(idx, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2, label="min–max over batch")
    ax.axhline(0.0, color="k", lw=0.8)
    if "kaplan_yorke_dimension_bounds" in ds:
        b = ds["kaplan_yorke_dimension_bounds"]
        half = float(b.sel(bound="upper") - b.sel(bound="lower")) / 2
        ax.plot([], [], " ", label=f"Kaplan–Yorke dim. {float(ds['kaplan_yorke_dimension_mean']):.2f} ± {half:.2f}")
    elif "kaplan_yorke_dimension" in ds:
        dky = float(np.median(ds["kaplan_yorke_dimension"].values))
        ax.plot([], [], " ", label=f"Kaplan–Yorke dim. {dky:.2f}")
    ax.set_xlabel("exponent index i")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(_label(le))
    ax.set_title(_title(ds, "Lyapunov spectrum"))
    ax.legend(fontsize="small")
    return ax


def _interval_bars(ax, ds, idx, kwargs):
    """The mean exponents with error bars over their confidence interval; open markers where not converged."""
    mean = ds["lyapunov_exponents_mean"].values
    b = ds["lyapunov_exponents_bounds"]
    lower, upper = b.sel(bound="lower").values, b.sel(bound="upper").values
    with np.errstate(invalid="ignore"):
        yerr = np.vstack([mean - lower, upper - mean])
    yerr = np.where(np.isfinite(yerr) & np.isfinite(mean), yerr, 0.0)  # -inf or no error: no bar
    ci = float(ds.attrs.get("ci", 0.95))
    line = _curve(ax, idx, mean, marker="o", ms=3, label=kwargs.pop("label", "mean over batch"), **kwargs)
    finite = np.isfinite(mean)
    color = line.get_color()
    ax.errorbar(
        idx[finite],
        mean[finite],
        yerr=yerr[:, finite],
        fmt="none",
        ecolor=color,
        capsize=3,
        lw=1.2,
        label=f"{100 * ci:g}% confidence interval",
    )
    if "lyapunov_converged" in ds:
        bad = (ds["lyapunov_converged"].values == 0) & finite
        if bad.any():
            ax.plot(idx[bad], mean[bad], ls="none", marker="o", ms=7, mfc="white", mec=color, label="not converged")
    return line


def lyapunov_convergence(ds, *, ax=None, indices=None, checkpoint=None, **kwargs):
    """Running estimates of the exponents (cumulative mean of the local exponents) over time.

    A sweep needs ``checkpoint=`` (a position or a path).

    Examples
    --------
    >>> rnnjac.plot.lyapunov_convergence(ds, indices=[0, 1])  # doctest: +SKIP
    """
    ds, _ = _check("lyapunov_convergence", ds, checkpoint)
    loc = ds["local_lyapunov"]
    vals = np.where(np.isnan(loc.values), 0.0, loc.values)  # (B, T, k); -inf (a lost direction) stays -inf
    counted = ~np.isnan(loc.values[..., :1])
    steps = ds.attrs.get("reortho_every", 1)
    n = np.cumsum(counted, axis=1) * steps
    with np.errstate(invalid="ignore", divide="ignore"):
        running = np.cumsum(vals * steps, axis=1) / n
    running = np.where(n > 0, running, np.nan)
    running = np.where(counted.any(0), np.median(np.where(np.isnan(running), 0.0, running), axis=0), np.nan)
    k = running.shape[-1]
    indices = _indices(indices, k, (0, 1, k // 2, k - 1))
    ax = _axes(ax)
    t = ds["time"].values
    for i in indices:
        _curve(ax, t, running[:, i], label=f"λ_{i + 1}", **kwargs)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"time t [{ds['time'].attrs.get('units', 'step')}]")
    ax.set_ylabel(f"running Lyapunov exponent [{loc.attrs.get('units', '')}]")
    ax.set_title(_title(ds, "Convergence of the exponents"))
    ax.legend(fontsize="small", ncol=2)
    return ax


def eigenvalues(ds, *, ax=None, time=None, max_points=5000, gridsize=60, checkpoint=None, **kwargs):
    """Eigenvalues of ``J_t`` in the complex plane with the unit circle; a density for many points.

    A sweep needs ``checkpoint=`` (a position or a path).

    Examples
    --------
    >>> rnnjac.plot.eigenvalues(ds, time=slice(100, None))  # doctest: +SKIP
    """
    ds, _ = _check("eigenvalues", ds, checkpoint)
    re = ds["eigenvalues_real"]
    im = ds["eigenvalues_imag"]
    if time is not None:
        re, im = re.sel(time=time), im.sel(time=time)
    x, y = re.values.ravel(), im.values.ravel()
    ax = _axes(ax, (5, 5))
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="k", lw=0.8, label="unit circle")
    if x.size > max_points:
        hb = ax.hexbin(x, y, gridsize=gridsize, bins="log", cmap="Blues", mincnt=1, **kwargs)
        ax.figure.colorbar(hb, ax=ax, label="count (log)")
    else:
        ax.scatter(x, y, s=6, alpha=0.5, label="eigenvalues", **kwargs)
    ax.set_aspect("equal")
    ax.set_xlabel(_label(re).replace("of the eigenvalues of J_t", "(λ)"))
    ax.set_ylabel(_label(im).replace("of the eigenvalues of J_t", "(λ)"))
    ax.set_title(_title(ds, "Eigenvalues of J_t"))
    ax.legend(fontsize="small", loc="upper right")
    return ax


def end_to_end(ds, *, ax=None, indices=None, checkpoint=None, **kwargs):
    """Log singular values of ``ds_t/ds_0`` against t (median over the batch) for a few indices.

    Uses ``end_to_end_log_singular_values`` (natural log; ``-inf`` where a direction is lost, marked at
    the bottom edge). A sweep needs ``checkpoint=`` (a position or a path).

    Examples
    --------
    >>> rnnjac.plot.end_to_end(ds, indices=[0, 1, 2])  # doctest: +SKIP
    """
    ds, _ = _check("end_to_end", ds, checkpoint)
    e2e = ds["end_to_end_log_singular_values"]
    med = e2e.median("batch").values
    d = med.shape[-1]
    indices = _indices(indices, d, (0, 1, d // 4, d // 2, d - 1))
    ax = _axes(ax)
    t = ds["time"].values
    for i in indices:
        _curve(ax, t, med[:, i], label=f"σ_{i + 1}", **kwargs)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"time t [{ds['time'].attrs.get('units', 'step')}]")
    ax.set_ylabel(_label(e2e))
    ax.set_title(_title(ds, "End-to-end Jacobian ∂s_t/∂s_0"))
    ax.legend(fontsize="small", ncol=2)
    return ax
