"""States and per-step Jacobians ``J_t = ds_t/ds_{t-1}`` over batches of trajectories.

The trajectory is run once with the transparent Python step (never the fused cuDNN sequence); every
``J_t`` depends only on the recorded ``(s_{t-1}, x_t)``, so all steps of a time chunk are linearised
in one batched call.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ._checks import Problem, check_bool, check_positive_int, check_states_finite, prepare
from ._kernels import DEFAULT_MAX_CHUNK_ELEMENTS, linearization_stream, run_states, time_chunk_for  # noqa: F401

__all__ = ["trajectory", "jacobians", "iter_jacobians"]


def trajectory(
    model, inputs, h0=None, *, state: str = "full", batch_first: bool | None = None, submodule=None
) -> Tensor:
    """States ``s_0..s_T`` of a batch of trajectories.

    Parameters
    ----------
    model : nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell, CustomCell or callable
        The recurrent model.
    inputs : Tensor
        ``(B, T, I)`` (or ``(T, B, I)`` when the module has ``batch_first=False``), or unbatched ``(T, I)``.
    h0 : Tensor or tuple, optional
        The module's own format (``(L, B, H)``, or ``(h0, c0)`` for LSTM) or a flat ``(B, D)`` state.
        Zeros by default; required for custom cells.
    state : {"full", "h"}
        ``"full"``: layer-major ``[h; c]`` per LSTM layer; ``"h"``: the h parts only.
    batch_first : bool, optional
        Overrides the module's own flag for the layout of ``inputs``.
    submodule : str or nn.Module, optional
        The recurrent core of a larger model, fed what the model feeds it (see :func:`rnnjac.spectra`).

    Returns
    -------
    Tensor
        ``(B, T+1, D)`` (``(T+1, D)`` for unbatched inputs); ``[:, 0]`` is ``s_0``.

    Examples
    --------
    >>> import torch, rnnjac
    >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    >>> rnnjac.trajectory(lstm, torch.randn(5, 7, 3)).shape
    torch.Size([5, 8, 16])
    """
    problem = prepare(model, inputs, h0, state=state, batch_first=batch_first, submodule=submodule)
    states = run_states(problem)
    if problem.state == "h":
        states = states.index_select(-1, problem.dyn.h_index(states.device))
    return states[0] if problem.unbatched else states


def _chunk_jacobians(problem: Problem, states: Tensor, t0: int, t1: int, chunk_size=None) -> Tensor:
    dyn, b = problem.dyn, problem.batch
    s_prev = states[:, t0:t1].reshape(b * (t1 - t0), -1)
    x = problem.xs[:, t0:t1].reshape(b * (t1 - t0), -1)
    lin = dyn.linearize(s_prev, x, problem.method, chunk_size=chunk_size)
    j = lin.materialize(problem.state)
    return j.reshape(b, t1 - t0, j.shape[-2], j.shape[-1])


def iter_jacobians(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    chunk_size: int | None = None,
    time_chunk: int | None = None,
    differentiable: bool = False,
    submodule=None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(t_start, J_chunk)`` over chunks of time, so long sequences stay in bounded memory.

    ``J_chunk`` has shape ``(B, n, D, D)`` and holds ``J_t`` for ``t = t_start + 1 .. t_start + n``
    (``t_start`` is the 0-based offset into the time axis of :func:`jacobians`' output). Arguments
    are those of :func:`jacobians` (``submodule``: see :func:`rnnjac.spectra`); ``time_chunk`` fixes ``n``
    (default: about 256 MB per chunk).
    The arguments are checked before the first chunk; the trajectory is run chunk by chunk as the
    chunks are taken, so a NaN/Inf state is reported when its chunk is reached.

    Memory is bounded in T, ``O(B n D^2 + B D)``: by default the chunks carry no autograd graph. With
    ``differentiable=True`` (and grad mode on) each chunk stays differentiable with respect to the
    weights, ``inputs`` and ``h0`` through the whole trajectory, which keeps the autograd graph of every
    step so far (memory then grows with T; :func:`jacobians` does the same in one call).

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(2, 8, batch_first=True)
    >>> [(t0, J.shape[1]) for t0, J in rnnjac.iter_jacobians(gru, torch.randn(3, 10, 2), time_chunk=4)]
    [(0, 4), (4, 4), (8, 2)]
    """
    check_positive_int("time_chunk", time_chunk, allow_none=True)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    check_bool("differentiable", differentiable)
    problem = prepare(model, inputs, h0, state=state, method=method, batch_first=batch_first, submodule=submodule)
    return _iter(problem, chunk_size, time_chunk, differentiable=differentiable and torch.is_grad_enabled())


def _iter(problem: Problem, chunk_size, time_chunk, *, differentiable: bool):
    """The chunks of :func:`iter_jacobians`, from :func:`rnnjac._kernels.linearization_stream`: each chunk is run
    and linearised in ``differentiable`` grad mode, and its states are checked before its Jacobians are formed."""
    steps, b = problem.steps, problem.batch
    n = time_chunk or time_chunk_for(b, problem.dyn.size(problem.state), steps)
    stream = linearization_stream(problem, n, chunk_size=chunk_size)
    while True:
        with torch.set_grad_enabled(differentiable):
            chunk = next(stream, None)
            if chunk is None:
                return
            check_states_finite(chunk.states, offset=chunk.t0)
            j = chunk.lin.materialize(problem.state)
        t0, j = chunk.t0, j.reshape(b, chunk.states.shape[1] - 1, j.shape[-2], j.shape[-1])
        del chunk
        yield t0, (j[0] if problem.unbatched else j)


def jacobians(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    chunk_size: int | None = None,
    submodule=None,
) -> Tensor:
    """Per-step hidden-to-hidden Jacobians ``J_t = ds_t/ds_{t-1}`` for ``t = 1..T``.

    Parameters
    ----------
    model, inputs, h0, state, batch_first, submodule
        As in :func:`trajectory`.
    method : {"auto", "analytic", "autograd"}
        ``"analytic"``: closed forms (built-in cells, or a ``CustomCell``'s own ``jacobian``);
        ``"autograd"``: ``torch.func.vmap(jacrev(step))`` over the transparent Python step;
        ``"auto"``: analytic where it exists.
    chunk_size : int, optional
        Passed to ``torch.func.jacrev`` (autograd method) to bound its memory.

    Returns
    -------
    Tensor
        ``(B, T, D, D)`` (``(T, D, D)`` for unbatched inputs); rows are outputs, columns inputs.
        Differentiable with respect to the model's parameters when grad mode is on.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(3, 5, batch_first=True)
    >>> J = rnnjac.jacobians(rnn, torch.randn(2, 4, 3))
    >>> J.shape
    torch.Size([2, 4, 5, 5])
    """
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    problem = prepare(model, inputs, h0, state=state, method=method, batch_first=batch_first, submodule=submodule)
    states = run_states(problem)
    j = _chunk_jacobians(problem, states, 0, problem.steps, chunk_size)
    return j[0] if problem.unbatched else j
