"""The one place that builds xarray objects (files are written and read by :mod:`rnnjac._io`).

Schema (the README's "Conventions" section):

- dims ``batch``, ``time`` (t = 1..T, units "step"), ``sv_index``, ``eig_index``, ``le_index``,
  ``unit`` (with coords ``layer``, ``part``, ``neuron``), ``bound`` (coords ``lower``, ``upper``: confidence
  intervals), ``checkpoint`` for sweeps;
- variables listed in :data:`VARIABLES`, each with ``long_name`` and ``units``;
- global attributes: strings and numbers only (flags 0/1, configurations as JSON strings).
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._version import __version__

__all__ = ["VARIABLES", "validate", "build_dataset"]

BATCH, TIME, SV, EIG, LE, UNIT, CHECKPOINT = "batch", "time", "sv_index", "eig_index", "le_index", "unit", "checkpoint"
#: fixed points (:func:`rnnjac.fixed_points`): points found, the searches' initial states, input conditions,
#: leading eigenmodes
FIXED_POINT, INITIAL_STATE, CONDITION, MODE = "fixed_point", "initial_state", "condition", "mode"
#: confidence intervals: coords ``lower``, ``upper``
BOUND = "bound"
BOUNDS = ("lower", "upper")
#: lagged input sensitivities (:func:`rnnjac.sensitivity`): lag tau = 0..max_lag, index of their singular values
LAG, SENS_SV = "lag", "sensitivity_sv_index"
DIMS = (CHECKPOINT, BATCH, TIME, SV, EIG, LE, UNIT, CONDITION, INITIAL_STATE, FIXED_POINT, MODE, BOUND)
DIMS += (LAG, SENS_SV)

#: name -> (dims, long_name, units)
VARIABLES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "singular_values": ((BATCH, TIME, SV), "singular values of the step Jacobian J_t", "1"),
    "eigenvalues_real": ((BATCH, TIME, EIG), "real part of the eigenvalues of J_t", "1"),
    "eigenvalues_imag": ((BATCH, TIME, EIG), "imaginary part of the eigenvalues of J_t", "1"),
    "spectral_radius": ((BATCH, TIME), "spectral radius of J_t", "1"),
    "lyapunov_exponents": ((BATCH, LE), "Lyapunov exponents", "nats/step"),
    "local_lyapunov": ((BATCH, TIME, LE), "local Lyapunov exponents log R_ii at step t", "nats/step"),
    "kaplan_yorke_dimension": ((BATCH,), "Kaplan-Yorke (Lyapunov) dimension", "1"),
    "ks_entropy": ((BATCH,), "sum of positive Lyapunov exponents (Pesin entropy bound)", "nats/step"),
    # uncertainty and convergence of the exponents over the batch (rnnjac._uncertainty; attrs ci, uncertainty_method)
    "lyapunov_exponents_mean": ((LE,), "Lyapunov exponents, mean over the batch", "nats/step"),
    "lyapunov_exponents_stderr": ((LE,), "standard error of lyapunov_exponents_mean", "nats/step"),
    "lyapunov_exponents_bounds": (
        (BOUND, LE),
        "confidence interval of lyapunov_exponents_mean (level: attr ci)",
        "nats/step",
    ),
    "lyapunov_stderr_source": (
        (LE,),
        "source of the standard error: 0 between trajectories, 1 time blocks, 2 both pooled",
        "1",
    ),
    "lyapunov_block_length": ((LE,), "QRs per time block of the batch-means error (0: fewer than two blocks)", "1"),
    "lyapunov_converged": ((LE,), "1: the running estimate settled (drift over the last half within 3 errors)", "1"),
    "lyapunov_more_steps": ((LE,), "counted steps likely still needed to converge (0: converged)", "step"),
    "kaplan_yorke_dimension_mean": ((), "Kaplan-Yorke dimension of the mean spectrum", "1"),
    "kaplan_yorke_dimension_stderr": ((), "bootstrap standard error of kaplan_yorke_dimension_mean", "1"),
    "kaplan_yorke_dimension_bounds": ((BOUND,), "bootstrap confidence interval of kaplan_yorke_dimension_mean", "1"),
    "ks_entropy_mean": ((), "sum of the positive mean Lyapunov exponents", "nats/step"),
    "ks_entropy_stderr": ((), "bootstrap standard error of ks_entropy_mean", "nats/step"),
    "ks_entropy_bounds": ((BOUND,), "bootstrap confidence interval of ks_entropy_mean", "nats/step"),
    "end_to_end_log_singular_values": (
        (BATCH, TIME, SV),
        "natural log of the singular values of ds_t/ds_0",
        "nats",
    ),
    "states": ((BATCH, TIME, UNIT), "hidden state s_t", "1"),
    # Lyapunov vectors (rnnjac.lyapunov_vectors): columns along le_index, unit norm, arbitrary sign
    "backward_lyapunov_vectors": ((BATCH, TIME, UNIT, LE), "backward (Gram-Schmidt) Lyapunov vectors: Q_t", "1"),
    "covariant_lyapunov_vectors": ((BATCH, TIME, UNIT, LE), "covariant Lyapunov vectors v_i(t) (Ginelli)", "1"),
    "covariant_exponents": ((BATCH, LE), "mean log growth ||J_t v_i(t-1)|| of the covariant vectors", "nats/step"),
    "participation_ratio": ((BATCH, TIME, LE), "participation ratio (sum v^2)^2 / sum v^4 of each vector", "1"),
    "unstable_dimension": ((BATCH,), "covariant vectors spanning the unstable subspace (exponent > 0 or split=)", "1"),
    "unstable_stable_angle": ((BATCH, TIME), "smallest angle between the unstable and stable subspaces", "rad"),
    "fd_max_abs_error": ((BATCH, TIME), "max |J_t - J_t(finite differences)|", "1"),
    "fd_max_rel_error": ((BATCH, TIME), "max |J_t - J_fd| / max |J_fd|", "1"),
    # lagged input sensitivities (rnnjac.sensitivity); NaN where t - lag < 1
    "input_sensitivity_log_norm": ((BATCH, TIME, LAG), "natural log of the Frobenius norm of ds_t/dx_(t-lag)", "nats"),
    "input_sensitivity_log_singular_values": (
        (BATCH, TIME, LAG, SENS_SV),
        "natural log of the leading singular values of ds_t/dx_(t-lag)",
        "nats",
    ),
    "output_sensitivity_log_norm": ((BATCH, TIME, LAG), "natural log of the Frobenius norm of dy_t/dx_(t-lag)", "nats"),
    "output_sensitivity_log_singular_values": (
        (BATCH, TIME, LAG, SENS_SV),
        "natural log of the leading singular values of dy_t/dx_(t-lag)",
        "nats",
    ),
    # fixed points and slow points
    "fixed_point_states": ((FIXED_POINT, UNIT), "state s* at the fixed or slow point", "1"),
    "q": ((FIXED_POINT,), "speed q = 1/2 ||F(s*) - s*||^2", "1"),
    "is_fixed_point": ((FIXED_POINT,), "fixed point (1: q <= tol) or slow point (0)", "1"),
    "condition_index": ((FIXED_POINT,), "input condition the point belongs to", "1"),
    "fixed_point_eigenvalues_real": ((FIXED_POINT, EIG), "real part of the eigenvalues of J at the point", "1"),
    "fixed_point_eigenvalues_imag": ((FIXED_POINT, EIG), "imaginary part of the eigenvalues of J at the point", "1"),
    "fixed_point_spectral_radius": ((FIXED_POINT,), "spectral radius of J at the point", "1"),
    "n_unstable": ((FIXED_POINT,), "number of eigenvalues of J outside the unit circle", "1"),
    "stable": ((FIXED_POINT,), "linearly stable (1: no eigenvalue of J outside the unit circle)", "1"),
    "right_eigenvectors_real": ((FIXED_POINT, MODE, UNIT), "real part of right eigenvector r (J r = lambda r)", "1"),
    "right_eigenvectors_imag": ((FIXED_POINT, MODE, UNIT), "imaginary part of the right eigenvector r", "1"),
    "left_eigenvectors_real": ((FIXED_POINT, MODE, UNIT), "real part of the left eigenvector l (l J = lambda l)", "1"),
    "left_eigenvectors_imag": ((FIXED_POINT, MODE, UNIT), "imaginary part of the left eigenvector l", "1"),
    "converged": ((CONDITION, INITIAL_STATE), "1: the search from this initial state reached q <= tol", "1"),
    "final_q": ((CONDITION, INITIAL_STATE), "q where the search from this initial state ended", "1"),
    "point_index": ((CONDITION, INITIAL_STATE), "index along fixed_point of the point reached (-1: none)", "1"),
    "status": (
        (CONDITION, INITIAL_STATE),
        "0 converged (q <= tol), 1 stalled (slow point), 2 iteration limit, 3 outlier, 4 non-finite",
        "1",
    ),
}

#: attributes that ``rnnjac info`` shows for a spectra file
SUMMARY_ATTRS = (
    "architecture",
    "num_layers",
    "hidden_size",
    "input_size",
    "state",
    "method",
    "dtype",
    "checkpoint",
    "training_step",
    "warmup",
    "tangent_warmup",
    "reortho_every",
    "warmup_used",  # what "auto" chose, and the lags of the sensitivities
    "tangent_warmup_used",
    "reortho_interval_min",
    "reortho_interval_mean",
    "reortho_interval_max",
    "max_lag",
    "seed",
    "ci",
    "created_at",
    "rnnjac_version",
)

REQUIRED_ATTRS = (
    "rnnjac_version",
    "torch_version",
    "created_at",
    "architecture",
    "num_layers",
    "hidden_size",
    "input_size",
    "state",
    "method",
    "dtype",
    "device",
    "config_json",
)


def _np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _attr(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, str):
        return str(v)  # also plain-str subclasses such as torch's TorchVersion
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if v is None:
        return ""
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v).replace("torch.", "")
    return json.dumps(v, default=str)


def build_dataset(
    variables: dict,
    *,
    dyn=None,
    state: str = "full",
    method: str = "",
    dtype=None,
    device=None,
    time=None,
    config: dict | None = None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Assemble a labelled Dataset from tensors keyed by names of :data:`VARIABLES`.

    ``time`` gives the step numbers (default 1..T); unit coordinates come from ``dyn``.
    """
    data_vars: dict[str, xr.Variable] = {}
    coords: dict[str, Any] = {}
    for name, value in variables.items():
        if value is None:
            continue
        dims, long_name, units = VARIABLES[name]
        data_vars[name] = xr.Variable(dims, _np(value), {"long_name": long_name, "units": units})
    used = {d for v in data_vars.values() for d in v.dims}
    sizes = {d: n for v in data_vars.values() for d, n in zip(v.dims, v.shape, strict=False)}
    if BATCH in used:
        coords[BATCH] = np.arange(sizes[BATCH])
    if TIME in used:
        t = np.arange(1, sizes[TIME] + 1) if time is None else np.asarray(time)
        coords[TIME] = xr.Variable(TIME, t, {"units": "step", "long_name": "time step t"})
    for d in (SV, EIG, LE, CONDITION, INITIAL_STATE, FIXED_POINT, MODE):
        if d in used:
            coords[d] = np.arange(sizes[d])
    if LAG in used:
        lag_attrs = {"units": "step", "long_name": "lag tau (input x_(t-tau))"}
        coords[LAG] = xr.Variable(LAG, np.arange(sizes[LAG]), lag_attrs)
    if SENS_SV in used:
        coords[SENS_SV] = np.arange(sizes[SENS_SV])
    if BOUND in used:
        coords[BOUND] = np.asarray(BOUNDS)
    if UNIT in used and dyn is not None:
        uc = dyn.unit_coords(state)
        coords["layer"] = (UNIT, np.asarray(uc["layer"], dtype=np.int64))
        coords["part"] = (UNIT, np.asarray(uc["part"], dtype=str))
        coords["neuron"] = (UNIT, np.asarray(uc["neuron"], dtype=np.int64))
    ds = xr.Dataset(data_vars, coords=coords)
    base = {
        "rnnjac_version": __version__,
        "torch_version": str(torch.__version__),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "state": state,
        "method": method,
        "dtype": _attr(dtype),
        "device": _attr(device),
        "config_json": json.dumps(config or {}, sort_keys=True, default=str),
    }
    if dyn is not None:
        base.update(dyn.describe())
        note = dyn.state_note(state)
        if note is not None:
            base["state_note"] = note
    for k, v in (attrs or {}).items():
        base[k] = v
    ds.attrs = {k: _attr(v) for k, v in base.items()}
    return ds


