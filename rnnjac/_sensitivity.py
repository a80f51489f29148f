r"""Input Jacobians and lagged input sensitivities: how far back an RNN remembers its inputs.

- :func:`input_jacobians`: ``B_t = ds_t/dx_t`` for every step, ``(B, T, D, I)``;
- :func:`sensitivity`: norms and leading singular values of ``ds_t/dx_{t-tau} = J_t ... J_{t-tau+1} B_{t-tau}``
  for ``tau = 0..max_lag`` (and of ``dy_t/dx_{t-tau}`` through a readout), as a Dataset over
  ``(batch, time, lag)`` that merges into the spectra Dataset of the same inputs;
- :func:`memory_profile`: the median over batch and time of the log norm, against lag.

The numbers come from :mod:`rnnjac._input_jacobians`; this module checks the arguments and labels the result.
At long lags the log norm falls by the top Lyapunov exponent per step (Oseledets' theorem; Ganguli, Huh &
Sompolinsky 2008, PNAS 105:18970 for memory traces of linear networks).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ._checks import check_positive_int, prepare
from ._datasets import LAG, build_dataset
from ._input_jacobians import input_jacobian_stream, sensitivity_tensors
from ._kernels import time_chunk_for

__all__ = ["input_jacobians", "memory_profile", "sensitivity"]


def input_jacobians(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    submodule=None,
) -> Tensor:
    """Per-step input Jacobians ``B_t = ds_t/dx_t`` for ``t = 1..T``.

    Parameters
    ----------
    model, inputs, h0, state, batch_first, submodule
        As in :func:`rnnjac.jacobians` (``state="h"``: the h rows; README, "Conventions").
    method : {"auto", "analytic", "autograd"}
        ``"analytic"``: closed forms for the built-in cells (each layer's ``diag(.) W_ih``-shaped block, chained
        through the layers below); ``"autograd"``: ``torch.func.vmap(jacrev(step, argnums=1))``; ``"auto"``:
        analytic for built-in modules and cells, autograd for custom cells (whose own ``jacobian`` is ``d/ds``).
    dtype, device : optional
        Analyse a converted copy of a built-in model (the model itself is untouched).

    Returns
    -------
    Tensor
        ``(B, T, D, I)`` (``(T, D, I)`` for unbatched inputs); rows are states, columns input features.
        Differentiable with respect to the model's parameters when grad mode is on. Computed one time chunk
        at a time (the states of a chunk are checked finite before its Jacobians are formed).

    Examples
    --------
    >>> import torch, rnnjac
    >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    >>> rnnjac.input_jacobians(lstm, torch.randn(2, 5, 3)).shape
    torch.Size([2, 5, 16, 3])
    """
    problem = prepare(
        model,
        inputs,
        h0,
        state=state,
        method=method,
        batch_first=batch_first,
        dtype=dtype,
        device=device,
        submodule=submodule,
    )
    d, i = problem.dyn.size(problem.state), problem.xs.shape[-1]
    n = time_chunk_for(problem.batch, max(d, i), problem.steps)
    parts = [chunk.b for chunk in input_jacobian_stream(problem, n)]
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return out[0] if problem.unbatched else out


def _check_max_lag(max_lag, steps: int) -> None:
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or max_lag < 0:
        raise ValueError(f"max_lag must be an integer >= 0; got {max_lag!r}")
    if max_lag >= steps:
        raise ValueError(
            f"max_lag must be smaller than the number of steps T = {steps} (lag tau needs an input at t - tau >= 1); "
            f"got max_lag={max_lag}"
        )


def _check_readout(readout, problem) -> str:
    """Call ``readout`` once on the top layer's ``h_0`` and check what it returns; returns its description."""
    if not callable(readout):
        raise TypeError(f"readout must be an nn.Module or a callable on states (..., H) -> (..., O); got {readout!r}")
    dyn = problem.dyn
    h = problem.s0.index_select(-1, dyn.layout.top_h_index(problem.s0.device))
    with torch.no_grad():
        y = readout(h)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        found = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(f"readout must return a floating-point Tensor (..., O); got {found}")
    if y.dim() != 2 or y.shape[0] != h.shape[0] or y.shape[1] < 1:
        raise ValueError(
            f"readout must map the top layer's h states (B, H) = {tuple(h.shape)} to outputs (B, O); "
            f"got shape {tuple(y.shape)}"
        )
    return repr(readout) if isinstance(readout, torch.nn.Module) else getattr(readout, "__name__", "callable")


