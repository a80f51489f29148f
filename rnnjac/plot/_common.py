"""Plots of spectra Datasets: ``f(ds, *, ax=None, **kwargs) -> matplotlib.axes.Axes``.

A figure is created only when ``ax`` is None; labels come from each variable's ``long_name`` and
``units``; nothing here calls ``show()`` or ``savefig`` (the command line and the analyses save).
Matplotlib is imported lazily so that ``import rnnjac`` stays light.

Sweeps (a Dataset with a ``checkpoint`` or ``training_step`` dim, from :func:`rnnjac.analyze_checkpoints`):
:func:`singular_values` and :func:`lyapunov_spectrum` draw one line per checkpoint, coloured by training
step; :func:`lyapunov_vs_training_step` and :func:`kaplan_yorke_vs_training_step` draw the exponents and
the Kaplan-Yorke dimension against training step; the plots over time or the complex plane
(:func:`singular_value_heatmap`, :func:`lyapunov_convergence`, :func:`eigenvalues`, :func:`end_to_end`)
draw one checkpoint chosen with ``checkpoint=`` (a position or a path) and refuse a sweep without it.
Every plot checks its Dataset before it creates a figure, and :func:`available` lists exactly the plots
that can be drawn from a Dataset without keywords.
"""

from __future__ import annotations

import numpy as np

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
    "available",
    "summary",
    "PLOTS",
]

SWEEP_DIMS = ("checkpoint", "training_step")

_HINTS = {
    "singular_values": "spectra(..., singular_values=True)",
    "lyapunov_exponents": "spectra(..., lyapunov=True) or lyapunov_spectrum(...)",
    "kaplan_yorke_dimension": "spectra(..., lyapunov=True)",
    "local_lyapunov": "spectra(..., local_lyapunov=True)",
    "eigenvalues_real": "spectra(..., eigenvalues=True)",
    "eigenvalues_imag": "spectra(..., eigenvalues=True)",
    "end_to_end_log_singular_values": "spectra(..., end_to_end=True)",
}


def _require(ds, name: str):
    if name not in ds.data_vars:
        hint = _HINTS.get(name, "")
        have = ", ".join(sorted(ds.data_vars)) or "none"
        raise ValueError(
            f"this plot needs the variable {name!r}, which the dataset lacks (it has: {have})"
            + (f"; compute it with {hint}" if hint else "")
        )
    return ds[name]


#: plot -> (variables it needs, what it draws: "any" = one model or every checkpoint of a sweep,
#: "one" = one model or one chosen checkpoint, "sweep" = a curve over the checkpoints of a sweep)
_SPEC = {
    "singular_values": (("singular_values",), "any"),
    "singular_value_heatmap": (("singular_values",), "one"),
    "lyapunov_spectrum": (("lyapunov_exponents",), "any"),
    "lyapunov_convergence": (("local_lyapunov",), "one"),
    "eigenvalues": (("eigenvalues_real", "eigenvalues_imag"), "one"),
    "end_to_end": (("end_to_end_log_singular_values",), "one"),
    "lyapunov_vs_training_step": (("lyapunov_exponents",), "sweep"),
    "kaplan_yorke_vs_training_step": (("kaplan_yorke_dimension",), "sweep"),
}


def _check(name: str, ds, checkpoint=None):
    """Check ``ds`` for the plot ``name`` before anything is drawn; returns ``(ds, sweep_dim or None)``."""
    from .datasets import VARIABLES

    needs, kind = _SPEC[name]
    for var in needs:
        _require(ds, var)
    if kind == "sweep":
        dim = _sweep_dim(ds)
        if dim is None:
            raise ValueError(
                f"{name} needs a sweep: a dataset with a 'checkpoint' (or 'training_step') dim, as "
                f"analyze_checkpoints writes; this one has dims {tuple(ds.dims)}"
            )
    else:
        ds, dim = _prepare(ds, checkpoint)
        if dim is not None and kind == "one":
            n = ds.sizes[dim]
            raise ValueError(
                f"{name} draws one checkpoint and the dataset is a sweep of {n} (dim {dim!r}); pass checkpoint= "
                f"a position 0..{n - 1} or a path (e.g. checkpoint={n - 1}, the last), or use lyapunov_spectrum, "
                "singular_values or lyapunov_vs_training_step, which draw every checkpoint"
            )
    for var in needs:
        want = VARIABLES[var][0]
        got = tuple(d for d in ds[var].dims if d != dim)
        if got != want:
            raise ValueError(f"{name} expects {var!r} with dims {want} (plus a sweep dim); it has {ds[var].dims}")
    return ds, dim


