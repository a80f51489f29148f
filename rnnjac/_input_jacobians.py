r"""Input Jacobians ``B_t = ds_t/dx_t`` and the lagged sensitivities ``ds_t/dx_{t-tau}`` (tensor core).

Tensors in, tensors out; the labelled layer is :mod:`rnnjac._sensitivity`.

- :func:`step_input_jacobians`: ``B`` at a batch of linearisation points. Built-in layers use the closed form
  from their factored linearisation: layer ``l``'s rows over ``x_t`` are ``dF_l/dx_l @ dh_{l-1,t}/dx_t``
  (``dF_l/dx_l`` is the layer's ``cell.tangent`` with an identity input tangent, ``diag(.) W_ih``-shaped),
  so the stack is one chain of small GEMMs from the bottom layer up. Everything else (custom cells,
  ``method="autograd"``) is ``torch.func.vmap(torch.func.jacrev(step, argnums=1))``.
- :func:`input_jacobian_stream`: the trajectory run and linearised one time chunk at a time
  (:func:`rnnjac._kernels.linearization_stream`), with each chunk's ``B_t``.
- :func:`sensitivity_tensors`: ``G_{t,tau} = J_t ... J_{t-tau+1} B_{t-tau}`` for ``tau = 0..L``: a window of
  the ``L + 1`` blocks ``(D, I)`` ending at ``t`` is pushed through ``J_t`` as one tangent block of width
  ``L I`` (``Linearization.apply``: the factored ``J Q``, no ``D x D`` product is formed), then the new
  ``B_t`` enters at lag 0 and the oldest block leaves. Each block is kept as ``exp(log_scale) M`` with
  ``||M||_F = 1`` (renormalised every step), so norms and singular values are exact in log scale over any lag
  (the singular values of ``M`` below ``u * sigma_1(M)``, ``u`` the unit round-off, are not resolved).

The sensitivity of the state to past inputs is the quantity behind the "memory" curves of trained RNNs
(e.g. Jaeger 2002, "Short term memory in echo state networks"; Ganguli, Huh & Sompolinsky 2008, "Memory
traces in dynamical systems", PNAS 105:18970); its decay rate at long lags is the top Lyapunov exponent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ._cells import EYE
from ._checks import Problem, check_states_finite
from ._kernels import linearization_stream
from ._linearization import FactoredLinearization, Linearization, grad_region, normal
from ._system import System, autograd_jacobian

__all__ = [
    "InputChunk",
    "factored_input_jacobians",
    "input_jacobian_stream",
    "readout_jacobians",
    "sensitivity_tensors",
    "step_input_jacobians",
]


def factored_input_jacobians(lin: FactoredLinearization) -> Tensor:
    """``B = dF/dx`` ``(N, D, I)`` (full state rows) of a stack of built-in layers, from its coefficients.

    Examples
    --------
    >>> from rnnjac._dynamics import as_dynamics
    >>> rnn = torch.nn.RNN(2, 3, bias=False)
    >>> lin = as_dynamics(rnn).linearize(torch.zeros(1, 3), torch.zeros(1, 2))
    >>> bool(torch.equal(factored_input_jacobians(lin)[0], rnn.weight_ih_l0))  # tanh'(0) = 1
    True
    """
    blocks, below = [], EYE
    for p, coef in zip(lin.layers, lin.coefs, strict=True):
        out_h, out_c = lin.cell.tangent(p, coef, below, None, None)
        out_h = out_h.expand(lin.s.shape[0], *out_h.shape[-2:])  # (a weight itself when it is all there is)
        blocks.append(out_h)
        if out_c is not None:
            blocks.append(out_c)
        below = out_h
    return torch.cat(blocks, -2)


def step_input_jacobians(dyn: System, lin: Linearization, state: str = "full", chunk_size=None) -> Tensor:
    """``B = ds'/dx`` ``(N, D, I)`` at the points of ``lin`` (closed form when ``lin`` is factored, else
    torch.func on ``dyn.step``); ``state="h"`` keeps the h rows (README, "Conventions": "State vector").

    Examples
    --------
    >>> from rnnjac._dynamics import as_dynamics
    >>> dyn = as_dynamics(torch.nn.GRU(2, 3, num_layers=2))
    >>> s, x = torch.randn(4, 6), torch.randn(4, 2)
    >>> a, b = (step_input_jacobians(dyn, dyn.linearize(s, x, m)) for m in ("analytic", "autograd"))
    >>> a.shape, bool(torch.allclose(a, b, atol=1e-6))
    (torch.Size([4, 6, 2]), True)
    """
    if isinstance(lin, FactoredLinearization):
        jac = factored_input_jacobians(lin)
    else:
        jac = autograd_jacobian(dyn, lin.s, lin.x, chunk_size, wrt="inputs")
    return jac if state == "full" else jac.index_select(-2, dyn.h_index(jac.device))


class InputChunk(NamedTuple):
    """One time chunk of :func:`input_jacobian_stream`: steps ``t0 + 1 .. t0 + n``."""

    t0: int
    lin: Linearization
    """``J_t`` at the chunk's ``B * n`` points, batch-major."""
    b: Tensor
    """``(B, n, D, I)``: ``B_t`` (rows of ``state``)."""
    states: Tensor
    """``(B, n + 1, D)``: ``s_{t0} .. s_{t0 + n}`` (full state)."""


