"""Plots of spectra Datasets: ``f(ds, *, ax=None, **kwargs) -> matplotlib.axes.Axes``.

A figure is created only when ``ax`` is None; labels come from each variable's ``long_name`` and
``units``; nothing here calls ``show()`` or ``savefig`` (the command line and the analyses save).
Matplotlib is imported lazily so that ``import rnnjac`` stays light.
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
    "compare",
    "summary",
    "PLOTS",
]

_HINTS = {
    "singular_values": "spectra(..., singular_values=True)",
    "lyapunov_exponents": "spectra(..., lyapunov=True) or lyapunov_spectrum(...)",
    "local_lyapunov": "spectra(..., local_lyapunov=True) (CLI: --local)",
    "eigenvalues_real": "spectra(..., eigenvalues=True) (CLI: --eigenvalues)",
    "end_to_end_log_singular_values": "spectra(..., end_to_end=True) (CLI: --end-to-end)",
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
    return f"{what} — {arch} H={h}" if arch else what


def singular_values(ds, *, ax=None, time=None, quantiles=(0.1, 0.9), log=True, **kwargs):
    """Singular values of ``J_t`` by index: median over batch (and time) with a quantile band.

    ``time`` selects steps (an int or a slice of the ``time`` coordinate).

    Examples
    --------
    >>> rnnjac.plot.singular_values(ds, time=slice(50, None))  # doctest: +SKIP
    """
    sv = _require(ds, "singular_values")
    if time is not None:
        sv = sv.sel(time=time)
    flat = sv.values.reshape(-1, sv.sizes["sv_index"]) if sv.ndim == 3 else sv.values.reshape(-1, sv.shape[-1])
    idx = np.arange(1, flat.shape[-1] + 1)
    ax = _axes(ax)
    med = np.median(flat, 0)
    lo, hi = np.quantile(flat, quantiles, axis=0)
    line = ax.plot(idx, med, marker="o", ms=3, label=kwargs.pop("label", "median"), **kwargs)[0]
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
    ax.set_ylabel(_label(sv))
    ax.set_title(_title(ds, "Singular values of J_t"))
    ax.legend(fontsize="small")
    return ax


def singular_value_heatmap(ds, *, ax=None, batch=None, cmap="viridis", **kwargs):
    """log10 singular values of ``J_t`` over time (x) and index (y); median over batch unless ``batch`` is given."""
    sv = _require(ds, "singular_values")
    data = sv.sel(batch=batch).values if batch is not None else sv.median("batch").values
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


def lyapunov_spectrum(ds, *, ax=None, **kwargs):
    """Lyapunov exponents by index: median with the min–max spread over the batch, zero line, D_KY."""
    le = _require(ds, "lyapunov_exponents")
    vals = le.values
    idx = np.arange(1, vals.shape[-1] + 1)
    ax = _axes(ax)
    med = np.median(vals, 0)
    line = ax.plot(idx, med, marker="o", ms=3, label=kwargs.pop("label", "median over batch"), **kwargs)[0]
    if vals.shape[0] > 1:
        ax.fill_between(idx, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.25, label="min–max over batch")
    ax.axhline(0.0, color="k", lw=0.8)
    if "kaplan_yorke_dimension" in ds:
        dky = float(np.median(ds["kaplan_yorke_dimension"].values))
        ax.plot([], [], " ", label=f"Kaplan–Yorke dim. {dky:.2f}")
    ax.set_xlabel("exponent index i")
    ax.set_ylabel(_label(le))
    ax.set_title(_title(ds, "Lyapunov spectrum"))
    ax.legend(fontsize="small")
    return ax


def lyapunov_convergence(ds, *, ax=None, indices=None, **kwargs):
    """Running estimates of the exponents (cumulative mean of the local exponents) over time."""
    loc = _require(ds, "local_lyapunov")
    vals = np.nan_to_num(loc.values, nan=0.0)  # (B, T, k)
    counted = ~np.isnan(loc.values[..., :1])
    steps = ds.attrs.get("reortho_every", 1)
    n = np.cumsum(counted, axis=1) * steps
    with np.errstate(invalid="ignore", divide="ignore"):
        running = np.cumsum(vals * steps, axis=1) / n
    running = np.where(n > 0, running, np.nan)
    running = np.where(counted.any(0), np.median(np.nan_to_num(running), axis=0), np.nan)
    k = running.shape[-1]
    indices = indices if indices is not None else sorted({0, 1, k // 2, k - 1} & set(range(k)))
    ax = _axes(ax)
    t = ds["time"].values
    for i in indices:
        ax.plot(t, running[:, i], label=f"λ_{i + 1}", **kwargs)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"time t [{ds['time'].attrs.get('units', 'step')}]")
    ax.set_ylabel(f"running Lyapunov exponent [{loc.attrs.get('units', '')}]")
    ax.set_title(_title(ds, "Convergence of the exponents"))
    ax.legend(fontsize="small", ncol=2)
    return ax


def eigenvalues(ds, *, ax=None, time=None, max_points=5000, gridsize=60, **kwargs):
    """Eigenvalues of ``J_t`` in the complex plane with the unit circle; a density for many points."""
    re = _require(ds, "eigenvalues_real")
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


def end_to_end(ds, *, ax=None, indices=None, **kwargs):
    """Log singular values of ``ds_t/ds_0`` against t (median over the batch) for a few indices."""
    e2e = _require(ds, "end_to_end_log_singular_values")
    med = e2e.median("batch").values
    d = med.shape[-1]
    indices = indices if indices is not None else sorted({0, 1, d // 4, d // 2, d - 1} & set(range(d)))
    ax = _axes(ax)
    t = ds["time"].values
    for i in indices:
        ax.plot(t, med[:, i], label=f"σ_{i + 1}", **kwargs)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"time t [{ds['time'].attrs.get('units', 'step')}]")
    ax.set_ylabel(_label(e2e))
    ax.set_title(_title(ds, "End-to-end Jacobian ∂s_t/∂s_0"))
    ax.legend(fontsize="small", ncol=2)
    return ax


def compare(datasets, labels, variable: str = "lyapunov_exponents", *, ax=None, **kwargs):
    """Overlay one spectrum (median over batch, and time where present) from several datasets.

    Examples
    --------
    >>> rnnjac.plot.compare([ds_a, ds_b], ["before", "after"])  # doctest: +SKIP
    """
    datasets, labels = list(datasets), list(labels)
    if len(datasets) != len(labels):
        raise ValueError(f"compare needs one label per dataset; got {len(datasets)} datasets and {len(labels)} labels")
    if not datasets:
        raise ValueError("compare needs at least one dataset")
    ax = _axes(ax)
    import matplotlib as mpl

    colors = mpl.colormaps["viridis"](np.linspace(0.05, 0.9, len(datasets)))
    for ds, label, color in zip(datasets, labels, colors, strict=False):
        da = _require(ds, variable)
        reduce = [d for d in ("batch", "time") if d in da.dims]
        med = da.median(reduce).values
        ax.plot(np.arange(1, med.size + 1), med, marker="o", ms=2.5, color=color, label=str(label), **kwargs)
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


#: variable that must be present -> plot function, in the order of :func:`summary`
PLOTS = {
    "singular_values": singular_values,
    "singular_value_heatmap": singular_value_heatmap,
    "lyapunov_spectrum": lyapunov_spectrum,
    "lyapunov_convergence": lyapunov_convergence,
    "eigenvalues": eigenvalues,
    "end_to_end": end_to_end,
}
_NEEDS = {
    "singular_values": "singular_values",
    "singular_value_heatmap": "singular_values",
    "lyapunov_spectrum": "lyapunov_exponents",
    "lyapunov_convergence": "local_lyapunov",
    "eigenvalues": "eigenvalues_real",
    "end_to_end": "end_to_end_log_singular_values",
}


def available(ds) -> list[str]:
    """Names of the plots in :data:`PLOTS` that ``ds`` has the variables for."""
    return [name for name in PLOTS if _NEEDS[name] in ds.data_vars]


def summary(ds):
    """A figure with one panel per available plot; returns the Figure."""
    import matplotlib.pyplot as plt

    names = available(ds)
    if not names:
        raise ValueError(f"nothing to plot: the dataset has none of {sorted(set(_NEEDS.values()))}")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        PLOTS[name](ds, ax=ax)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(f"rnnjac summary — {ds.attrs.get('architecture', '')} {ds.attrs.get('checkpoint', '')}".strip())
    return fig
