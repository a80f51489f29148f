"""Finite-difference kernels of :func:`rnnjac.verify` (part of the tensor core, :mod:`rnnjac._kernels`).

Tensors in, tensors out: :func:`fd_columns` (central differences of the step along given directions),
:func:`fd_input_columns` (the same w.r.t. the input), :func:`reverse_mode_columns` and
:func:`reverse_mode_input_columns` (``J^T u`` and ``B^T u`` by autograd of the step) and
:func:`compare_jacobians`, which compares the Jacobians under test with them one bounded time chunk at a time
and returns a :class:`Comparison`; the labelled layer (:mod:`rnnjac._verify`) builds the Dataset. The rule and
the default step are in :mod:`rnnjac._verify`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import NonFiniteError, Problem
from ._dynamics import grad_region, normal
from ._input_jacobians import step_input_jacobians
from ._kernels import time_chunk_for

__all__ = [
    "Comparison",
    "compare_jacobians",
    "fd_columns",
    "fd_input_columns",
    "reverse_mode_columns",
    "reverse_mode_input_columns",
]


def _central(base: Tensor, directions: Tensor, eps: float, evaluate) -> Tensor:
    """Central differences of ``evaluate`` around ``base (N, d)`` along ``directions (N, d, k)``: ``(N, rows, k)``.

    ``evaluate(points (N c, d), c)`` returns the map at ``c`` perturbed copies of each row, rows repeated
    ``c`` times in a row. The step is ``h = eps max(1, |base|)`` along each direction's largest component, and the
    actual step ``(base + h) - (base - h)`` is the denominator."""
    n, k = base.shape[0], directions.shape[-1]
    scale = eps * torch.clamp(base.abs(), min=1.0)  # (N, d)
    d = base.shape[-1]
    max_cols = max(1, (2**24) // max(1, n * d))
    out = []
    for c0 in range(0, k, max_cols):
        v = directions[..., c0 : c0 + max_cols]  # (N, d, c)
        c = v.shape[-1]
        h = (scale.unsqueeze(-1) * v.abs()).amax(1, keepdim=True) / v.abs().amax(1, keepdim=True)
        plus = base.unsqueeze(-1) + h * v
        minus = base.unsqueeze(-1) - h * v
        denom = ((plus - minus) * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True)

        def flat(t, c=c):
            return t.transpose(1, 2).reshape(n * c, d)

        fp, fm = evaluate(flat(plus), c), evaluate(flat(minus), c)
        diff = (fp - fm).reshape(n, c, -1).transpose(1, 2)
        out.append(diff / denom)
    return torch.cat(out, -1)


def fd_columns(system, state: str, s: Tensor, x: Tensor, directions: Tensor, eps: float) -> Tensor:
    """Central differences of the step of ``system`` along ``directions (N, D_sub, k)`` at ``s (N, D)``, ``x (N, I)``:
    ``(N, D_sub, k)`` (:func:`_central`)."""
    base, step_fn = system.restricted_step(state, s)
    restricted = base is not s

    def evaluate(z, c):
        return step_fn(z, x.repeat_interleave(c, 0), s.repeat_interleave(c, 0) if restricted else None)

    return _central(base, directions, eps, evaluate)


def _state_rows(system, state: str, out: Tensor) -> Tensor:
    return out if state == "full" else out.index_select(-1, system.h_index(out.device))


def fd_input_columns(system, state: str, s: Tensor, x: Tensor, directions: Tensor, eps: float) -> Tensor:
    """Central differences of the step of ``system`` w.r.t. the input along ``directions (N, I, k)`` at ``s (N, D)``,
    ``x (N, I)``: ``(N, D_sub, k)`` (rows of ``state``; :func:`_central`)."""

    def evaluate(z, c):
        return _state_rows(system, state, system.step(s.repeat_interleave(c, 0), z))

    return _central(x, directions, eps, evaluate)


def reverse_mode_columns(system, state: str, s: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``J^T u`` by reverse-mode autograd of the step of ``system``, for each of the k columns of ``u (N, D_sub, k)``
    (also under the caller's ``no_grad``/``inference_mode``)."""
    with grad_region():
        s, x, u = normal(s), normal(x), normal(u)
        base, step = system.for_autograd().restricted_step(state, s)
        vjp = torch.func.vjp(lambda z: step(z, x, s), base)[1]
        cols = [vjp(u[..., i])[0].detach() for i in range(u.shape[-1])]
    return torch.stack(cols, -1)