_PER_CHECKPOINT_ATTRS = (
    "checkpoint",
    "checkpoint_sha256",
    "training_step",
    "created_at",
    "command",
    "nonlinearity",
    "nonlinearity_source",
    "checkpoint_prefix",
)


def stack_checkpoints(rows: list[xr.Dataset]) -> xr.Dataset:
    """Stack per-checkpoint Datasets along a new ``checkpoint`` dim (coords: path, training step, sha256)."""
    stacked = []
    for ds in rows:
        coords = {
            CHECKPOINT: [ds.attrs["checkpoint"]],
            "training_step": (CHECKPOINT, [int(ds.attrs.get("training_step", -1))]),
            "checkpoint_sha256": (CHECKPOINT, [ds.attrs["checkpoint_sha256"]]),
        }
        stacked.append(ds.expand_dims(CHECKPOINT).assign_coords(coords))
    out = xr.concat(stacked, dim=CHECKPOINT, coords="different", compat="equals", combine_attrs="drop_conflicts")
    for k in _PER_CHECKPOINT_ATTRS:
        out.attrs.pop(k, None)
    out[CHECKPOINT].attrs["long_name"] = "checkpoint file"
    out["training_step"].attrs.update(long_name="training step (from metadata or file name; -1 unknown)", units="step")
    return out


