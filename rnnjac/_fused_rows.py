r"""``||J_t||_F^2`` of one GRU or LSTM layer straight from its gates, forward and backward by hand, in cache-sized
row blocks.

The exact Frobenius penalty of a single layer is a sum over rows of small quadratic forms (:mod:`rnnjac._cells`:
``row_i = sum_k a_ki W_k[i, :] (+ diagonal terms)``, so ``||J||_F^2 = sum_i a_i^T G_i a_i`` with per-row Gram
matrices ``G_i`` of ``W_hh``'s gate blocks). Built from autograd operators it is a few dozen elementwise passes over
``(B T, H)`` tensors forward and as many backward, each one a fresh allocation and a trip to memory. Here the
coefficients, the quadratic form and the hand-derived backward (the chain rule through the coefficient formulas,
written out below) run on blocks of rows small enough to stay in cache, saving only the inputs: the same values,
several times fewer memory passes. A backward that must itself be differentiated (``create_graph=True``) falls back
to the autograd composition of :mod:`rnnjac._elementwise`, so second derivatives stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._elementwise import gru_gate_coefs, lstm_coefs, lstm_rows, quadratic_rows

__all__ = ["gru_frobenius_rows", "lstm_frobenius_rows"]

#: elements of one ``(rows, H)`` block: 2**16 float32 values are 256 KiB, a few of them fit in L2
_BLOCK_ELEMENTS = 2**16


def _blocks(n: int, hidden: int):
    size = max(1, _BLOCK_ELEMENTS // max(1, hidden))
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _quad(a: list[Tensor], gram: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``sum_kl a_k G_kl a_l`` per element and ``(G a)_k`` (``G`` symmetric, given as its entries' rows
    ``(K, K, H)``, broadcast over rows)."""
    ga = []
    for k in range(len(a)):
        acc = a[0] * gram[k, 0]
        for m in range(1, len(a)):
            acc.addcmul_(a[m], gram[k, m])
        ga.append(acc)
    q = a[0] * ga[0]
    for k in range(1, len(a)):
        q.addcmul_(a[k], ga[k])
    return q, ga


def _gram_grad(a: list[Tensor], w: Tensor, scale: Tensor | None = None) -> Tensor:
    """``sum_rows w s a_k a_l`` ``(H, K, K)``: the gradient of ``sum w * sum_kl a_k G_kl a_l`` by ``G``."""
    stacked = torch.stack(a, -1)  # (rows, H, K)
    weighted = stacked * (w if scale is None else w * scale).unsqueeze(-1)
    return torch.einsum("nhk,nhl->hkl", weighted, stacked)


# ----------------------------------------------------------------------------------------------------- GRU
def _gru_block(r, z, n, gh_n, h, gram):
    """Coefficients ``a = (a_r, a_z, a_hn, z)``, ``a_n`` and the row values of one block (forward); ``gram``
    ``(4, 4, H)``."""
    omz, dtanh = 1 - z, 1 - n * n
    a_n = omz * dtanh
    a_hn = a_n * r
    sig_r = r * (1 - r)
    a_r = a_hn * gh_n * (1 - r)
    a_z = (h - n) * z * omz
    a = [a_r, a_z, a_hn, z]
    q, ga = _quad(a, gram)
    return a, a_n, sig_r, q, ga