def reverse_mode_input_columns(system, state: str, s: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``B^T u`` (``B = ds'/dx``, rows of ``state``) by reverse-mode autograd of the step, ``(N, I, k)``."""
    with grad_region():
        s, x, u = normal(s), normal(x), normal(u)
        ref = system.for_autograd()
        vjp = torch.func.vjp(lambda z: _state_rows(ref, state, ref.step(s, z)), x)[1]
        cols = [vjp(u[..., i])[0].detach() for i in range(u.shape[-1])]
    return torch.stack(cols, -1)


class Comparison(NamedTuple):
    """What :func:`compare_jacobians` returns."""

    abs_error: Tensor
    """``(B, T)`` float64 (CPU): ``max |J_t - J_fd|`` per step."""
    rel_error: Tensor
    """``(B, T)``: ``max |J_t - J_fd| / max |J_fd|``."""
    worst_ratio: float
    """The largest ``|J - J_fd| / (atol + rtol |J_fd|)``: the check passes when it is at most 1."""
    worst: tuple[int, int, int, int]
    """``(batch, t, row, column)`` of that entry (t from 1; columns of ``[J v, (u^T J)^T]`` when directional)."""
    columns_are_units: bool
    """Whether the columns are unit vectors (the full check) rather than random directions."""


def _check_finite(got: Tensor, b: int, t0: int) -> None:
    if not bool(torch.isfinite(got).all()):
        bad = int(torch.nonzero(~torch.isfinite(got.reshape(b, got.shape[0] // b, -1)).any(-1).any(0))[0, 0])
        raise NonFiniteError(f"the Jacobian under test is NaN/Inf at step t={t0 + bad + 1}")


def _full_pair(lin, ref, state: str, s: Tensor, x: Tensor, ref_dtype, eps: float, b: int, t0: int):
    """``(J, J_fd)``, every column, ``(N, D, D)`` in ``ref_dtype``."""
    got = lin.materialize(state)
    _check_finite(got, b, t0)
    n, d = got.shape[0], got.shape[-1]
    eye = torch.eye(d, dtype=ref_dtype, device=s.device).expand(n, d, d)
    return got.to(ref_dtype), fd_columns(ref, state, s.to(ref_dtype), x.to(ref_dtype), eye, eps)


def _input_full_pair(got: Tensor, ref, state: str, s: Tensor, x: Tensor, ref_dtype, eps: float, b: int, t0: int):
    """``(B, B_fd)`` for the input Jacobians ``got (N, D, I)`` under test, every column, in ``ref_dtype``."""
    _check_finite(got, b, t0)
    n, i = got.shape[0], got.shape[-1]
    eye = torch.eye(i, dtype=ref_dtype, device=s.device).expand(n, i, i)
    return got.to(ref_dtype), fd_input_columns(ref, state, s.to(ref_dtype), x.to(ref_dtype), eye, eps)


def _input_directional_pair(got: Tensor, ref, state: str, s: Tensor, x: Tensor, ref_dtype, eps: float, k: int, gen):
    """``([B v; B^T u], [B_fd v; (B^T u) by reverse mode])`` for k random unit ``v (I)`` and ``u (D)``, stacked along
    the rows: ``(N, D + I, k)``."""
    n, d, i = got.shape
    v = torch.randn(n, i, k, generator=gen, dtype=ref_dtype).to(s.device)
    u = torch.randn(n, d, k, generator=gen, dtype=ref_dtype).to(s.device)
    v, u = v / v.norm(dim=1, keepdim=True), u / u.norm(dim=1, keepdim=True)
    s64, x64, got = s.to(ref_dtype), x.to(ref_dtype), got.to(ref_dtype)
    want_v = fd_input_columns(ref, state, s64, x64, v, eps)
    want_u = reverse_mode_input_columns(ref, state, s64, x64, u)
    return torch.cat([got @ v, got.mT @ u], -2), torch.cat([want_v, want_u], -2)


def _directional_pair(lin, ref, state: str, s: Tensor, x: Tensor, ref_dtype, eps: float, d: int, k: int, generator):
    """``([J v, J^T u], [J_fd v, (J^T u) by reverse mode])`` for k random unit ``v`` and ``u``: ``(N, D, 2k)``."""
    n = s.shape[0]
    v = torch.randn(n, d, k, generator=generator, dtype=ref_dtype).to(s.device)
    u = torch.randn(n, d, k, generator=generator, dtype=ref_dtype).to(s.device)
    v, u = v / v.norm(dim=1, keepdim=True), u / u.norm(dim=1, keepdim=True)
    s64, x64 = s.to(ref_dtype), x.to(ref_dtype)
    jv = lin.apply(v.to(s.dtype), state).to(ref_dtype)
    jv_fd = fd_columns(ref, state, s64, x64, v, eps)
    utj = lin.apply_transpose(u.to(s.dtype), state).to(ref_dtype)
    utj_ref = reverse_mode_columns(ref, state, s64, x64, u)
    return torch.cat([jv, utj], -1), torch.cat([jv_fd, utj_ref], -1)


def compare_jacobians(
    problem: Problem,
    states: Tensor,
    ref,
    ref_dtype: torch.dtype,
    *,
    eps: float,
    rtol: float,
    atol: float,
    directions: int | None = None,
    generator=None,
    wrt: str = "state",
) -> Comparison:
    """Compare the Jacobians of ``problem.method`` with finite differences of the reference system ``ref``.

    ``states`` are the recorded ``(B, T+1, D)``; ``ref`` (a float64 copy of ``problem.dyn``, or the system itself
    where it cannot be converted) steps in ``ref_dtype``. ``directions=None`` compares every column, ``k`` compares
    ``J v`` with finite differences and ``u^T J`` with reverse-mode autograd along k random unit vectors each
    (drawn from ``generator``). Runs one bounded time chunk at a time, without gradient. ``wrt="inputs"`` checks the
    input Jacobians ``B_t = ds_t/dx_t`` (:func:`rnnjac._input_jacobians.step_input_jacobians`) instead: ``(D, I)``
    blocks, or ``[B v; B^T u]`` stacked along the rows ``(D + I, k)`` when directional.

    Examples
    --------
    >>> from rnnjac._checks import prepare
    >>> problem = prepare(torch.nn.GRU(2, 3, batch_first=True).double(), torch.randn(2, 5, 2, dtype=torch.float64))
    >>> states = problem.dyn.run(problem.s0, problem.xs)
    >>> c = compare_jacobians(problem, states, problem.dyn, torch.float64, eps=6e-6, rtol=1e-6, atol=1e-8)
    >>> c.abs_error.shape, c.worst_ratio <= 1.0
    (torch.Size([2, 5]), True)
    """
    dyn, state = problem.dyn, problem.state
    b, steps, d = problem.batch, problem.steps, dyn.size(state)
    inputs = wrt == "inputs"
    width = (problem.xs.shape[-1] if inputs else d) if directions is None else 2 * directions
    n_t = time_chunk_for(b, max(d, width), steps, 2**22)
    abs_err = torch.empty(b, steps, dtype=torch.float64)
    rel_err = torch.empty(b, steps, dtype=torch.float64)
    worst_ratio, worst = -1.0, (0, 0, 0, 0)
    with torch.no_grad():
        for t0 in range(0, steps, n_t):
            t1 = min(steps, t0 + n_t)
            n = b * (t1 - t0)
            s = states[:, t0:t1].reshape(n, -1)
            x = problem.xs[:, t0:t1].reshape(n, -1)
            lin = dyn.linearize(s, x, problem.method)
            if inputs:
                got = step_input_jacobians(dyn, lin, state)
                if directions is None:
                    got, want = _input_full_pair(got, ref, state, s, x, ref_dtype, eps, b, t0)
                else:
                    got, want = _input_directional_pair(got, ref, state, s, x, ref_dtype, eps, directions, generator)
            elif directions is None:
                got, want = _full_pair(lin, ref, state, s, x, ref_dtype, eps, b, t0)
            else:
                got, want = _directional_pair(lin, ref, state, s, x, ref_dtype, eps, d, directions, generator)
            diff = (got - want).abs()
            excess = diff / (atol + rtol * want.abs())
            excess = torch.where(torch.isnan(excess), float("inf"), excess)  # a NaN entry fails the check
            abs_err[:, t0:t1] = diff.amax((-2, -1)).reshape(b, t1 - t0).cpu()
            scale = want.abs().amax((-2, -1)).clamp_min(torch.finfo(ref_dtype).tiny)
            rel_err[:, t0:t1] = (diff.amax((-2, -1)) / scale).reshape(b, t1 - t0).cpu()
            top = float(excess.max())
            if top > worst_ratio:
                flat = int(excess.reshape(-1).argmax())
                i_n, rem = divmod(flat, excess.shape[-2] * excess.shape[-1])
                row, col = divmod(rem, excess.shape[-1])
                worst_ratio, worst = top, (i_n // (t1 - t0), t0 + i_n % (t1 - t0) + 1, row, col)
    return Comparison(abs_err, rel_err, worst_ratio, worst, directions is None)
