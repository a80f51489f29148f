"""Finite-difference checks of step Jacobians: "how do I test that my Jacobian is right?".

The reference is the central difference of the one-step map around the *recorded* states,

    J_fd[:, j] = (F(s + h_j e_j, x) - F(s - h_j e_j, x)) / (2 h_j),   h_j = eps * max(1, |s_j|),

computed in float64 (a float32 model is promoted to a float64 copy for the reference; the caller's
model is untouched). The actual step ``(s_j + h_j) - (s_j - h_j)`` is used as the denominator so that
the representation error of ``s_j + h_j`` does not enter. Truncation error is O(h^2) and round-off
O(u / h) with u the float64 machine epsilon, balanced near ``h = u^(1/3) ~ 6e-6``, which is the
default: a scan over eps (``tests/test_verify.py::test_default_eps_sits_in_the_error_minimum``) puts
the minimum of the error curve between 3e-6 and 1e-5 for all three architectures, with errors ~1e-11.

A step passes when every entry satisfies ``|J - J_fd| <= atol + rtol |J_fd|`` (numpy's ``allclose``
rule). Jacobians computed in float32 are compared with tolerances widened to at least
``rtol=1e-4, atol=1e-5`` (float32 carries about 7 digits, and ``J`` has O(1) entries), with a
:class:`~rnnjac.RnnjacWarning` saying so; a wrong closed form is still off by O(1).
"""

from __future__ import annotations

import warnings

import torch
import xarray as xr
from torch import Tensor

from ._checks import RnnjacWarning, check_choice, check_positive_int, prepare
from ._datasets import build_dataset
from ._fd import compare_jacobians, fd_columns
from ._kernels import run_states

__all__ = ["finite_difference_jacobians", "verify"]

DEFAULT_EPS = float(torch.finfo(torch.float64).eps) ** (1 / 3)  # 6.06e-6
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5
WRT = ("state", "inputs")


def _check_eps(eps):
    if eps is None:
        return DEFAULT_EPS
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    return float(eps)


def _reference_dynamics(problem):
    """The system the finite differences run on, and its dtype: a float64 copy, or the model itself where it
    cannot be converted (a custom step, in the inputs' dtype)."""
    dyn = problem.dyn
    if not dyn.convertible:
        return dyn, problem.xs.dtype
    return dyn.to(dtype=torch.float64), torch.float64


def finite_difference_jacobians(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    eps: float | None = None,
    batch_first: bool | None = None,
    submodule=None,
) -> Tensor:
    """Central finite-difference Jacobians of the one-step map, in float64.

    Parameters
    ----------
    model, inputs, h0, state, batch_first, submodule
        As in :func:`rnnjac.jacobians`.
    eps : float, optional
        Relative step: ``h_j = eps * max(1, |s_j|)`` (default ``6.06e-6``).

    Returns
    -------
    Tensor
        ``(B, T, D, D)`` in float64 (custom cells: in the inputs' dtype), around the states recorded
        by running the model in its own dtype.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(2, 3, batch_first=True).double()
    >>> x = torch.randn(1, 4, 2, dtype=torch.float64)
    >>> bool(torch.allclose(rnnjac.finite_difference_jacobians(rnn, x), rnnjac.jacobians(rnn, x), atol=1e-8))
    True
    """
    eps = _check_eps(eps)
    problem = prepare(model, inputs, h0, state=state, batch_first=batch_first, submodule=submodule)
    states = run_states(problem)
    ref, dtype = _reference_dynamics(problem)
    b, t = problem.batch, problem.steps
    s = states[:, :-1].reshape(b * t, -1).to(dtype)
    x = problem.xs.reshape(b * t, -1).to(dtype)
    d = problem.dyn.size(problem.state)
    eye = torch.eye(d, dtype=dtype, device=s.device).expand(b * t, d, d)
    j = fd_columns(ref, problem.state, s, x, eye, eps).reshape(b, t, d, d)
    return j[0] if problem.unbatched else j


def _describe_unit(dyn, state, i: int) -> str:
    uc = dyn.unit_coords(state)
    return f"layer {uc['layer'][i]} {uc['part'][i]}[{uc['neuron'][i]}]"


def _describe_input_entry(dyn, state, row: int, col: int, directions: int | None) -> str:
    """Where the worst entry of an input-Jacobian check sits (rows of ``[B v; B^T u]`` when directional)."""
    if directions is None:
        return f"row {_describe_unit(dyn, state, row)}, column input[{col}]"
    d = dyn.size(state)
    if row < d:
        return f"row {_describe_unit(dyn, state, row)} of B v (direction {col})"
    return f"input[{row - d}] of u^T B (direction {col})"