def input_jacobian_stream(
    problem: Problem, time_chunk: int, *, state: str | None = None, chunk_size=None
) -> Iterator[InputChunk]:
    """The trajectory run ``time_chunk`` steps at a time, each chunk's states checked finite, with its ``B_t``.

    Runs in the caller's grad mode at each ``next()``; ``state`` defaults to ``problem.state``.
    """
    state = problem.state if state is None else state
    b = problem.batch
    for chunk in linearization_stream(problem, time_chunk, chunk_size=chunk_size):
        check_states_finite(chunk.states, offset=chunk.t0)
        jac = step_input_jacobians(problem.dyn, chunk.lin, state, chunk_size)
        n = chunk.states.shape[1] - 1
        yield InputChunk(chunk.t0, chunk.lin, jac.reshape(b, n, *jac.shape[1:]), chunk.states)


def readout_jacobians(readout: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
    """``dy/dh`` ``(N, O, H)`` of ``readout`` (``(n, H) -> (n, O)``) at each row of ``h (N, H)``, without graph.

    Examples
    --------
    >>> lin = torch.nn.Linear(3, 2)
    >>> bool(torch.equal(readout_jacobians(lin, torch.randn(5, 3))[0], lin.weight))
    True
    """
    from torch.func import jacrev, vmap

    with grad_region():
        jac = vmap(jacrev(lambda hi: readout(hi.unsqueeze(0)).squeeze(0)))(normal(h).detach())
    return jac.detach()


def _normalised(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(M / ||M||_F, log ||M||_F)`` over the last two dims (a zero block stays zero, with log scale -inf)."""
    norms = torch.linalg.matrix_norm(m)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return m / safe[..., None, None], torch.log(norms)


def _log_stats(m: Tensor, scale: Tensor, n_sv: int) -> tuple[Tensor, Tensor]:
    """``log ||.||_F`` and the top ``n_sv`` log singular values (-inf beyond the matrix's size) of
    ``exp(scale) m`` for blocks ``m (..., r, I)``."""
    log_norm = torch.log(torch.linalg.matrix_norm(m)) + scale
    sv = torch.log(torch.linalg.svdvals(m))[..., :n_sv] + scale.unsqueeze(-1)
    if sv.shape[-1] < n_sv:
        sv = torch.cat([sv, sv.new_full((*sv.shape[:-1], n_sv - sv.shape[-1]), float("-inf"))], -1)
    return log_norm, sv


def sensitivity_tensors(
    problem: Problem,
    max_lag: int,
    *,
    n_sv: int,
    readout: Callable[[Tensor], Tensor] | None = None,
    time_chunk: int = 256,
) -> dict[str, Tensor]:
    """Log norms and log singular values of ``ds_t/dx_{t-tau}`` (and ``dy_t/dx_{t-tau}`` with a ``readout`` on the
    top layer's h) for ``t = 1..T``, ``tau = 0..max_lag``; keys of :data:`rnnjac._datasets.VARIABLES`.

    Shapes ``(B, T, L + 1)`` and ``(B, T, L + 1, n_sv)``; NaN where ``t - tau < 1``. The blocks are propagated
    with the full state (the exact derivative); ``problem.state="h"`` reports their h rows. Runs without
    gradient. Arguments are checked by the caller.

    Examples
    --------
    >>> from rnnjac._checks import prepare
    >>> out = sensitivity_tensors(prepare(torch.nn.GRU(2, 4, batch_first=True), torch.randn(3, 6, 2)), 2, n_sv=2)
    >>> out["input_sensitivity_log_norm"].shape, bool(out["input_sensitivity_log_norm"][:, 0, 1:].isnan().all())
    (torch.Size([3, 6, 3]), True)
    """
    dyn, steps, lags = problem.dyn, problem.steps, max_lag + 1
    h_idx = dyn.h_index(problem.xs.device) if problem.state == "h" else None
    top = dyn.layout.top_h_index(problem.xs.device) if readout is not None else None
    out: dict[str, Tensor] = {}
    window = scale = None
    with torch.no_grad():
        for chunk in input_jacobian_stream(problem, time_chunk, state="full"):
            n = chunk.b.shape[1]
            for j, lin_t in enumerate(chunk.lin.unbind(n)):
                window, scale = _advance(lin_t, chunk.b[:, j], window, scale, lags)
                t = chunk.t0 + j  # 0-based
                sel = window if h_idx is None else window.index_select(-2, h_idx)
                values = {"input": _log_stats(sel, scale, n_sv)}
                if readout is not None:
                    r = readout_jacobians(readout, chunk.states[:, j + 1].index_select(-1, top))
                    values["output"] = _log_stats(r.unsqueeze(1) @ window.index_select(-2, top), scale, n_sv)
                for kind, (log_norm, sv) in values.items():
                    _store(out, kind, log_norm, sv, t, steps)
    return out


def _advance(lin_t: Linearization, b_t: Tensor, window, scale, lags: int) -> tuple[Tensor, Tensor]:
    """The window ``(B, L+1, D, I)`` one step on: ``[B_t, J_t G_{t-1,0}, ..., J_t G_{t-1,L-1}]``, renormalised."""
    new, new_scale = _normalised(b_t.unsqueeze(1))
    if lags == 1:
        return new, new_scale
    if window is None:
        bsz, _, d, i = new.shape
        window = new.new_zeros(bsz, lags, d, i)
        scale = new_scale.new_full((bsz, lags), float("-inf"))
    bsz, _, d, i = window.shape
    q = window[:, :-1].permute(0, 2, 1, 3).reshape(bsz, d, (lags - 1) * i)
    moved = lin_t.apply(q, "full").reshape(bsz, d, lags - 1, i).permute(0, 2, 1, 3)
    moved, grow = _normalised(moved)
    return torch.cat([new, moved], 1), torch.cat([new_scale, scale[:, :-1] + grow], 1)


def _store(out: dict, kind: str, log_norm: Tensor, sv: Tensor, t: int, steps: int) -> None:
    """Write step ``t`` (0-based) of ``kind`` ("input" or "output") into ``out``, NaN at lags beyond ``t``."""
    key_n, key_s = f"{kind}_sensitivity_log_norm", f"{kind}_sensitivity_log_singular_values"
    if key_n not in out:
        out[key_n] = log_norm.new_full((log_norm.shape[0], steps, log_norm.shape[1]), float("nan"))
        out[key_s] = sv.new_full((sv.shape[0], steps, *sv.shape[1:]), float("nan"))
    keep = min(t + 1, log_norm.shape[1])
    out[key_n][:, t, :keep] = log_norm[:, :keep]
    out[key_s][:, t, :keep] = sv[:, :keep]
