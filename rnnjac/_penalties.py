"""Per-step penalty values of :mod:`rnnjac.regularizers` (private): the Frobenius, spectral and end-to-end
estimates over a batch of recorded states, differentiable with respect to the model's weights."""

from __future__ import annotations

import torch
from torch import Tensor

from ._elementwise import elementwise
from ._linearization import FactoredLinearization
from .errors import NonFiniteError

_CHUNK_ELEMENTS = 2**24


def _time_index(steps: int, stride: int) -> Tensor:
    return torch.arange(0, steps, stride)


def _as_slice(t_idx: Tensor) -> slice | None:
    """``t_idx`` (an arithmetic progression of steps, as the penalties build them) as a slice, else None."""
    if len(t_idx) == 0:
        return None
    start, step = int(t_idx[0]), int(t_idx[1] - t_idx[0]) if len(t_idx) > 1 else 1
    if step < 1 or not torch.equal(t_idx, torch.arange(start, start + step * len(t_idx), step)):
        return None
    return slice(start, start + step * (len(t_idx) - 1) + 1, step)


def _linearize(problem, states: Tensor, t_idx: Tensor, gates=None, compile=False):  # noqa: A002
    """``J_t`` at the steps ``t_idx`` of ``states``: for built-in modules from the recorded trajectory itself
    (``System.linearize_states``, reusing the next states and the forward's ``gates``), else ``System.linearize``
    at the gathered ``(s_{t-1}, x_t)``."""
    steps = _as_slice(t_idx)
    if problem.method == "analytic" and steps is not None and hasattr(problem.dyn, "linearize_states"):
        return problem.dyn.linearize_states(states, problem.xs, steps, gates, compile=compile)
    b = problem.batch
    s_prev = states[:, :-1][:, t_idx].reshape(b * len(t_idx), -1)
    x = problem.xs[:, t_idx].reshape(b * len(t_idx), -1)
    return problem.dyn.linearize(s_prev, x, problem.method)


def _frobenius_from_gates(problem, states: Tensor, t_idx: Tensor, gates, compile=False) -> Tensor | None:  # noqa: A002
    """``||J_t||_F^2`` ``(B, len(t_idx))`` of a single built-in layer straight from its forward's gates
    (``BuiltinSystem.frobenius_from_gates``), or None where that does not apply."""
    steps = _as_slice(t_idx)
    if steps is None or not hasattr(problem.dyn, "frobenius_from_gates"):
        return None
    return problem.dyn.frobenius_from_gates(states, steps, gates, problem.state, compile)


def _sphere(shape, generator, like: Tensor) -> Tensor:
    """Independent random unit columns ``(N, D, r)``, each uniform on the sphere: drawn where ``like`` lives
    (torch's global random state, or a ``generator`` on that device), or, with a generator on another device (a
    CPU generator for a CUDA model), drawn there in float64 so that a seed gives the same vectors on every device
    (slower: the draw is copied over)."""
    if generator is None or generator.device == like.device:
        u = torch.randn(*shape, generator=generator, dtype=like.dtype, device=like.device)
    else:
        u = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
    return u / u.norm(dim=-2, keepdim=True)


def _unit(w: Tensor) -> Tensor:
    return w / w.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _power_directions(lin, v: Tensor, state: str, n_iter: int, dtype: torch.dtype | None) -> Tensor:
    """``n_iter`` power iterations ``v <- J^T J v / ||J^T J v||`` on the unit columns ``v (N, D, 1)`` (closed-form
    ``J^T`` for built-in cells: two GEMMs per layer and iteration), in ``dtype`` where given (the direction only);
    one function, so that ``torch.compile`` fuses the elementwise work of all iterations around the GEMMs."""
    if dtype is not None:
        lin, v = lin.to(dtype), v.to(dtype)
    for _ in range(n_iter):
        v = _unit(lin.apply_transpose(lin.apply(v, state), state))
    return v


def _squared_image(lin, v: Tensor, state: str) -> Tensor:
    """``||J v||^2`` ``(N,)`` for the unit columns ``v (N, D, 1)``: the spectral penalty's value (its gradient
    through ``J``; ``v`` carries none)."""
    return lin.apply(v, state).pow(2).sum((-2, -1))


def fused(fn, lin, state: str, compile: bool):  # noqa: A002
    """``fn`` (a function of a whole linearisation ``lin``), compiled with ``compile=True`` for a built-in module's
    linearisation (custom cells stay eager): one compiled copy per structure (cell, layer sizes, projections,
    ``state``), with static shapes (a new number of points compiles again; see
    :func:`rnnjac._elementwise.elementwise` for why not symbolic ones)."""
    if not (compile and isinstance(lin, FactoredLinearization)):
        return fn
    parts = tuple(tuple(layer) for layer in lin.layout.parts)
    key = (lin.cell.name, parts, tuple(p.w_hr is not None for p in lin.layers), state)
    return elementwise(fn, True, key=key)


def _tangent(lin, q: Tensor, state: str) -> Tensor:
    """``J q`` (``lin.apply``) as a plain function, for ``torch.compile`` (one step of the Lyapunov and end-to-end
    penalties)."""
    return lin.apply(q, state)