def verify(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    method: str = "auto",
    eps: float | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    directions: int | None = None,
    generator: torch.Generator | None = None,
    batch_first: bool | None = None,
    dtype: torch.dtype | None = None,
    submodule=None,
    wrt: str = "state",
) -> xr.Dataset:
    """Check the Jacobians of ``method`` against float64 finite differences.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first, submodule
        As in :func:`rnnjac.jacobians`; whatever ``method`` resolves to is what gets checked (the
        closed forms, the autograd path, or a ``CustomCell``'s own ``jacobian``).
    eps : float, optional
        Relative finite-difference step (default ``u^(1/3) = 6.06e-6``).
    rtol, atol : float
        Entry-wise tolerance ``|J - J_fd| <= atol + rtol |J_fd|``. Widened (with a warning) for float32.
    directions : int, optional
        ``None``: compare every column. ``k``: directional check along ``k`` random unit vectors ``v``
        (``J v`` against the finite difference) and ``k`` random ``u`` (``u^T J`` against reverse-mode
        autograd of the step), which costs O(k) instead of O(D) steps per Jacobian.
    generator : torch.Generator, optional
        Seeds the random directions.
    dtype : torch.dtype, optional
        Check a converted copy of the model (``torch.float64`` gives the tight check for a float32
        model; the model itself is untouched). Built-in modules only: a custom step is the caller's
        to convert (an error unless everything already has this dtype).
    wrt : {"state", "inputs"}
        ``"state"``: the step Jacobians ``J_t = ds_t/ds_{t-1}``; ``"inputs"``: the input Jacobians
        ``B_t = ds_t/dx_t`` of :func:`rnnjac.input_jacobians` (columns are input features; directional:
        ``B v`` against finite differences in the input and ``u^T B`` against reverse mode).

    Returns
    -------
    xarray.Dataset
        ``fd_max_abs_error`` and ``fd_max_rel_error`` over ``(batch, time)``; attrs ``passed`` (0/1),
        ``rtol``, ``atol``, ``eps``, ``mode`` and, for the worst entry, ``worst_batch``, ``worst_time``,
        ``worst_row``, ``worst_col`` and ``worst_block`` (which layer/part rows and columns), ``wrt``, and
        ``submodule`` when a submodule of a larger model was checked.

    Examples
    --------
    >>> import torch, rnnjac
    >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True).double()
    >>> ds = rnnjac.verify(lstm, torch.randn(2, 5, 3, dtype=torch.float64))
    >>> ds.attrs["passed"]
    1
    >>> rnnjac.verify(lstm, torch.randn(2, 5, 3, dtype=torch.float64), wrt="inputs").attrs["passed"]
    1
    """
    eps = _check_eps(eps)
    check_choice("wrt", wrt, WRT)
    check_positive_int("directions", directions, allow_none=True)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"{name} must be a non-negative number; got {tol!r}")
    problem = prepare(
        model, inputs, h0, state=state, method=method, batch_first=batch_first, dtype=dtype, submodule=submodule
    )
    dyn = problem.dyn
    if problem.xs.dtype != torch.float64:
        rtol, atol = max(rtol, FLOAT32_RTOL), max(atol, FLOAT32_ATOL)
        warnings.warn(
            f"verifying {problem.xs.dtype} Jacobians against float64 finite differences: "
            f"tolerances widened (rtol {rtol:g}, atol {atol:g}); use a float64 model for a tight check",
            RnnjacWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        states = run_states(problem)
        ref, ref_dtype = _reference_dynamics(problem)
    result = compare_jacobians(
        problem,
        states,
        ref,
        ref_dtype,
        eps=eps,
        rtol=rtol,
        atol=atol,
        directions=directions,
        generator=generator,
        wrt=wrt,
    )
    passed = result.worst_ratio <= 1.0
    wb, wt, wr, wc = result.worst
    if wrt == "inputs":
        block = _describe_input_entry(dyn, problem.state, wr, wc, directions)
    elif result.columns_are_units:
        block = f"row {_describe_unit(dyn, problem.state, wr)}, column {_describe_unit(dyn, problem.state, wc)}"
    elif wc < (directions or 0):
        block = f"row {_describe_unit(dyn, problem.state, wr)} of J v (direction {wc})"
    else:
        block = f"column {_describe_unit(dyn, problem.state, wr)} of u^T J (direction {wc - (directions or 0)})"
    attrs = {
        "passed": int(passed),
        "rtol": float(rtol),
        "atol": float(atol),
        "eps": float(eps),
        "mode": "full" if directions is None else "directional",
        "directions": int(directions or 0),
        "fd_dtype": str(ref_dtype).replace("torch.", ""),
        "worst_batch": int(wb),
        "worst_time": int(wt),
        "worst_row": int(wr),
        "worst_col": int(wc),
        "worst_block": block,
        "worst_tolerance_ratio": float(result.worst_ratio),
        "wrt": wrt,
        **problem.attrs,
    }
    return build_dataset(
        {"fd_max_abs_error": result.abs_error, "fd_max_rel_error": result.rel_error},
        dyn=dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config={"eps": eps, "rtol": rtol, "atol": atol, "directions": directions, "wrt": wrt},
        attrs=attrs,
    )