class _GRURows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, z, n, gh_n, h, gram):
        out, gk = r.new_empty(r.shape[0]), gram.permute(1, 2, 0).contiguous()
        for blk in _blocks(r.shape[0], r.shape[1]):
            out[blk] = _gru_block(r[blk], z[blk], n[blk], gh_n[blk], h[blk], gk)[3].sum(-1)
        ctx.save_for_backward(r, z, n, gh_n, h, gram)
        return out

    @staticmethod
    def backward(ctx, grad):
        r, z, n, gh_n, h, gram = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate the autograd composition
            return _recompute(ctx, _gru_reference, (r, z, n, gh_n, h, gram), grad)
        dr, dz, dn, dgh, dh = (torch.empty_like(t) for t in (r, z, n, gh_n, h))
        dgram, gk = torch.zeros_like(gram), gram.permute(1, 2, 0).contiguous()
        for blk in _blocks(r.shape[0], r.shape[1]):
            r_, z_, n_, g_, h_ = r[blk], z[blk], n[blk], gh_n[blk], h[blk]
            a, a_n, sig_r, _, ga = _gru_block(r_, z_, n_, g_, h_, gk)
            w = grad[blk].unsqueeze(-1)
            d_r, d_z, d_hn, d_4 = (2 * w * t for t in ga)  # d rows / d a_k (G symmetric)
            d_an = d_hn * r_ + d_r * g_ * sig_r  # a_hn = a_n r, a_r = a_n gh_n r (1 - r)
            torch.mul(d_hn, a_n, out=dr[blk]).addcmul_(d_r * a_n * g_, 1 - 2 * r_)
            torch.mul(d_r * a_n, sig_r, out=dgh[blk])
            sig_z = z_ * (1 - z_)
            torch.mul(d_z, sig_z, out=dh[blk])  # a_z = (h - n) z (1 - z)
            # a_n = (1 - z)(1 - n^2)
            torch.mul(d_an * (1 - z_), -2 * n_, out=dn[blk]).sub_(dh[blk])
            torch.sub(d_4, d_an * (1 - n_ * n_), out=dz[blk]).addcmul_(d_z * (h_ - n_), 1 - 2 * z_)
            dgram += _gram_grad(a, grad[blk].unsqueeze(-1))
        return dr, dz, dn, dgh, dh, dgram


def _gru_reference(r, z, n, gh_n, h, gram):
    z_, a_z, _, a_hn, a_r = gru_gate_coefs(r, z, n, gh_n, h)
    return quadratic_rows([a_r, a_z, a_hn, z_], gram).sum(-1)