def _label(da) -> str:
    units = da.attrs.get("units", "")
    name = da.attrs.get("long_name", da.name)
    return f"{name} [{units}]" if units else name


def _axes(ax, figsize=(5.5, 4.0)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    return ax


def _title(ds, what: str) -> str:
    arch = ds.attrs.get("architecture", "")
    h = ds.attrs.get("hidden_size", "")
    title = f"{what} — {arch} H={h}" if arch else what
    if "training_step" in ds.coords and ds["training_step"].ndim == 0 and int(ds["training_step"]) >= 0:
        title += f", step {int(ds['training_step'])}"
    return title


# ----------------------------------------------------------------------------- sweeps
def _sweep_dim(ds) -> str | None:
    dims = [d for d in SWEEP_DIMS if d in ds.dims]
    if len(dims) > 1:
        raise ValueError(f"expected at most one sweep dim of {SWEEP_DIMS}; the dataset has both {dims}")
    return dims[0] if dims else None


def _checkpoint_names(ds, dim: str) -> list[str]:
    """One label per checkpoint: the ``checkpoint`` coordinate (path) or else the training step."""
    if "checkpoint" in ds.coords and ds["checkpoint"].dims == (dim,):
        return [str(v) for v in ds["checkpoint"].values]
    return [f"step {v}" for v in ds["training_step"].values]


def _select_checkpoint(ds, checkpoint):
    """The row of a sweep that ``checkpoint`` (a position or a path or file name) names."""
    dim = _sweep_dim(ds)
    if dim is None:
        raise ValueError(
            f"checkpoint={checkpoint!r} was given but the dataset has no sweep dim {SWEEP_DIMS} "
            f"(its dims: {tuple(ds.dims)}); leave checkpoint=None for a single analysis"
        )
    n, names = ds.sizes[dim], _checkpoint_names(ds, dim)
    if isinstance(checkpoint, (int, np.integer)) and not isinstance(checkpoint, bool):
        if not -n <= checkpoint < n:
            raise ValueError(f"checkpoint={checkpoint} is out of range: the dataset has {n} checkpoints (0..{n - 1})")
        i = int(checkpoint) % n
    else:
        want = str(checkpoint)
        hits = [i for i, name in enumerate(names) if name == want]
        hits = hits or [i for i, name in enumerate(names) if name.replace("\\", "/").rsplit("/", 1)[-1] == want]
        if len(hits) != 1:
            found = "no checkpoint" if not hits else f"{len(hits)} checkpoints"
            raise ValueError(
                f"checkpoint={checkpoint!r} names {found}; expected a position 0..{n - 1} or one of {names}"
            )
        i = hits[0]
    return ds.isel({dim: i})


def _prepare(ds, checkpoint):
    """``(ds, sweep_dim)``: one row when ``checkpoint`` is given or the sweep has one checkpoint."""
    if checkpoint is not None:
        return _select_checkpoint(ds, checkpoint), None
    dim = _sweep_dim(ds)
    if dim is not None and ds.sizes[dim] == 1:
        return ds.isel({dim: 0}), None
    return ds, dim


def _sweep_x(ds, dim: str):
    """x values and label for the checkpoints: training steps when all known and distinct, else positions."""
    n = ds.sizes[dim]
    steps = ds["training_step"].values if "training_step" in ds.coords else np.full(n, -1)
    if steps.shape == (n,) and (steps >= 0).all() and len(set(steps.tolist())) == n:
        return steps.astype(float), "training step [step]"
    return np.arange(n, dtype=float), "checkpoint (position in the sweep)"


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


def _curve(ax, x, y, *, log: bool = False, **kwargs):
    """``ax.plot(x, y)``, plus a marker at the bottom edge for every point at ``-inf`` (or ``<= 0`` with ``log``).

    ``-inf`` is a lost direction (an exactly singular step); matplotlib would drop those points without a trace.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    lost = (y == -np.inf) | ((y <= 0) if log else False)
    line = ax.plot(x, np.where(lost, np.nan, y), **kwargs)[0]
    if lost.any():
        first = not any(a.get_label().startswith("−∞") for a in ax.lines)
        label = ("−∞ (log of 0)" if log else "−∞") + " at the bottom edge" if first else "_lost"
        ax.plot(
            x[lost],
            np.zeros(lost.sum()),
            ls="none",
            marker="v",
            ms=6,
            color=line.get_color(),
            label=label,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
    return line


def _indices(indices, n: int, default) -> list[int]:
    """``indices`` (0-based, negative from the end) checked against ``n``; ``default`` clipped to range."""
    if indices is None:
        return sorted(set(default) & set(range(n)))
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"indices={bad} are out of range: the dataset has {n} (0..{n - 1})")
    return [i % n for i in indices]


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


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

    On a sweep, one line per checkpoint (median over the batch) coloured by training step; ``checkpoint=``
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
    med = np.median(vals, 0)
    line = _curve(ax, idx, med, marker="o", ms=3, label=kwargs.pop("label", "median over batch"), **kwargs)
    if vals.shape[0] > 1:
        ax.fill_between(idx, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.25, label="min–max over batch")
    ax.axhline(0.0, color="k", lw=0.8)
    if "kaplan_yorke_dimension" in ds:
        dky = float(np.median(ds["kaplan_yorke_dimension"].values))
        ax.plot([], [], " ", label=f"Kaplan–Yorke dim. {dky:.2f}")
    ax.set_xlabel("exponent index i")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(_label(le))
    ax.set_title(_title(ds, "Lyapunov spectrum"))
    ax.legend(fontsize="small")
    return ax


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


#: plot name -> plot function ``f(ds, *, ax=None, ...)``, in the order of :func:`summary` for one model
PLOTS = {
    "singular_values": singular_values,
    "singular_value_heatmap": singular_value_heatmap,
    "lyapunov_spectrum": lyapunov_spectrum,
    "lyapunov_convergence": lyapunov_convergence,
    "eigenvalues": eigenvalues,
    "end_to_end": end_to_end,
    "lyapunov_vs_training_step": lyapunov_vs_training_step,
    "kaplan_yorke_vs_training_step": kaplan_yorke_vs_training_step,
}


def _why_not(name: str, ds) -> str | None:
    """Why ``PLOTS[name](ds)`` would refuse ``ds`` (None when it draws)."""
    try:
        _check(name, ds)
    except ValueError as err:
        return str(err)
    return None


def available(ds) -> list[str]:
    """Names of the plots in :data:`PLOTS` that ``PLOTS[name](ds)`` draws without further keywords.

    For one model: the plots whose variables ``ds`` has. For a sweep of several checkpoints: the
    per-checkpoint spectra and the curves over training (the others need ``checkpoint=``).

    Examples
    --------
    >>> for name in rnnjac.plot.available(ds):  # doctest: +SKIP
    ...     rnnjac.plot.PLOTS[name](ds).figure.savefig(f"{name}.png")
    """
    return [name for name in PLOTS if _why_not(name, ds) is None]


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
    dim = _sweep_dim(ds)
    if dim is None:
        one = ds["checkpoint"].item() if "checkpoint" in ds.coords and ds["checkpoint"].ndim == 0 else ""
        return f"rnnjac summary — {arch} {ds.attrs.get('checkpoint', one)}".strip()
    x, label = _sweep_x(ds, dim)
    what = f", training steps {int(x.min())}–{int(x.max())}" if label.startswith("training") else ""
    return f"rnnjac summary — {arch} sweep of {ds.sizes[dim]} checkpoints{what}".strip()


# ----------------------------------------------------------------------------- fixed points
_FP_NEEDS = ("fixed_point_states", "is_fixed_point", "stable")


def _fixed_point_data(ds, condition):
    """Check a :func:`rnnjac.fixed_points` Dataset; the rows of one ``condition`` (None: all)."""
    for var in _FP_NEEDS:
        if var not in ds.data_vars:
            raise ValueError(
                f"this plot needs the variable {var!r} of a fixed-point dataset (from rnnjac.fixed_points); "
                f"the dataset has: {', '.join(sorted(ds.data_vars)) or 'none'}"
            )
    if condition is None or "condition_index" not in ds.data_vars:
        return ds
    n = ds.sizes.get("condition", 1)
    if not isinstance(condition, (int, np.integer)) or not 0 <= condition < n:
        raise ValueError(f"condition must be an integer in 0..{n - 1}; got {condition!r}")
    return ds.isel(fixed_point=np.flatnonzero(ds["condition_index"].values == condition))


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
    ds = _fixed_point_data(ds, condition)
    pts = ds["fixed_point_states"].values
    d = pts.shape[-1]
    if len(dims) != 2 or any(not isinstance(i, (int, np.integer)) or not 0 <= i < d for i in dims):
        raise ValueError(f"dims must be two principal components in 0..{d - 1}; got {dims!r}")
    lines = None
    if trajectories is not None:
        lines = np.asarray(trajectories.detach().cpu() if hasattr(trajectories, "detach") else trajectories, float)
        lines = lines[None] if lines.ndim == 2 else lines
        if lines.ndim != 3 or lines.shape[-1] != d:
            raise ValueError(f"trajectories must be (B, T+1, D) with D = {d} (as the points); got {lines.shape}")
    fit = lines.reshape(-1, d) if lines is not None else pts
    if fit.shape[0] == 0:
        raise ValueError("nothing to draw: the dataset has no fixed or slow point and no trajectories were given")
    mean, comps, ratio = _pca(fit, dims) if fit.shape[0] > 1 else (fit[0], np.eye(d)[list(dims)], np.zeros(2))
    ax = _axes(ax, (5.5, 5.0))
    if lines is not None:
        for line in lines[:max_lines]:
            xy = (line - mean) @ comps.T
            ax.plot(xy[:, 0], xy[:, 1], color="0.6", lw=0.4, alpha=0.5, zorder=1)
    style = {
        "stable fixed points": dict(marker="o", s=60, facecolors="C0", edgecolors="k", zorder=3),
        "unstable fixed points": dict(marker="o", s=60, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=3),
        "slow points": dict(marker="x", s=12, color="0.3", linewidths=0.8, zorder=2),
    }
    for label, mask in _fp_groups(ds).items():
        if mask.any():
            xy = (pts[mask] - mean) @ comps.T
            ax.scatter(xy[:, 0], xy[:, 1], label=f"{label} ({int(mask.sum())})", **{**style[label], **kwargs})
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
    ds = _fixed_point_data(ds, condition)
    for var in ("fixed_point_eigenvalues_real", "fixed_point_eigenvalues_imag"):
        if var not in ds.data_vars:
            raise ValueError(f"this plot needs the variable {var!r} (from rnnjac.fixed_points)")
    re, im = ds["fixed_point_eigenvalues_real"].values, ds["fixed_point_eigenvalues_imag"].values
    ax = _axes(ax, (5, 5))
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="k", lw=0.8, label="unit circle")
    groups = _fp_groups(ds)
    style = {
        "stable fixed points": dict(marker="o", s=10, color="C0", alpha=0.7),
        "unstable fixed points": dict(marker="x", s=18, color="C3", alpha=0.9),
        "slow points": dict(marker=".", s=6, color="0.5", alpha=0.5),
    }
    for label, mask in groups.items():
        if mask.any() and (slow_points or label != "slow points"):
            ax.scatter(
                re[mask].ravel(), im[mask].ravel(), label=f"{label} ({int(mask.sum())})", **{**style[label], **kwargs}
            )
    ax.set_aspect("equal")
    ax.set_xlabel("Re(λ)")
    ax.set_ylabel("Im(λ)")
    ax.set_title(_title(ds, "Eigenvalues of J at fixed points"))
    ax.legend(fontsize="small", loc="upper left")
    return ax