def sensitivity(
    model,
    inputs,
    h0=None,
    *,
    max_lag: int,
    readout=None,
    n_sv: int = 3,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    submodule=None,
) -> xr.Dataset:
    """Lagged input sensitivities ``ds_t/dx_{t-tau} = J_t ... J_{t-tau+1} B_{t-tau}``, ``tau = 0..max_lag``.

    How strongly the input ``tau`` steps ago still moves the state: the "memory" of the network. The ``D x I``
    blocks are pushed forward through the factored ``J_t`` (no ``D x D`` product is formed), all source times
    at once, and kept in log scale (renormalised every step), so long lags neither underflow nor overflow.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first, dtype, device, submodule
        As in :func:`input_jacobians`. ``state="h"`` reports the h rows of the exact derivative (c is
        propagated, not held).
    max_lag : int
        Largest lag ``L``, ``0 <= L < T``.
    readout : nn.Module or callable, optional
        Maps the top layer's h (the module's output; the whole state of a custom cell), ``(B, H) -> (B, O)``;
        adds ``dy_t/dx_{t-tau} = (dy/dh_t) ds_t/dx_{t-tau}``, with ``dy/dh_t`` from ``torch.func``. With
        ``dtype``/``device``, a module readout is converted like the model (a copy; the readout is untouched).
    n_sv : int
        Number of leading singular values kept (``min(I, n_sv)``; ``-inf`` beyond a block's rank).

    Returns
    -------
    xarray.Dataset
        ``input_sensitivity_log_norm`` ``(batch, time, lag)`` (natural log of the Frobenius norm) and
        ``input_sensitivity_log_singular_values`` ``(batch, time, lag, sensitivity_sv_index)``, plus the
        ``output_`` pair with a readout; NaN where ``t - lag < 1``. ``batch`` and ``time`` are those of
        :func:`rnnjac.spectra` (``xr.merge`` joins the two; unbatched inputs give one batch entry); attrs
        ``max_lag``, ``n_sv``, ``readout``.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(2, 8, batch_first=True)
    >>> ds = rnnjac.sensitivity(gru, torch.randn(4, 30, 2), max_lag=10, readout=torch.nn.Linear(8, 1))
    >>> ds.input_sensitivity_log_norm.dims, ds.output_sensitivity_log_singular_values.shape
    (('batch', 'time', 'lag'), (4, 30, 11, 2))
    >>> rnnjac.memory_profile(ds).dims
    ('lag',)
    """
    check_positive_int("n_sv", n_sv)
    problem = prepare(
        model,
        inputs,
        h0,
        state=state,
        method=method,
        batch_first=batch_first,
        dtype=dtype,
        device=device,
        submodule=submodule,
    )
    _check_max_lag(max_lag, problem.steps)
    if isinstance(readout, torch.nn.Module) and (dtype is not None or device is not None):
        readout = copy.deepcopy(readout).to(dtype=problem.xs.dtype, device=problem.xs.device)  # as the model
    described = _check_readout(readout, problem) if readout is not None else ""
    n_keep = min(problem.xs.shape[-1], n_sv)
    chunk = time_chunk_for(problem.batch, max(problem.dyn.state_size, problem.xs.shape[-1]), problem.steps)
    out = sensitivity_tensors(problem, int(max_lag), n_sv=n_keep, readout=readout, time_chunk=chunk)
    return build_dataset(
        out,
        dyn=problem.dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config={"max_lag": int(max_lag), "n_sv": int(n_sv), "readout": described},
        attrs={"max_lag": int(max_lag), "n_sv": int(n_keep), "readout": described, **problem.attrs},
    )


def memory_profile(ds: xr.Dataset, *, output: bool = False) -> xr.DataArray:
    """The memory profile: median over batch and time of the log norm of the lagged sensitivity, against lag.

    Parameters
    ----------
    ds : xarray.Dataset
        From :func:`sensitivity` (or a spectra Dataset it was merged into).
    output : bool
        Use ``output_sensitivity_log_norm`` (needs ``readout=``) instead of the state's.

    Returns
    -------
    xarray.DataArray
        ``(lag,)``, natural log (nats); the NaN entries (``t - lag < 1``) are left out of each median. Its slope
        at long lags is the top Lyapunov exponent for generic inputs.

    Examples
    --------
    >>> import torch, rnnjac
    >>> ds = rnnjac.sensitivity(torch.nn.RNN(1, 4, batch_first=True), torch.randn(2, 8, 1), max_lag=3)
    >>> rnnjac.memory_profile(ds).sizes["lag"]
    4
    """
    kind = "output" if output else "input"
    name = f"{kind}_sensitivity_log_norm"
    if not isinstance(ds, xr.Dataset) or name not in ds.data_vars:
        have = ", ".join(sorted(ds.data_vars)) if isinstance(ds, xr.Dataset) else type(ds).__name__
        hint = " with readout=" if output else ""
        raise ValueError(f"memory_profile needs {name!r} from rnnjac.sensitivity(...{hint}); found: {have}")
    da = ds[name]
    prof = da.median([d for d in da.dims if d != LAG], skipna=True)
    prof.name = f"{kind}_memory_profile"
    prof.attrs = {"long_name": f"median over batch and time of {da.attrs.get('long_name', name)}", "units": "nats"}
    return prof
