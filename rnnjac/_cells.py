r"""One recurrent layer: its step, and its closed-form linearisation.

Every built-in layer maps ``(x, h, c) -> (h', c')`` (``c`` only for LSTM) with PyTorch's gate order.
``x`` is the layer's input at this step (the network input for layer 0, ``h'`` of the layer below for
the others). Pre-activations are ``gi = W_ih x + b_ih`` and ``gh = W_hh h + b_hh``.

RNN (``phi`` = tanh or relu)::

    h' = phi(gi + gh)
    dh' = phi'(a) * (W_ih dx + W_hh dh)                      J = diag(phi'(a)) W_hh

GRU (blocks r, z, n)::

    r = sigmoid(gi_r + gh_r)   z = sigmoid(gi_z + gh_z)   n = tanh(gi_n + r * gh_n)
    h' = (1 - z) * n + z * h
    dr = r(1-r) (dgi_r + dgh_r);  dz = z(1-z) (dgi_z + dgh_z)
    dn = (1-n^2) (dgi_n + gh_n dr + r dgh_n)
    dh' = (h - n) dz + (1 - z) dn + z dh

LSTM (blocks i, f, g, o; optional projection ``W_hr`` of shape (proj_size, hidden_size))::

    c' = f c + i g      m = o tanh(c')      h' = W_hr m   (or h' = m)
    dc' = g i(1-i) dI + c f(1-f) dF + i(1-g^2) dG + f dc      (dI = dgi_i + dgh_i, ...)
    dm  = tanh(c') o(1-o) dO + o(1-tanh^2 c') dc'
    dh' = W_hr dm

Each ``tangent`` below is exactly the line ``d...`` above: it pushes a block of tangent vectors
``(N, size, k)`` through the linearised step, one shared GEMM per weight matrix, so that ``J Q`` never
materialises ``J`` (README, "Conventions": "Structure pays"). A tangent argument may be ``None`` (zero) or
:data:`EYE` (the identity), which turns ``W @ EYE`` into ``W`` itself and lets the same code materialise
``J`` at the cost of a few broadcasts.

Each ``row_form`` writes the layer's own block as, for every output row ``i``,
``row_i = diag_i e_i + sum_k a_ki W_k[i, :]`` over the h-input columns (plus a pure diagonal on the c
columns), which gives ``||J||_F^2`` from a ``(K, K)`` Gram matrix per row at O(N K^2 H) cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ._elementwise import (
    _cell_update,
    elementwise,
    entry_first,
    gru_coefs,
    gru_gate_coefs,
    gru_rows,
    linear_recurrence,
    lstm_coefs,
    lstm_rows,
)
from ._fused_rows import gru_frobenius_rows, lstm_frobenius_rows

__all__ = ["EYE", "ARCHITECTURES", "LayerParams"]


class _Eye:
    """Sentinel for the identity as a tangent block (``W @ EYE == W``)."""

    def __repr__(self) -> str:
        return "EYE"


EYE = _Eye()


def _mm(w: Tensor, v):
    """``W @ V`` for V a tensor ``(N, n, k)``, ``EYE`` or ``None`` (zero)."""
    if v is None:
        return None
    if v is EYE:
        return w
    if v.dim() == 3 and v.shape[-1] == 1:  # one tangent per point: a plain (N, n) @ (n, m) GEMM, no transposes
        return (v[..., 0] @ w.T).unsqueeze(-1)
    if v.dim() == 3 and _column_major(v):
        # a column-major block (a QR's Q, or a product of one): one (N k, n) @ (n, m) GEMM without a copy, and the
        # product column-major as well, so that the elementwise passes after it run along the long dimension
        return (v.mT @ w.T).mT
    if v.dim() == 3 and v.shape[-1] < 64:
        # one (m, n) @ (n, N k) GEMM beats N small ones for narrow tangent blocks
        n, k = v.shape[0], v.shape[-1]
        return (w @ v.transpose(0, 1).reshape(v.shape[1], n * k)).reshape(w.shape[0], n, k).transpose(0, 1)
    return torch.matmul(w, v)


def _lincomb(terms, diag=None):
    """``sum_k diag(a_k) G_k + diag(d) V`` for ``terms = [(a_k, G_k)]`` and ``diag = (d, V)``.

    ``G_k``/``V`` may be ``None`` (zero) and ``V`` may be ``EYE``. The sum is accumulated in place
    in the first product, which is a fresh tensor (so this is safe under autograd), and an identity
    ``V`` adds ``d`` to the diagonal instead of materialising ``diag(d)``.
    """
    acc = None
    for a, g in terms:
        if g is None:
            continue
        acc = a.unsqueeze(-1) * g if acc is None else acc.addcmul_(a.unsqueeze(-1), g)
    if diag is not None and diag[1] is not None:
        d, v = diag
        if v is EYE:
            if acc is None:
                acc = torch.diag_embed(d)
            else:
                acc.diagonal(dim1=-2, dim2=-1).add_(d)
        else:
            acc = d.unsqueeze(-1) * v if acc is None else acc.addcmul_(d.unsqueeze(-1), v)
    return acc


def _column_major(v: Tensor) -> bool:
    """Whether the ``(N, n, k)`` block ``v`` is stored as ``(N, k, n)`` (each matrix column-major, LAPACK's layout)."""
    return v.stride(-2) == 1 and v.stride(0) == v.shape[-1] * v.stride(-1) and v.shape[-2] > 1 and v.shape[-1] > 1


def _gate_blocks(g, n_gates: int) -> list:
    """The gate blocks of ``g`` (``(..., n_gates * H, k)``, or None for zero) along its rows: one ``split``, whose
    backward is one concatenation (separate slices would each scatter their gradient into a zero tensor of the
    whole size). A column-major ``g`` is split as its transpose, so that this concatenation is column-major too
    and the GEMM's backward reads it without a copy."""
    if g is None:
        return [None] * n_gates
    if g.dim() == 3 and _column_major(g):
        return [b.mT for b in g.mT.chunk(n_gates, dim=-1)]
    return list(g.chunk(n_gates, dim=-2))


def _add(*terms):
    out = None
    for t in terms:
        if t is None:
            continue
        out = t if out is None else out + t
    return out


@dataclass
class LayerParams:
    """The weights of one layer, as references to the module's own tensors (never copies)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None
    w_hr: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> LayerParams:
        """A copy with ``fn`` applied to every tensor (``None`` stays ``None``)."""

        def opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return LayerParams(fn(self.w_ih), fn(self.w_hh), opt(self.b_ih), opt(self.b_hh), opt(self.w_hr))

    def to(self, **kwargs) -> LayerParams:
        return self.map(lambda t: t.to(**kwargs))

    def tensors(self) -> list[Tensor]:
        return [v for v in self.__dict__.values() if v is not None]


def _pre(p: LayerParams, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    gi = torch.nn.functional.linear(x, p.w_ih, p.b_ih)
    gh = torch.nn.functional.linear(h, p.w_hh, p.b_hh)
    return gi, gh


def _gates_tangent(p: LayerParams, dx, dh):
    return _add(_mm(p.w_ih, dx), _mm(p.w_hh, dh))


def _rowgram(w_hh: Tensor, n_gates: int) -> Tensor:
    """``G[i, k, l] = <W_k[i, :], W_l[i, :]>`` for the gate blocks of ``w_hh``: shape (H, K, K)."""
    hidden = w_hh.shape[0] // n_gates
    w = w_hh.reshape(n_gates, hidden, -1).transpose(0, 1)  # (H, K, In)
    return w @ w.transpose(1, 2)


def _rowdiag(w_hh: Tensor, n_gates: int) -> Tensor:
    """``W_k[i, i]`` for each gate block: shape (H, K) (requires a square block)."""
    hidden = w_hh.shape[0] // n_gates
    return torch.diagonal(w_hh.reshape(n_gates, hidden, -1), dim1=1, dim2=2).T


class _RowQuad(torch.autograd.Function):
    """``q[n, i] = sum_{k,m} x_k[n, i] G[i, k, m] x_m[n, i]`` with a hand-written backward: K (N, H) coefficients
    and a symmetric ``G (H, K, K)``; about half the full-size passes of the autograd graph of the same sum. The
    backward is plain differentiable torch ops on the saved inputs, so second derivatives are exact too."""

    @staticmethod
    def _gx(gram: Tensor, xs) -> list[Tensor]:
        out = []
        for k in range(len(xs)):
            acc = xs[0] * gram[:, k, 0]
            for m in range(1, len(xs)):
                acc = acc.addcmul(xs[m], gram[:, k, m])
            out.append(acc)
        return out

    @staticmethod
    def forward(ctx, gram, *xs):
        gx = _RowQuad._gx(gram, xs)
        q = xs[0] * gx[0]
        for x, y in zip(xs[1:], gx[1:], strict=True):
            q.addcmul_(x, y)
        ctx.save_for_backward(gram, *xs)
        ctx.gx = gx
        return q

    @staticmethod
    def backward(ctx, gq):
        gram, *xs = ctx.saved_tensors
        gx = _RowQuad._gx(gram, xs) if torch.is_grad_enabled() else ctx.gx  # differentiable for double backward
        gq2 = 2 * gq
        grads = [gq2 * y for y in gx] if any(ctx.needs_input_grad[1:]) else [None] * len(xs)
        dgram = None
        if ctx.needs_input_grad[0]:
            k_n = len(xs)
            wx = [gq * x for x in xs]
            pairs = {(k, m): (wx[k] * xs[m]).sum(0) for k in range(k_n) for m in range(k, k_n)}
            dgram = torch.stack(
                [torch.stack([pairs[min(k, m), max(k, m)] for m in range(k_n)], -1) for k in range(k_n)], -2
            )
        return dgram, *grads


def row_quadratic(xs: list[Tensor], gram: Tensor) -> Tensor:
    """``sum_{k,m} x_k G[:, k, m] x_m`` per element, ``(N, H)``, for K coefficients ``(N, H)`` and ``G (H, K, K)``.

    ``G`` must be symmetric (a Gram matrix of rows, as :func:`_rowgram`): the backward uses ``dq/dx_k = 2 (G x)_k``.

    Examples
    --------
    >>> x = [torch.ones(1, 2), 2 * torch.ones(1, 2)]
    >>> row_quadratic(x, torch.eye(2).expand(2, 2, 2)).tolist()
    [[5.0, 5.0]]
    """
    return _RowQuad.apply(gram, *xs)


class RNNArch:
    """Elman RNN layer (tanh or relu)."""

    n_gates = 1
    has_c = False

    def __init__(self, nonlinearity: str = "tanh"):
        self.nonlinearity = nonlinearity
        self.name = f"rnn_{nonlinearity}"

    def step(self, p, x, h, c=None):
        gi, gh = _pre(p, x, h)
        a = gi + gh
        return (torch.tanh(a) if self.nonlinearity == "tanh" else torch.relu(a)), None

    def linearize(self, p, x, h, c=None):
        gi, gh = _pre(p, x, h)
        a = gi + gh
        if self.nonlinearity == "tanh":
            h_new = torch.tanh(a)
            dphi = 1 - h_new * h_new
        else:
            h_new = torch.relu(a)
            dphi = (a > 0).to(a.dtype)
        return h_new, None, {"dphi": dphi}

    def linearize_known(self, p, x, h, c, h_new, c_new, gates=None, compile=False):  # noqa: A002
        """The coefficients of :meth:`linearize` from the known next state ``h_new`` (no GEMM: ``phi'`` is a
        function of ``phi(a)`` for tanh and relu)."""
        if self.nonlinearity == "tanh":
            return {"dphi": 1 - h_new * h_new}
        return {"dphi": (h_new > 0).to(h_new.dtype)}

    def tangent(self, p, coef, dx, dh, dc=None):
        g, a = _gates_tangent(p, dx, dh), coef["dphi"].unsqueeze(-1)
        fresh = g is not None and dx is not EYE and dh is not EYE  # a GEMM's output (or a sum of two)
        if fresh and not torch.is_grad_enabled() and g.shape[:-1] == a.shape[:-1] and g.dtype == a.dtype:
            return g.mul_(a), None  # scaled in place (same shape and dtype: nothing to broadcast or promote)
        return _lincomb([(coef["dphi"], g)]), None

    def tangent_transpose(self, p, coef, uh, uc=None, need_x=True):
        v = coef["dphi"].unsqueeze(-1) * uh
        return _mm(p.w_ih.T, v) if need_x else None, _mm(p.w_hh.T, v), None

    def frobenius_sq(self, p, coef, compile=False):  # noqa: A002
        # ||diag(a) W||_F^2 = sum_i a_i^2 ||W[i]||^2
        return (coef["dphi"] ** 2 * (p.w_hh**2).sum(-1)).sum(-1)


class GRUArch:
    """GRU layer, PyTorch's (r, z, n) block order with ``b_hn`` inside the reset product."""

    n_gates = 3
    has_c = False
    name = "gru"

    @staticmethod
    def _forward(p, x, h):
        gi, gh = _pre(p, x, h)
        gi_r, gi_z, gi_n = gi.chunk(3, -1)
        gh_r, gh_z, gh_n = gh.chunk(3, -1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        return r, z, n, gh_n, (1 - z) * n + z * h

    def step(self, p, x, h, c=None):
        return self._forward(p, x, h)[-1], None

    def linearize(self, p, x, h, c=None):
        r, z, n, gh_n, h_new = self._forward(p, x, h)
        a_n = (1 - z) * (1 - n * n)
        coef = {
            "z": z,
            "a_z": (h - n) * z * (1 - z),  # on dgi_z + dgh_z
            "a_n": a_n,  # on dgi_n
            "a_hn": a_n * r,  # on dgh_n
            "a_r": a_n * gh_n * r * (1 - r),  # on dgi_r + dgh_r
        }
        return h_new, None, coef

    def linearize_known(self, p, x, h, c, h_new, c_new, gates=None, compile=False):  # noqa: A002
        """The coefficients of :meth:`linearize` without forming ``h_new`` (the caller knows it): from the gates
        ``(r, z, n, gh_n)`` of the forward when given (:func:`rnnjac._recurrence.gru_layer`), else two GEMMs for
        the pre-activations; the rest is one elementwise function (:mod:`rnnjac._elementwise`, compiled with
        ``compile=True``)."""
        if gates is not None:
            z, a_z, a_n, a_hn, a_r = elementwise(gru_gate_coefs, compile)(*gates, h)
        else:
            z, a_z, a_n, a_hn, a_r = elementwise(gru_coefs, compile)(*_pre(p, x, h), h)
        return {"z": z, "a_z": a_z, "a_n": a_n, "a_hn": a_hn, "a_r": a_r}

    def tangent(self, p, coef, dx, dh, dc=None):
        gi_r, gi_z, gi_n = _gate_blocks(_mm(p.w_ih, dx), 3)
        gh_r, gh_z, gh_n = _gate_blocks(_mm(p.w_hh, dh), 3)
        out = _lincomb(
            [
                (coef["a_r"], _add(gi_r, gh_r)),
                (coef["a_z"], _add(gi_z, gh_z)),
                (coef["a_n"], gi_n),
                (coef["a_hn"], gh_n),
            ],
            diag=(coef["z"], dh),
        )
        return out, None

    def tangent_transpose(self, p, coef, uh, uc=None, need_x=True):
        """``(qx, qh, None)``: the transpose of :meth:`tangent` applied to the output cotangent ``uh``."""
        vr, vz = coef["a_r"].unsqueeze(-1) * uh, coef["a_z"].unsqueeze(-1) * uh
        qh = _mm(p.w_hh.T, torch.cat([vr, vz, coef["a_hn"].unsqueeze(-1) * uh], -2))
        qh = qh.addcmul_(coef["z"].unsqueeze(-1), uh)
        qx = _mm(p.w_ih.T, torch.cat([vr, vz, coef["a_n"].unsqueeze(-1) * uh], -2)) if need_x else None
        return qx, qh, None

    @staticmethod
    def _bordered_gram(p) -> Tensor:
        """Row ``i`` of ``J`` is ``sum_k a_k W_k[i] + z e_i`` over (r, z, n): a quadratic form in
        ``(a_r, a_z, a_hn, z)`` whose Gram matrix ``(H, 4, 4)`` is the rows' Gram bordered by
        ``<W_k[i], e_i> = W_k[i, i]`` and ``<e_i, e_i> = 1``."""
        gram, wdiag = _rowgram(p.w_hh, 3), _rowdiag(p.w_hh, 3)  # (H, 3, 3), (H, 3)
        top = torch.cat([gram, wdiag.unsqueeze(-1)], -1)
        bottom = torch.cat([wdiag, torch.ones_like(wdiag[:, :1])], -1).unsqueeze(-2)
        return torch.cat([top, bottom], -2)

    def frobenius_sq(self, p, coef, compile=False):  # noqa: A002
        a = [coef["a_r"], coef["a_z"], coef["a_hn"], coef["z"]]
        if compile:
            return elementwise(gru_rows, True)(*a, entry_first(self._bordered_gram(p)))
        return row_quadratic(a, self._bordered_gram(p)).sum(-1)

    def frobenius_from_record(self, p, record, steps: slice, compile=False) -> Tensor:  # noqa: A002
        """:meth:`frobenius_sq` ``(T', B)`` at the steps ``steps`` straight from what the layer's forward kept
        (:class:`rnnjac._recurrence.LayerRecord`), without the coefficients
        (:func:`rnnjac._fused_rows.gru_frobenius_rows`: eager cache-sized chunks, or ``torch.compile``d)."""
        return gru_frobenius_rows(record.pre, record.hs, record.gates, self._bordered_gram(p), steps, compile=compile)


class LSTMArch:
    """LSTM layer, PyTorch's (i, f, g, o) block order, optional projection ``W_hr``."""

    n_gates = 4
    has_c = True
    name = "lstm"

    @staticmethod
    def _forward(p, x, h, c):
        gi, gh = _pre(p, x, h)
        i, f, g, o = (gi + gh).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = _cell_update(f, c, i * g)
        tc = torch.tanh(c_new)
        m = o * tc
        h_new = m if p.w_hr is None else torch.nn.functional.linear(m, p.w_hr)
        return i, f, g, o, tc, h_new, c_new

    def step(self, p, x, h, c):
        return self._forward(p, x, h, c)[-2:]

    @staticmethod
    def gates(p: LayerParams, xs: Tensor, hs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The activated gates ``(i, f, g, o)`` of all steps, each ``(..., H)``, from the inputs ``xs`` and the
        states ``hs`` they act on (two GEMMs)."""
        return LSTMArch.pre_and_gates(p, xs, hs)[1]

    @staticmethod
    def pre_and_gates(p: LayerParams, xs: Tensor, hs: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The pre-activations ``(..., 4H)`` and activated gates of :meth:`gates`."""
        gi, gh = _pre(p, xs, hs)
        pre = gi + gh
        i, f, g, o = pre.chunk(4, -1)
        return pre, (torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o))

    @staticmethod
    def cell_sequence(p: LayerParams, xs: Tensor, hs: Tensor, c0: Tensor, gates=None) -> Tensor:
        """The cell states ``c_0..c_T`` ``(B, T+1, H)`` of one layer from its known outputs.

        ``xs`` ``(B, T, I)`` are the layer's inputs and ``hs`` ``(B, T+1, H_out)`` its outputs ``h_0..h_T``
        (e.g. from the module's own forward, which does not return ``c_t``). The gates of all steps come
        from two GEMMs (or ``gates``, :meth:`gates` of ``xs`` and ``hs[:, :-1]``); the linear recurrence
        ``c' = f c + i g`` is :func:`linear_recurrence` (a loop on the CPU, a doubling scan on a GPU).

        Examples
        --------
        >>> lstm = torch.nn.LSTM(2, 3, bias=False, batch_first=True)
        >>> x, p = torch.randn(1, 4, 2), LayerParams(lstm.weight_ih_l0, lstm.weight_hh_l0)
        >>> out, (h_T, c_T) = lstm(x)
        >>> cs = LSTMArch.cell_sequence(p, x, torch.cat([torch.zeros(1, 1, 3), out], 1), torch.zeros(1, 3))
        >>> cs.shape, bool(torch.allclose(cs[:, -1], c_T[0], atol=1e-6))
        (torch.Size([1, 5, 3]), True)
        """
        i, f, g, _ = LSTMArch.gates(p, xs, hs[:, :-1]) if gates is None else gates
        return linear_recurrence(f, i * g, c0)

    def linearize(self, p, x, h, c):
        i, f, g, o, tc, h_new, c_new = self._forward(p, x, h, c)
        coef = {
            "s_i": g * i * (1 - i),
            "s_f": c * f * (1 - f),
            "s_g": i * (1 - g * g),
            "f": f,
            "s_o": tc * o * (1 - o),
            "s_m": o * (1 - tc * tc),
        }
        return h_new, c_new, coef

    def linearize_known(self, p, x, h, c, h_new, c_new, gates=None, compile=False):  # noqa: A002
        """The coefficients of :meth:`linearize` from the known next cell state ``c_new`` and, when given, the
        activated ``gates`` of the same steps (:meth:`gates`, as the forward computed them): no GEMM then, one
        elementwise function (:func:`rnnjac._elementwise.lstm_coefs`, compiled with ``compile=True``)."""
        i, f, g, o = self.gates(p, x, h) if gates is None else gates
        s_i, s_f, s_g, f, s_o, s_m = elementwise(lstm_coefs, compile)(i, f, g, o, c, c_new)
        return {"s_i": s_i, "s_f": s_f, "s_g": s_g, "f": f, "s_o": s_o, "s_m": s_m}

    def tangent(self, p, coef, dx, dh, dc):
        d_i, d_f, d_g, d_o = _gate_blocks(_gates_tangent(p, dx, dh), 4)
        dc_new = _lincomb([(coef["s_i"], d_i), (coef["s_f"], d_f), (coef["s_g"], d_g)], diag=(coef["f"], dc))
        dm = _lincomb([(coef["s_o"], d_o), (coef["s_m"], dc_new)])
        dh_new = dm if p.w_hr is None else _mm(p.w_hr, dm)
        return dh_new, dc_new

    def tangent_transpose(self, p, coef, uh, uc=None, need_x=True):
        """``(qx, qh, qc)``: the transpose of :meth:`tangent` applied to the output cotangents ``(uh, uc)``
        (``uc=None``: the c rows are not part of the output; ``qc`` is then ``None`` too)."""
        um = uh if p.w_hr is None else _mm(p.w_hr.T, uh)
        u_c = coef["s_m"].unsqueeze(-1) * um
        if uc is not None:
            u_c = u_c + uc
        v = torch.cat(
            [coef[k].unsqueeze(-1) * u_c for k in ("s_i", "s_f", "s_g")] + [coef["s_o"].unsqueeze(-1) * um], -2
        )
        qx = _mm(p.w_ih.T, v) if need_x else None
        return qx, _mm(p.w_hh.T, v), (coef["f"].unsqueeze(-1) * u_c if uc is not None else None)

    def frobenius_from_record(self, p, record, steps: slice, compile=False) -> Tensor:  # noqa: A002
        """:meth:`frobenius_sq` ``(T', B)`` (no projection) at the steps ``steps`` straight from what the layer's
        forward kept (:func:`rnnjac._fused_rows.lstm_frobenius_rows`), as :meth:`GRUArch.frobenius_from_record`."""
        return lstm_frobenius_rows(record.pre, record.cs, record.gates, _rowgram(p.w_hh, 4), steps, compile=compile)

    def frobenius_sq(self, p, coef, compile=False):  # noqa: A002
        # (callers check System.frobenius_closed_form: a projection mixes rows, no row-local form)
        s_i, s_f, s_g, s_o, s_m, f = (coef[k] for k in ("s_i", "s_f", "s_g", "s_o", "s_m", "f"))
        gram = _rowgram(p.w_hh, 4)
        if compile:
            return elementwise(lstm_rows, True)(s_i, s_f, s_g, f, s_o, s_m, entry_first(gram))
        # row i of dc'/dh is c_i = sum_k a_k W_k[i] over (i, f, g); row i of dh'/dh is s_m c_i + s_o W_o[i],
        # so ||.||^2 = (1 + s_m^2) c^T G c + 2 s_m s_o (c . G_o) + s_o^2 G_oo, per row
        # the f^2 (1 + s_m^2) term is the diagonal c-columns: diag(f), diag(s_m f); as a bordered quadratic form
        quad = row_quadratic([s_i, s_f, s_g], gram[:, :3, :3]).addcmul(f, f)  # c^T G c + f^2
        lin_o = s_i * gram[:, 0, 3] + s_f * gram[:, 1, 3] + s_g * gram[:, 2, 3]
        rows = (1 + s_m * s_m) * quad + s_o * (2 * s_m * lin_o + s_o * gram[:, 3, 3])
        return rows.sum(-1)


class CellArch(Protocol):
    """What every layer kind in :data:`ARCHITECTURES` provides."""

    name: str
    n_gates: int
    has_c: bool

    def step(self, p: LayerParams, x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]: ...

    def linearize(
        self, p: LayerParams, x: Tensor, h: Tensor, c: Tensor | None
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]: ...

    def tangent(self, p: LayerParams, coef: dict[str, Tensor], dx: Any, dh: Any, dc: Any) -> tuple[Any, Any]: ...

    def tangent_transpose(
        self, p: LayerParams, coef: dict[str, Tensor], uh: Tensor, uc: Tensor | None, need_x: bool
    ) -> tuple[Tensor | None, Tensor, Tensor | None]: ...

    def linearize_known(
        self, p: LayerParams, x: Tensor, h: Tensor, c, h_new: Tensor, c_new, gates=None, compile: bool = False
    ) -> dict[str, Tensor]: ...

    def frobenius_sq(self, p: LayerParams, coef: dict[str, Tensor], compile: bool = False) -> Tensor: ...


ARCHITECTURES: dict[str, CellArch] = {
    "rnn_tanh": RNNArch("tanh"),
    "rnn_relu": RNNArch("relu"),
    "gru": GRUArch(),
    "lstm": LSTMArch(),
}
"""Registry of built-in layer kinds, keyed by the name recorded in output attrs."""