def concat_checkpoints(parts: list[xr.Dataset], *, attrs: dict | None = None) -> xr.Dataset:
    """Join stacked (or single-row) checkpoint Datasets, sorted by training step then path."""
    parts = [p if CHECKPOINT in p.dims else p.expand_dims(CHECKPOINT) for p in parts]
    out = (
        xr.concat(parts, dim=CHECKPOINT, coords="different", compat="equals", combine_attrs="drop_conflicts")
        if len(parts) > 1
        else parts[0]
    )
    order = np.lexsort((out[CHECKPOINT].values, out["training_step"].values))
    out = out.isel({CHECKPOINT: order})
    out.attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out.attrs.update({k: _attr(v) for k, v in (attrs or {}).items()})
    return out


def validate(ds: xr.Dataset) -> None:
    """Check the schema: known dims, variables with long_name/units, attrs strings or numbers.

    Raises ``ValueError`` listing every problem found.
    """
    problems = []
    for d in ds.dims:
        if d not in DIMS and d not in ("unit_out", "unit_in"):
            problems.append(f"unknown dim {d!r}")
    for name, var in ds.data_vars.items():
        for key in ("long_name", "units"):
            if key not in var.attrs:
                problems.append(f"variable {name!r} lacks attribute {key!r}")
        if name in VARIABLES:
            want = VARIABLES[name][0]
            got = tuple(d for d in var.dims if d != CHECKPOINT)
            if got != want:
                problems.append(f"variable {name!r} has dims {var.dims}, expected {want}")
    if TIME in ds.coords and ds[TIME].attrs.get("units") != "step":
        problems.append("coordinate 'time' must have units 'step'")
    for k in REQUIRED_ATTRS:
        if k not in ds.attrs:
            problems.append(f"missing global attribute {k!r}")
    for k, v in ds.attrs.items():
        if not isinstance(v, (str, int, float, np.integer, np.floating)):
            problems.append(f"attribute {k!r} is {type(v).__name__}, expected a string or number")
    try:
        json.loads(ds.attrs.get("config_json", "{}"))
    except json.JSONDecodeError:
        problems.append("attribute 'config_json' is not valid JSON")
    if problems:
        raise ValueError("dataset does not follow the rnnjac schema: " + "; ".join(problems))
