r"""The elementwise passes of the built-in cells' linearisations, as plain functions of tensors, and their optional
``torch.compile`` versions (the ``compile=True`` option of the penalties); the LSTM cell-state recurrence as a scan.

Every function here is elementwise over ``(N, H)`` blocks (plus a per-row ``(H, K, K)`` Gram matrix that broadcasts
over ``N``): eager PyTorch runs each operator as one pass over memory, while ``torch.compile`` (Inductor) fuses a
whole function, forward and backward, into a few loops. The formulas are those of :mod:`rnnjac._cells` (GRU: Cho
et al. 2014; LSTM: Hochreiter & Schmidhuber 1997 with the forget gate of Gers et al. 2000, PyTorch's gate order).

Compiling costs time once per function and input layout (tens of seconds on a CPU, where Inductor builds C++; the
first call pays it, later calls with new sizes may recompile once with dynamic shapes), and the compiled graphs are
differentiable once only (no double backward). :func:`elementwise` falls back to the eager function, with one
:class:`~rnnjac.errors.RnnjacWarning` per process, where ``torch.compile`` is missing or fails.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import RnnjacWarning

__all__ = [
    "elementwise",
    "gru_coefs",
    "gru_gate_coefs",
    "lstm_coefs",
    "quadratic_rows",
    "lstm_rows",
    "linear_recurrence",
]


def gru_coefs(gi: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    """``(z, a_z, a_n, a_hn, a_r)`` of a GRU step from its pre-activations ``gi, gh (N, 3H)`` and state ``h (N, H)``
    (the coefficients of ``dh'``, :mod:`rnnjac._cells`).

    Examples
    --------
    >>> z, a_z, a_n, a_hn, a_r = gru_coefs(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 1))
    >>> z.item(), a_z.item(), a_n.item()
    (0.5, 0.25, 0.5)
    """
    gi_r, gi_z, gi_n = gi.chunk(3, -1)
    gh_r, gh_z, gh_n = gh.chunk(3, -1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    a_n = (1 - z) * (1 - n * n)
    return z, (h - n) * z * (1 - z), a_n, a_n * r, a_n * gh_n * r * (1 - r)


def gru_gate_coefs(r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    """:func:`gru_coefs` from the activated gates ``r, z, n`` and ``gh_n = W_hn h + b_hn`` the forward kept
    (:func:`rnnjac._recurrence.gru_layer`): no pre-activation to recompute.

    Examples
    --------
    >>> half, zero, one = torch.full((1, 1), 0.5), torch.zeros(1, 1), torch.ones(1, 1)
    >>> [t.item() for t in gru_gate_coefs(half, half, zero, zero, one)]
    [0.5, 0.25, 0.5, 0.25, 0.0]
    """
    a_n = (1 - z) * (1 - n * n)
    return z, (h - n) * z * (1 - z), a_n, a_n * r, a_n * gh_n * r * (1 - r)


def lstm_coefs(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, c_new: Tensor) -> tuple[Tensor, ...]:
    """``(s_i, s_f, s_g, f, s_o, s_m)`` of an LSTM step from its activated gates, cell state ``c`` and next cell
    state ``c_new`` (all ``(N, H)``; the coefficients of ``dc'`` and ``dm``, :mod:`rnnjac._cells`).

    Examples
    --------
    >>> half, zero = torch.full((1, 1), 0.5), torch.zeros(1, 1)
    >>> [t.item() for t in lstm_coefs(half, half, zero, half, zero, zero)]
    [0.0, 0.0, 0.5, 0.5, 0.0, 0.5]
    """
    tc = torch.tanh(c_new)
    return g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), f, tc * o * (1 - o), o * (1 - tc * tc)


def quadratic_rows(xs: list[Tensor], gram: Tensor) -> Tensor:
    """``sum_{k,m} x_k G[:, k, m] x_m`` per element ``(N, H)``, as plain operators (autograd derives the backward;
    the eager default is :func:`rnnjac._cells.row_quadratic`'s hand-written one).

    Examples
    --------
    >>> quadratic_rows([torch.ones(1, 2), 2 * torch.ones(1, 2)], torch.eye(2).expand(2, 2, 2)).tolist()
    [[5.0, 5.0]]
    """
    out = None
    for k, x_k in enumerate(xs):
        acc = None
        for m, x_m in enumerate(xs):
            term = gram[:, k, m] * x_m
            acc = term if acc is None else acc + term
        out = x_k * acc if out is None else out + x_k * acc
    return out


def gru_rows(a_r: Tensor, a_z: Tensor, a_hn: Tensor, z: Tensor, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(N,)`` of one GRU layer from its coefficients and the bordered row Gram ``(H, 4, 4)``
    (:meth:`rnnjac._cells.GRUArch.frobenius_sq`)."""
    return quadratic_rows([a_r, a_z, a_hn, z], gram).sum(-1)


def lstm_rows(s_i, s_f, s_g, f, s_o, s_m, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(N,)`` of one LSTM layer without projection from its coefficients and the row Gram
    ``(H, 4, 4)`` of ``W_hh``'s gate blocks (:meth:`rnnjac._cells.LSTMArch.frobenius_sq`)."""
    quad = quadratic_rows([s_i, s_f, s_g], gram[:, :3, :3]) + f * f
    lin_o = s_i * gram[:, 0, 3] + s_f * gram[:, 1, 3] + s_g * gram[:, 2, 3]
    return ((1 + s_m * s_m) * quad + s_o * (2 * s_m * lin_o + s_o * gram[:, 3, 3])).sum(-1)


def _cell_update(f: Tensor, c: Tensor, ig: Tensor) -> Tensor:
    """The LSTM cell-state update ``c' = f c + i g``, with ``ig = i * g`` already formed."""
    return f * c + ig


def linear_recurrence(f: Tensor, u: Tensor, c0: Tensor, block: int | None = None) -> Tensor:
    """``c_0..c_T`` ``(B, T+1, H)`` of ``c_t = f_t c_{t-1} + u_t`` (:func:`_cell_update`) for ``f, u (B, T, H)``.

    ``block=1`` runs the ``T`` updates in order. A larger block (default ``~sqrt(T)`` on a GPU, where the
    loop is bound by kernel launches; 1 on the CPU, where it measured faster) is a blocked scan: the steps
    are cut into blocks of ``L``, every block runs the update from zero together with the running product
    of its ``f`` (``L`` steps, all blocks at once), the carries between blocks run in order (``T / L``
    steps), and each block adds its carry times that product: about ``2 sqrt(T)`` kernels instead of ``T``.
    Only products of the ``f`` themselves are formed (no division, no logarithm), so it is as safe as the
    loop for forget gates at 0 or 1.

    Examples
    --------
    >>> f, u = torch.full((1, 5, 1), 0.5), torch.ones(1, 5, 1)
    >>> linear_recurrence(f, u, torch.zeros(1, 1), block=2).flatten().tolist()
    [0.0, 1.0, 1.5, 1.75, 1.875, 1.9375]
    """
    b, steps, hid = f.shape
    size = block or (max(1, math.isqrt(steps)) if f.is_cuda else 1)
    if size == 1:
        cs, c = [c0], c0
        for f_t, u_t in zip(f.unbind(1), u.unbind(1), strict=True):  # unbind: one backward op, not T selects
            c = _cell_update(f_t, c, u_t)
            cs.append(c)
        return torch.stack(cs, 1)
    n = -(-steps // size)
    if n * size > steps:  # pad with f = 1, u = 0 (the state carried unchanged)
        f = torch.cat([f, f.new_ones(b, n * size - steps, hid)], 1)
        u = torch.cat([u, u.new_zeros(b, n * size - steps, hid)], 1)
    fb, ub = f.reshape(b, n, size, hid).unbind(2), u.reshape(b, n, size, hid).unbind(2)
    loc, prod = [ub[0]], [fb[0]]  # per block: the states from a zero start, the products of f
    for f_j, u_j in zip(fb[1:], ub[1:], strict=True):
        loc.append(_cell_update(f_j, loc[-1], u_j))
        prod.append(prod[-1] * f_j)
    carries, c = [c0], c0
    for k in range(n - 1):
        c = _cell_update(prod[-1][:, k], c, loc[-1][:, k])
        carries.append(c)
    carry = torch.stack(carries, 1)
    cs = torch.stack([torch.addcmul(lj, pj, carry) for lj, pj in zip(loc, prod, strict=True)], 2)
    return torch.cat([c0.unsqueeze(1), cs.reshape(b, n * size, hid)[:, :steps]], 1)


_COMPILED: dict[Callable, Callable] = {}
_FAILED: dict[Callable, str] = {}


def _fallback(fn: Callable, err: BaseException) -> Callable:
    """Record that ``fn`` runs eagerly from now on; warn the first time only (one warning per process)."""
    first = not _FAILED
    _FAILED[fn] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if first:
        warnings.warn(
            f"compile=True: torch.compile could not compile {fn.__name__} ({_FAILED[fn]}); the elementwise passes "
            "that do not compile run eagerly (same values, no fusion) from now on",
            RnnjacWarning,
            stacklevel=4,
        )
    return fn


def elementwise(fn: Callable, compile: bool) -> Callable:  # noqa: A002  (the public keyword's name)
    """``fn`` itself (``compile=False``), or its ``torch.compile`` version that falls back to ``fn``, with one
    warning, where compiling is not possible (no ``torch.compile``, no C++ compiler, an unsupported platform or
    any error while compiling).

    Examples
    --------
    >>> elementwise(gru_coefs, False) is gru_coefs
    True
    """
    if not compile or fn in _FAILED:
        return fn
    if fn not in _COMPILED:
        try:
            compiled = torch.compile(fn, dynamic=True)
        except Exception as err:  # noqa: BLE001  (no compiler for this platform/Python: any reason falls back)
            return _fallback(fn, err)
        _COMPILED[fn] = compiled

    def run(*args):
        if fn in _FAILED:
            return fn(*args)
        try:
            return _COMPILED[fn](*args)
        except Exception as err:  # noqa: BLE001  (a compile error surfaces at the first call)
            _fallback(fn, err)
            return fn(*args)

    return run