def gru_frobenius_rows(r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor, h: Tensor, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(N,)`` of one GRU layer from its gates ``(N, H)`` (as
    :func:`rnnjac._recurrence.gru_layer` keeps them), the state ``h`` they act on and the bordered row Gram
    ``(H, 4, 4)`` of :meth:`rnnjac._cells.GRUArch.frobenius_sq`; differentiable in all of them.

    Examples
    --------
    >>> r = z = torch.full((1, 1), 0.5)
    >>> gram = torch.eye(4).expand(1, 4, 4)
    >>> n, h = torch.zeros(1, 1), torch.ones(1, 1)
    >>> gru_frobenius_rows(r, z, n, torch.zeros(1, 1), h, gram).tolist()  # a_z = 0.25, a_hn = 0.25, z = 0.5
    [0.375]
    """
    return _GRURows.apply(r, z, n, gh_n, h, gram)


# ----------------------------------------------------------------------------------------------------- LSTM
def _lstm_block(i, f, g, o, c, c_new, gram):
    """The coefficients (:func:`rnnjac._elementwise.lstm_coefs`), ``tanh c_new``, the parts of the row form and
    ``(G s)_k`` over the (i, f, g) blocks, for one block (forward); ``gram`` ``(4, 4, H)``."""
    tc = torch.tanh(c_new)
    s = [g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)]
    s_o, s_m = tc * o * (1 - o), o * (1 - tc * tc)
    quad, gs = _quad(s, gram)
    quad.addcmul_(f, f)
    lin_o = s[0] * gram[0, 3]
    lin_o.addcmul_(s[1], gram[1, 3]).addcmul_(s[2], gram[2, 3])
    rows = (1 + s_m * s_m) * quad + s_o * (2 * s_m * lin_o + s_o * gram[3, 3])
    return tc, s, s_o, s_m, quad, gs, lin_o, rows


class _LSTMRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i, f, g, o, c, c_new, gram):
        out, gk = i.new_empty(i.shape[0]), gram.permute(1, 2, 0).contiguous()
        for blk in _blocks(i.shape[0], i.shape[1]):
            out[blk] = _lstm_block(i[blk], f[blk], g[blk], o[blk], c[blk], c_new[blk], gk)[-1].sum(-1)
        ctx.save_for_backward(i, f, g, o, c, c_new, gram)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _recompute(ctx, _lstm_reference, saved, grad)
        i, f, g, o, c, c_new, gram = saved
        di, df, dg, do, dc, dcn = (torch.empty_like(t) for t in saved[:-1])
        dgram, gk = torch.zeros_like(gram), gram.permute(1, 2, 0).contiguous()
        for blk in _blocks(i.shape[0], i.shape[1]):
            i_, f_, g_, o_, c_ = i[blk], f[blk], g[blk], o[blk], c[blk]
            tc, s, s_o, s_m, quad, gs, lin_o, _ = _lstm_block(i_, f_, g_, o_, c_, c_new[blk], gk)
            w = grad[blk].unsqueeze(-1)
            w_quad = w * (1 + s_m * s_m)  # d rows / d quad
            w_lin = 2 * w * s_m * s_o  # d rows / d lin_o
            d_so = 2 * w * (s_m * lin_o + s_o * gk[3, 3])
            d_sm = 2 * w * (s_m * quad + s_o * lin_o)
            d_s = [2 * w_quad * gs[k] + w_lin * gk[k, 3] for k in range(3)]
            sig_i, sig_f, sig_o, dtanh_g = i_ * (1 - i_), f_ * (1 - f_), o_ * (1 - o_), 1 - g_ * g_
            # s_i = g i(1-i), s_g = i (1 - g^2), s_f = c f(1-f); f also enters quad as f^2
            torch.mul(d_s[0] * g_, 1 - 2 * i_, out=di[blk]).add_(d_s[2] * dtanh_g)
            torch.mul(d_s[0], sig_i, out=dg[blk]).sub_(2 * d_s[2] * i_ * g_)
            torch.mul(d_s[1] * c_, 1 - 2 * f_, out=df[blk]).add_(2 * w_quad * f_)
            torch.mul(d_s[1], sig_f, out=dc[blk])
            # s_o = tc o(1-o), s_m = o (1 - tc^2), tc = tanh(c_new)
            dtanh_c = 1 - tc * tc
            torch.mul(d_so * tc, 1 - 2 * o_, out=do[blk]).add_(d_sm * dtanh_c)
            d_tc = d_so * sig_o - 2 * d_sm * o_ * tc
            torch.mul(d_tc, dtanh_c, out=dcn[blk])
            dgram[:, :3, :3] += _gram_grad(s, w_quad)
            dgram[:, :3, 3] += (torch.stack(s, -1) * w_lin.unsqueeze(-1)).sum(0)
            dgram[:, 3, 3] += (w * s_o * s_o).sum(0)
        return di, df, dg, do, dc, dcn, dgram


def _lstm_reference(i, f, g, o, c, c_new, gram):
    return lstm_rows(*lstm_coefs(i, f, g, o, c, c_new), gram)


def lstm_frobenius_rows(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, c_new: Tensor, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(N,)`` of one LSTM layer without projection from its activated gates, cell state
    ``c`` and next cell state ``c_new`` (all ``(N, H)``) and the row Gram ``(H, 4, 4)`` of ``W_hh``'s gate blocks
    (:meth:`rnnjac._cells.LSTMArch.frobenius_sq`); differentiable in all of them.

    Examples
    --------
    >>> half, zero = torch.full((1, 1), 0.5), torch.zeros(1, 1)
    >>> lstm_frobenius_rows(half, half, zero, half, zero, zero, torch.eye(4).expand(1, 4, 4)).tolist()
    [0.625]
    """
    return _LSTMRows.apply(i, f, g, o, c, c_new, gram)


def _recompute(ctx, reference, inputs, grad) -> tuple:
    """The input gradients as a differentiable graph, by autograd through ``reference`` (``create_graph=True``)."""
    wanted = [k for k, t in enumerate(inputs) if ctx.needs_input_grad[k]]
    with torch.enable_grad():
        out = reference(*inputs)
        got = torch.autograd.grad(out, [inputs[k] for k in wanted], grad, create_graph=True, allow_unused=True)
    res = [None] * len(inputs)
    for k, t in zip(wanted, got, strict=True):
        res[k] = t
    return tuple(res)
