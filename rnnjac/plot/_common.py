"""Shared helpers of the plots: requirement checks, axes, labels, titles, sweep and checkpoint selection,
and the markers for points at ``-inf``."""

from __future__ import annotations

import numpy as np

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


def _require_fixed_point(ds, name: str):
    """``ds[name]`` of a fixed-point dataset, or an error that says where such a dataset comes from."""
    if name not in ds.data_vars:
        raise ValueError(
            f"this plot needs the variable {name!r} of a fixed-point dataset (from rnnjac.fixed_points); "
            f"the dataset has: {', '.join(sorted(ds.data_vars)) or 'none'}"
        )
    return ds[name]


#: the variables of a fixed-point dataset that both fixed-point plots need
_FP_NEEDS = ("fixed_point_states", "is_fixed_point", "stable")

#: plot -> (variables it needs, what it draws: "any" = one model or every checkpoint of a sweep,
#: "one" = one model or one chosen checkpoint, "sweep" = a curve over the checkpoints of a sweep,
#: "fixed_point" = the points of a fixed-point dataset)
_SPEC = {
    "singular_values": (("singular_values",), "any"),
    "singular_value_heatmap": (("singular_values",), "one"),
    "lyapunov_spectrum": (("lyapunov_exponents",), "any"),
    "lyapunov_convergence": (("local_lyapunov",), "one"),
    "eigenvalues": (("eigenvalues_real", "eigenvalues_imag"), "one"),
    "end_to_end": (("end_to_end_log_singular_values",), "one"),
    "sensitivity": (("input_sensitivity_log_norm",), "one"),
    "lyapunov_vs_training_step": (("lyapunov_exponents",), "sweep"),
    "kaplan_yorke_vs_training_step": (("kaplan_yorke_dimension",), "sweep"),
    "fixed_points": (_FP_NEEDS, "fixed_point"),
    "fixed_point_eigenvalues": (
        (*_FP_NEEDS, "fixed_point_eigenvalues_real", "fixed_point_eigenvalues_imag"),
        "fixed_point",
    ),
}


def _check(name: str, ds, checkpoint=None):
    """Check ``ds`` for the plot ``name`` before anything is drawn; returns ``(ds, sweep_dim or None)``."""
    from .._datasets import VARIABLES

    needs, kind = _SPEC[name]
    for var in needs:
        (_require_fixed_point if kind == "fixed_point" else _require)(ds, var)
    if kind == "fixed_point":
        dim = None
    elif kind == "sweep":
        dim = _sweep_dim(ds)
        if dim is None:
            raise ValueError(
                f"{name} needs a sweep: a dataset with a 'checkpoint' (or 'training_step') dim, as "
                f"analyze_checkpoints writes; this one has dims {tuple(ds.dims)}"
            )
    else:
        ds, dim = _one_or_every_checkpoint(name, ds, checkpoint, kind)
    for var in needs:
        want = VARIABLES[var][0]
        got = tuple(d for d in ds[var].dims if d != dim)
        if got != want:
            raise ValueError(f"{name} expects {var!r} with dims {want} (plus a sweep dim); it has {ds[var].dims}")
    return ds, dim


def _one_or_every_checkpoint(name: str, ds, checkpoint, kind: str):
    """``(ds, sweep_dim)`` for a plot of one model (``kind="one"``) or of every checkpoint (``"any"``)."""
    ds, dim = _prepare(ds, checkpoint)
    if dim is not None and kind == "one":
        n = ds.sizes[dim]
        raise ValueError(
            f"{name} draws one checkpoint and the dataset is a sweep of {n} (dim {dim!r}); pass checkpoint= "
            f"a position 0..{n - 1} or a path (e.g. checkpoint={n - 1}, the last), or use lyapunov_spectrum, "
            "singular_values or lyapunov_vs_training_step, which draw every checkpoint"
        )
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


def _why_not(name: str, ds) -> str | None:
    """Why ``PLOTS[name](ds)`` would refuse ``ds`` (None when it draws something without keywords).

    A fixed-point dataset without a single point counts as refused: there is nothing of it to draw.
    """
    try:
        _check(name, ds)
    except ValueError as err:
        return str(err)
    if _SPEC[name][1] == "fixed_point" and ds.sizes.get("fixed_point", 0) == 0:
        return "the fixed-point dataset has no fixed or slow point (its 'fixed_point' dim has size 0)"
    return None
