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

from ._checks import (
    NonFiniteError,
    RnnjacWarning,
    check_positive_int,
    prepare,
)
from .datasets import build_dataset
from .dynamics import grad_region, normal
from .jacobians import run_states, time_chunk_for

__all__ = ["finite_difference_jacobians", "verify"]

DEFAULT_EPS = float(torch.finfo(torch.float64).eps) ** (1 / 3)  # 6.06e-6
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5


def _check_eps(eps):
    if eps is None:
        return DEFAULT_EPS
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number; got {eps!r}")
    return float(eps)


def _restricted(dyn, state: str, s: Tensor):
    """``(base, step)``: the coordinates of ``s (N, D)`` that the chosen state perturbs, and the map
    ``step(z, x, s_ref)`` from them to the same coordinates of the next state (``"h"``: c held at its
    recorded value ``s_ref``; ``s_ref`` is ignored for the full state)."""
    if state == "full" or dyn.custom is not None:
        return s, lambda z, x, s_ref=None: dyn.step(z, x)
    idx = dyn.h_index(s.device)

    def step(z, x, s_ref):
        return dyn.step(dyn.with_h(z, s_ref), x).index_select(-1, idx)

    return s.index_select(-1, idx), step


def _fd_columns(dyn, state, s: Tensor, x: Tensor, directions: Tensor, eps: float) -> Tensor:
    """Central differences along ``directions (N, D_sub, k)`` at ``s (N, D)``: returns ``(N, D_sub, k)``."""
    n, k = s.shape[0], directions.shape[-1]
    base, step_fn = _restricted(dyn, state, s)
    restricted = base is not s
    scale = eps * torch.clamp(base.abs(), min=1.0)  # (N, D_sub)
    d_sub = base.shape[-1]
    max_cols = max(1, (2**24) // max(1, n * d_sub))
    out = []
    for c0 in range(0, k, max_cols):
        v = directions[..., c0 : c0 + max_cols]  # (N, D_sub, c)
        c = v.shape[-1]
        # step length per direction: eps * max(1, |s|) along the direction's largest component
        h = (scale.unsqueeze(-1) * v.abs()).amax(1, keepdim=True) / v.abs().amax(1, keepdim=True)
        plus = base.unsqueeze(-1) + h * v
        minus = base.unsqueeze(-1) - h * v
        denom = ((plus - minus) * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True)

        def flat(t, c=c):
            return t.transpose(1, 2).reshape(n * c, d_sub)

        xx = x.repeat_interleave(c, 0)
        sref = s.repeat_interleave(c, 0) if restricted else None
        fp, fm = step_fn(flat(plus), xx, sref), step_fn(flat(minus), xx, sref)
        diff = (fp - fm).reshape(n, c, -1).transpose(1, 2)
        out.append(diff / denom)
    return torch.cat(out, -1)


def _reference_dynamics(problem):
    dyn = problem.dyn
    if dyn.custom is not None:
        return dyn, problem.xs.dtype
    return dyn.to(dtype=torch.float64), torch.float64


def finite_difference_jacobians(
    model, inputs, h0=None, *, state: str = "full", eps: float | None = None, batch_first: bool | None = None
) -> Tensor:
    """Central finite-difference Jacobians of the one-step map, in float64.

    Parameters
    ----------
    model, inputs, h0, state, batch_first
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
    problem = prepare(model, inputs, h0, state=state, batch_first=batch_first)
    states = run_states(problem)
    ref, dtype = _reference_dynamics(problem)
    b, t = problem.batch, problem.steps
    s = states[:, :-1].reshape(b * t, -1).to(dtype)
    x = problem.xs.reshape(b * t, -1).to(dtype)
    d = problem.dyn.size(problem.state)
    eye = torch.eye(d, dtype=dtype, device=s.device).expand(b * t, d, d)
    j = _fd_columns(ref, problem.state, s, x, eye, eps).reshape(b, t, d, d)
    return j[0] if problem.unbatched else j


def _describe_unit(dyn, state, i: int) -> str:
    uc = dyn.unit_coords(state)
    return f"layer {uc['layer'][i]} {uc['part'][i]}[{uc['neuron'][i]}]"


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
) -> xr.Dataset:
    """Check the Jacobians of ``method`` against float64 finite differences.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first
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

    Returns
    -------
    xarray.Dataset
        ``fd_max_abs_error`` and ``fd_max_rel_error`` over ``(batch, time)``; attrs ``passed`` (0/1),
        ``rtol``, ``atol``, ``eps``, ``mode`` and, for the worst entry, ``worst_batch``, ``worst_time``,
        ``worst_row``, ``worst_col`` and ``worst_block`` (which layer/part rows and columns).

    Examples
    --------
    >>> import torch, rnnjac
    >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True).double()
    >>> ds = rnnjac.verify(lstm, torch.randn(2, 5, 3, dtype=torch.float64))
    >>> ds.attrs["passed"]
    1
    """
    eps = _check_eps(eps)
    check_positive_int("directions", directions, allow_none=True)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or tol < 0:
            raise ValueError(f"{name} must be a non-negative number; got {tol!r}")
    problem = prepare(model, inputs, h0, state=state, method=method, batch_first=batch_first, dtype=dtype)
    dyn = problem.dyn
    if problem.xs.dtype != torch.float64:
        rtol, atol = max(rtol, FLOAT32_RTOL), max(atol, FLOAT32_ATOL)
        warnings.warn(
            f"verifying {problem.xs.dtype} Jacobians against float64 finite differences: tolerances "
            f"widened to rtol={rtol:g}, atol={atol:g}; use a float64 model for a tight check",
            RnnjacWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        states = run_states(problem)
        ref, ref_dtype = _reference_dynamics(problem)
        b, steps, d = problem.batch, problem.steps, dyn.size(problem.state)
        mode = "full" if directions is None else "directional"
        width = d if directions is None else 2 * directions
        n_t = time_chunk_for(b, max(d, width), steps, 2**22)
        abs_err = torch.empty(b, steps, dtype=torch.float64)
        rel_err = torch.empty(b, steps, dtype=torch.float64)
        worst: tuple[float, tuple[int, int, int, int, bool] | None] = (-1.0, None)
        for t0 in range(0, steps, n_t):
            t1 = min(steps, t0 + n_t)
            n = b * (t1 - t0)
            s = states[:, t0:t1].reshape(n, -1)
            x = problem.xs[:, t0:t1].reshape(n, -1)
            lin = dyn.linearize(s, x, problem.method)
            s64, x64 = s.to(ref_dtype), x.to(ref_dtype)
            if directions is None:
                got = lin.materialize(problem.state)
                if not bool(torch.isfinite(got).all()):
                    bad = int(torch.nonzero(~torch.isfinite(got.reshape(b, t1 - t0, -1)).any(-1).any(0))[0, 0])
                    raise NonFiniteError(f"the Jacobian under test is NaN/Inf at step t={t0 + bad + 1}")
                eye = torch.eye(d, dtype=ref_dtype, device=s.device).expand(n, d, d)
                want = _fd_columns(ref, problem.state, s64, x64, eye, eps)
                got = got.to(ref_dtype)
                cols_are_units = True
            else:
                v = torch.randn(n, d, directions, generator=generator, dtype=ref_dtype).to(s.device)
                u = torch.randn(n, d, directions, generator=generator, dtype=ref_dtype).to(s.device)
                v, u = v / v.norm(dim=1, keepdim=True), u / u.norm(dim=1, keepdim=True)
                jv = lin.apply(v.to(s.dtype), problem.state).to(ref_dtype)
                jv_fd = _fd_columns(ref, problem.state, s64, x64, v, eps)
                utj = lin.apply_transpose(u.to(s.dtype), problem.state).to(ref_dtype)
                utj_ref = _reverse_mode(ref, problem.state, s64, x64, u)
                got, want = torch.cat([jv, utj], -1), torch.cat([jv_fd, utj_ref], -1)
                cols_are_units = False
            diff = (got - want).abs()
            excess = diff / (atol + rtol * want.abs())
            abs_err[:, t0:t1] = diff.amax((-2, -1)).reshape(b, t1 - t0).cpu()
            scale = want.abs().amax((-2, -1)).clamp_min(torch.finfo(ref_dtype).tiny)
            rel_err[:, t0:t1] = (diff.amax((-2, -1)) / scale).reshape(b, t1 - t0).cpu()
            top = float(excess.max())
            if top > worst[0]:
                flat = int(excess.reshape(-1).argmax())
                i_n, rem = divmod(flat, excess.shape[-2] * excess.shape[-1])
                row, col = divmod(rem, excess.shape[-1])
                worst = (top, (i_n // (t1 - t0), t0 + i_n % (t1 - t0) + 1, row, col, cols_are_units))
    passed = worst[0] <= 1.0
    assert worst[1] is not None
    wb, wt, wr, wc, cols_are_units = worst[1]
    if cols_are_units:
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
        "mode": mode,
        "directions": int(directions or 0),
        "fd_dtype": str(ref_dtype).replace("torch.", ""),
        "worst_batch": int(wb),
        "worst_time": int(wt),
        "worst_row": int(wr),
        "worst_col": int(wc),
        "worst_block": block,
        "worst_tolerance_ratio": float(worst[0]),
    }
    return build_dataset(
        {"fd_max_abs_error": abs_err, "fd_max_rel_error": rel_err},
        dyn=dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config={"eps": eps, "rtol": rtol, "atol": atol, "directions": directions},
        attrs=attrs,
    )


def _reverse_mode(ref, state: str, s: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``J^T u`` by reverse-mode autograd of the (float64) step, for each of the k columns of u."""
    with grad_region():  # also under the caller's no_grad / inference_mode
        s, x, u = normal(s), normal(x), normal(u)
        base, step = _restricted(ref.for_autograd(), state, s)
        vjp = torch.func.vjp(lambda z: step(z, x, s), base)[1]
        cols = [vjp(u[..., i])[0].detach() for i in range(u.shape[-1])]
    return torch.stack(cols, -1)