def _cotangent(lin, u: Tensor, state: str) -> Tensor:
    """``J^T u`` (``lin.apply_transpose``), as :func:`_tangent`."""
    return lin.apply_transpose(u, state)


def tangent_map(lin, state: str, compile: bool, *, transpose: bool = False):  # noqa: A002
    """``q -> J q`` (``transpose``: ``u -> J^T u``) for one step's linearisation ``lin``: with ``compile=True`` and
    a built-in module's linearisation one compiled function (its elementwise work fused around the GEMMs, forward
    and backward)."""
    fn = fused(_cotangent if transpose else _tangent, lin, state, compile)
    return lambda q: fn(lin, q, state)


def _squared_coimage(lin, u: Tensor, state: str) -> Tensor:
    """The mean of ``||J^T u||^2`` ``(N,)`` over the unit columns ``u (N, D, r)``: the projection estimate of
    ``||J||_F^2`` up to the factor ``D``."""
    return lin.apply_transpose(u, state).pow(2).sum(-2).mean(-1)


def _per_step(
    problem,
    states,
    kind,
    estimator,
    n_proj,
    n_iter,
    t_idx,
    generator,
    gates=None,
    compile=False,  # noqa: A002
    power_dtype=None,
) -> Tensor:
    """Per-step values ``(B, len(t_idx))`` of ``||J||_F^2`` or ``sigma_max^2`` (``power_dtype``: the dtype of the
    spectral power iterations, None for the states' own)."""
    b, d, state = problem.batch, problem.dyn.size(problem.state), problem.state
    closed = problem.method == "analytic" and problem.dyn.frobenius_closed_form(state)
    stacked = problem.method == "analytic" and problem.dyn.frobenius_closed_form(state, stacked=True)
    if kind == "frobenius" and estimator == "exact" and closed:  # chunks of its own, or one compiled kernel
        val = _frobenius_from_gates(problem, states, t_idx, gates, compile)
        if val is not None:
            return val
    if kind == "frobenius" and estimator == "exact":
        # row form: O(H K) per step; a stack's cross blocks: (H, H) matrices; otherwise J is materialised
        width = 4 if closed else (max(4, d // 4) if stacked else d)
    else:  # J Q with narrow Q: the coefficients (~4 D per point) and each of the r vectors' products (~4 D each)
        width = 4 * (1 + (n_proj if kind == "frobenius" else 1)) if problem.method == "analytic" else d
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * d * width))
    out = []
    for c0 in range(0, len(t_idx), per_chunk):
        idx = t_idx[c0 : c0 + per_chunk]
        lin = _linearize(problem, states, idx, gates, compile)
        n = lin.s.shape[0]
        if kind == "frobenius" and estimator == "exact":
            val = lin.frobenius_sq(state)
        elif kind == "frobenius":
            u = _sphere((n, d, n_proj), generator, states)
            val = d * fused(_squared_coimage, lin, state, compile)(lin, u, state)
        else:  # spectral
            v = _sphere((n, d, 1), generator, states)
            rounded = power_dtype if power_dtype is not None and power_dtype != states.dtype else None
            with torch.no_grad():  # the direction only: no gradient
                v = fused(_power_directions, lin, state, compile)(lin.detached(), v, state, n_iter, rounded)
                if rounded is not None:  # a unit vector in the states' dtype: ||J v||^2 stays a Rayleigh quotient
                    v = _unit(v.to(states.dtype))
            val = fused(_squared_image, lin, state, compile)(lin, v, state)
        out.append(val.reshape(b, len(idx)))
    return torch.cat(out, 1)


def _end_to_end(problem, states, estimator, n_proj, generator, gates=None, compile=False) -> Tensor:  # noqa: A002
    b, steps, d, state = problem.batch, problem.steps, problem.dyn.size(problem.state), problem.state
    per_step = _linearize(problem, states, torch.arange(steps), gates, compile).unbind(steps)
    if estimator == "exact":
        p = torch.eye(d, dtype=states.dtype, device=states.device).expand(b, d, d)
        for lin_t in per_step:
            p = tangent_map(lin_t, state, compile)(p)
        return p.pow(2).sum((-2, -1))
    w = _sphere((b, d, n_proj), generator, states)
    for lin_t in reversed(per_step):
        w = tangent_map(lin_t, state, compile, transpose=True)(w)  # u^T J_T ... J_1, one step back at a time
    return d * w.pow(2).sum(-2).mean(-1)


def _raise_nonfinite(values: Tensor, t_idx: Tensor | None, what: str) -> None:
    v = values.detach()
    if bool(torch.isfinite(v).all()):
        return
    if t_idx is None or v.dim() < 2:
        raise NonFiniteError(f"the {what} penalty is NaN/Inf")
    bad = int(torch.nonzero(~torch.isfinite(v).all(0))[0, 0])
    raise NonFiniteError(f"the {what} penalty is NaN/Inf at step t={int(t_idx[bad]) + 1}")
