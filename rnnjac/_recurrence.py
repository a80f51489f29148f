r"""GRU and LSTM layers that return their gates: one autograd Function per layer, for the penalties' shared forward.

torch's fused CPU kernels (``mkldnn_rnn_layer``) return the outputs only. A Jacobian penalty needs each step's
gates, and recomputing them from the states costs one GEMM over all ``B T`` steps forward and two more backward: as
much as the training step itself. :func:`gru_layer` and :func:`lstm_layer` run the recurrence as a loop over time
(the input projections of all steps are one GEMM before it), keep the gates, and accept gradients for the gates as
well as for the states: their backward adds what the penalty contributes to each step's gate gradients and runs the
recurrence once, so the penalty shares every GEMM with the task loss and only its elementwise work is its own.

The loops keep the per-step work to a few operators on preallocated buffers: the forward is one GEMM and five
(GRU) or seven (LSTM) elementwise operators per step; the backward's per-step coefficients are computed for all
steps at once beforehand, leaving one GEMM and two (GRU) or four (LSTM) operators per step; the weight gradients
are one GEMM each over all steps afterwards. Formulas as in :mod:`rnnjac._cells` (PyTorch's gate orders).

Each layer also returns its pre-activations ``(T, B, 4H)`` (GRU blocks ``(r, z, hidden n, input n)``: ``W_hn h +
b_hn`` and ``W_in x + b_in`` kept apart; LSTM ``(i, f, g, o)``), written by the same GEMMs and operators that
compute the gates (no extra pass). A gradient for them is a gradient for the GEMMs' outputs, which the backward
needs anyway: the exact Frobenius penalty (:mod:`rnnjac._fused_rows`) differentiates by the pre-activations, so
what it contributes joins the backward recurrence as it is, with no conversion and no autograd glue.

A backward that must itself be differentiated (``create_graph=True``: double backward, ``gradgradcheck``)
differentiates a plain step loop of the same formulas instead (:func:`rnnjac._elementwise.graph_vjp`), so every
order of derivative is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cells import LayerParams, _pre
from ._elementwise import graph_vjp

__all__ = ["LayerRecord", "gru_layer", "lstm_layer"]


class LayerRecord:
    """What a gated layer's forward kept, time-major: ``hs`` ``(T+1, B, H)``, ``cs`` (LSTM) or None, the activated
    ``gates`` ``(T, B, KH)``, the pre-activations ``pre`` ``(T, B, 4H)`` (module docstring) and, for a GRU, ``gh_n =
    W_hn h + b_hn`` ``(T, B, H)`` on its own (the same values as ``pre``'s block: a gradient for it alone does not
    make autograd fill a zero ``(T, B, 4H)`` tensor). Iterating gives the batch-first gate views ``(B, T, H)`` that
    :meth:`rnnjac._cells.GRUArch.linearize_known` / :meth:`rnnjac._cells.LSTMArch.linearize_known` take:
    ``(r, z, n, gh_n)`` or ``(i, f, g, o)``."""

    __slots__ = ("hs", "cs", "gates", "pre", "gh_n")

    def __init__(self, hs: Tensor, cs: Tensor | None, gates: Tensor, pre: Tensor, gh_n: Tensor | None):
        self.hs, self.cs, self.gates, self.pre, self.gh_n = hs, cs, gates, pre, gh_n

    def __iter__(self):
        blocks = list(self.gates.split(self.hs.shape[-1], -1))
        if self.gh_n is not None:
            blocks.append(self.gh_n)
        return iter([t.transpose(0, 1) for t in blocks])


def _input_projection(x: Tensor, w_ih: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x W_ih^T + bias`` for all steps at once: ``(T, B, G)`` from time-major ``x (T, B, I)``; written into
    ``out`` (``(T B, G)``, e.g. columns of a larger buffer) when given."""
    flat = x.reshape(-1, x.shape[-1])
    res = torch.mm(flat, w_ih.t(), out=out) if bias is None else torch.addmm(bias, flat, w_ih.t(), out=out)
    return res if out is not None else res.view(x.shape[0], x.shape[1], -1)


def _bias_sum(*biases: Tensor | None) -> Tensor | None:
    """The sum of the biases given (None: absent), None if there are none."""
    present = [b for b in biases if b is not None]
    return sum(present[1:], present[0]) if present else None


def _linear_grads(need: tuple, x: Tensor, w: Tensor, dpre: Tensor) -> tuple:
    """``(dx, dW, db)`` of ``pre = x W^T + b`` over all steps from ``dpre (T, B, G)``, one GEMM each; ``need``: which
    of the three are wanted."""
    flat = dpre.flatten(0, 1)  # a view also for a block of columns of a larger buffer (a strided GEMM operand)
    dx = (flat @ w).view(*dpre.shape[:2], -1) if need[0] else None
    dw = flat.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    return dx, dw, (flat.sum(0) if need[2] else None)


def _affine_into(out: Tensor, coef: Tensor, v: Tensor, shift: Tensor | None) -> Tensor:
    """``out = coef * v + shift`` (``shift`` None: zero), written into ``out``."""
    return torch.mul(coef, v, out=out) if shift is None else torch.addcmul(shift, coef, v, out=out)


def _or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


# ----------------------------------------------------------------------------------------------------- GRU
def _gru_reference(x, h0, w_ih, w_hh, b_ih, b_hh):
    """:class:`_GRULayer`'s outputs by a differentiable step loop of the layer formulas."""
    p, hid = LayerParams(w_ih, w_hh, b_ih, b_hh), h0.shape[-1]
    hs, gates, pres, h = [h0], [], [], h0
    for x_t in x:
        gi, gh = _pre(p, x_t, h)
        pre_rz = gi[:, : 2 * hid] + gh[:, : 2 * hid]
        r, z = torch.sigmoid(pre_rz).chunk(2, -1)
        n = torch.tanh(gi[:, 2 * hid :] + r * gh[:, 2 * hid :])
        h = torch.lerp(n, h, z)
        hs.append(h)
        gates.append(torch.cat([r, z, n], -1))
        pres.append(torch.cat([pre_rz, gh[:, 2 * hid :], gi[:, 2 * hid :]], -1))
    stacked = torch.stack(pres)
    return torch.stack(hs), torch.stack(gates), stacked, stacked[..., 2 * hid : 3 * hid]


class _GRULayer(torch.autograd.Function):
    """Time-major ``x (T, B, I)`` -> ``hs (T+1, B, H)``, gates ``(T, B, 3H)`` (r, z, n), pre-activations
    ``(T, B, 4H)`` (r, z, hidden n, input n) and ``gh_n = W_hn h + b_hn`` ``(T, B, H)`` (a copy of ``pre``'s block)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh):
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no work for them
        steps, b, _ = x.shape
        hid = h0.shape[-1]
        hs, pre = x.new_empty(steps + 1, b, hid), x.new_empty(steps, b, 4 * hid)
        gates = x.new_empty(steps, b, 3 * hid)
        # every step's input and bias parts straight into their columns of pre (strided GEMM outputs, no copy):
        # r, z: x W_i^T + b_i + b_h; hidden n: b_hn; input n: x W_in^T + b_in. Each step then accumulates its
        # recurrent GEMM into the r, z and hidden n columns in place.
        flat = pre.view(-1, 4 * hid)
        rz, n = slice(0, 2 * hid), slice(2 * hid, None)

        def rows(bias, part):
            return None if bias is None else bias[part]

        _input_projection(x, w_ih[rz], _bias_sum(rows(b_ih, rz), rows(b_hh, rz)), out=flat[:, : 2 * hid])
        _input_projection(x, w_ih[n], rows(b_ih, n), out=flat[:, 3 * hid :])
        if b_hh is None:
            flat[:, 2 * hid : 3 * hid].zero_()
        else:
            flat[:, 2 * hid : 3 * hid].copy_(b_hh[n])
        hs[0] = h0
        wt = w_hh.t()
        for t in range(steps):
            h, g_t, p_t = hs[t], gates[t], pre[t]
            p_t[:, : 3 * hid].addmm_(h, wt)  # r, z (with their input parts) and hidden n (with b_hn)
            torch.sigmoid(p_t[:, : 2 * hid], out=g_t[:, : 2 * hid])
            n_t = torch.addcmul(p_t[:, 3 * hid :], g_t[:, :hid], p_t[:, 2 * hid : 3 * hid], out=g_t[:, 2 * hid :])
            torch.lerp(n_t.tanh_(), h, g_t[:, hid : 2 * hid], out=hs[t + 1])
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, hs, gates, pre)
        return hs, gates, pre, pre[..., 2 * hid : 3 * hid].clone()

    @staticmethod
    def backward(ctx, dhs, dgates, dpre_out, dghn):
        x, h0, w_ih, w_hh, b_ih, b_hh, hs, gates, pre = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
            return graph_vjp(_gru_reference, inputs, (dhs, dgates, dpre_out, dghn))
        steps, b, hid = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        coef, ext = _gru_coefficients(hs, gates, pre[..., 2 * hid : 3 * hid], dgates, dpre_out, dghn)
        dhs = _or_zeros(dhs, hs)
        z = gates[..., hid : 2 * hid]
        dpre, dh = x.new_empty(steps, b, 4 * hid), x.new_empty(steps, b, hid)  # dh[t]: total d/dh_{t+1}
        dh[-1] = dhs[-1]
        for t in range(steps - 1, -1, -1):
            dh_t = dh[t]
            _affine_into(dpre[t], coef[t], torch.cat([dh_t, dh_t, dh_t, dh_t], 1), None if ext is None else ext[t])
            base = torch.addcmul(dhs[t], dh_t, z[t])
            if t:
                torch.addmm(base, dpre[t, :, : 3 * hid], w_hh, out=dh[t - 1])
            else:
                dh0 = torch.addmm(base, dpre[0, :, : 3 * hid], w_hh)
        need = ctx.needs_input_grad
        # the input pre-activations' gradients are blocks (r, z) and (input n) of dpre: two GEMMs each, no copy
        rz = _linear_grads((need[0], need[2], need[4]), x, w_ih[: 2 * hid], dpre[..., : 2 * hid])
        n_in = _linear_grads((need[0], need[2], need[4]), x, w_ih[2 * hid :], dpre[..., 3 * hid :])
        dx = rz[0].add_(n_in[0]) if need[0] else None
        dw_ih, db_ih = (
            torch.cat([a, b]) if need[k] else None for k, a, b in ((2, rz[1], n_in[1]), (4, rz[2], n_in[2]))
        )
        _, dw_hh, db_hh = _linear_grads((False, need[3], need[5]), hs[:-1], w_hh, dpre[..., : 3 * hid])
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


def _gru_coefficients(hs, gates, gh_n, dgates, dpre, dghn) -> tuple[Tensor, Tensor | None]:
    """Per step, blocks (r, z, hidden n, input n): the derivatives of the pre-activations by ``h_{t+1}`` (the
    Jacobian's coefficients, :mod:`rnnjac._cells`), and the gradients that other consumers gave the gates and the
    pre-activations, carried to the pre-activations (None when there are none); each ``(T, B, 4H)``."""
    r, z, n = gates.chunk(3, -1)
    coef = gates.new_empty(*gates.shape[:2], 4 * n.shape[-1])
    c_r, c_z, c_hn, c_n = coef.chunk(4, -1)
    dtanh = torch.addcmul(n.new_ones(()), n, n, value=-1, out=c_n)  # 1 - n^2, one pass
    ext = None if dgates is None and dghn is None else _gru_external(r, z, gh_n, dtanh, dgates, dghn)
    if dpre is not None:
        ext = dpre if ext is None else ext.add_(dpre)
    one_minus = torch.rsub(z, 1)
    c_n.mul_(one_minus)  # (1 - z)(1 - n^2)
    torch.sub(hs[:-1], n, out=c_z).mul_(z).mul_(one_minus)
    torch.mul(c_n, r, out=c_hn)
    torch.mul(r, -1, out=one_minus).add_(1)
    torch.mul(c_hn, gh_n, out=c_r).mul_(one_minus)
    return coef, ext


def _gru_external(r, z, gh_n, dtanh, dgates, dghn) -> Tensor:
    """The gradients that other consumers gave the gates ``dgates`` (r, z, n) and ``gh_n`` carried to the
    pre-activations ``(T, B, 4H)`` (either may be None)."""
    shape = (*r.shape[:2], 4 * r.shape[-1])
    ext = r.new_empty(shape) if dgates is not None else r.new_zeros(shape)  # every block written, or only e_hn
    e_r, e_z, e_hn, e_n = ext.chunk(4, -1)
    if dgates is not None:
        d_r, d_z, d_n = dgates.chunk(3, -1)
        torch.mul(d_n, dtanh, out=e_n)
        torch.mul(e_n, r, out=e_hn)
        torch.addcmul(d_r, e_n, gh_n, out=e_r).mul_(r).mul_(1 - r)
        torch.mul(d_z, z, out=e_z).mul_(1 - z)
    if dghn is not None:
        e_hn.add_(dghn)
    return ext


def gru_layer(x: Tensor, h0: Tensor, p: LayerParams) -> tuple[Tensor, LayerRecord]:
    """A GRU layer's states ``h_0..h_T`` ``(B, T+1, H)`` and what its forward kept (:class:`LayerRecord`: iterate
    it for the gates ``(r, z, n, gh_n)``, each ``(B, T, H)``).

    ``x`` is batch-first ``(B, T, I)``; ``gh_n = W_hn h + b_hn`` is the recurrent part of the candidate's
    pre-activation. Gradients flow to ``x``, ``h0`` and the weights from the states, the gates and the
    pre-activations, sharing one backward recurrence (module docstring). The outputs are views of time-major
    buffers.

    Examples
    --------
    >>> gru = torch.nn.GRU(2, 3, batch_first=True)
    >>> x = torch.randn(4, 5, 2)
    >>> p = LayerParams(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
    >>> hs, record = gru_layer(x, torch.zeros(4, 3), p)
    >>> r, z, n, gh_n = record
    >>> bool(torch.allclose(hs[:, 1:], gru(x)[0], atol=1e-6)), r.shape, record.pre.shape
    (True, torch.Size([4, 5, 3]), torch.Size([5, 4, 12]))
    """
    xt = x.transpose(0, 1).contiguous()
    hs, gates, pre, gh_n = _GRULayer.apply(xt, h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh)
    return hs.transpose(0, 1), LayerRecord(hs, None, gates, pre, gh_n)


# ----------------------------------------------------------------------------------------------------- LSTM
def _lstm_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """:class:`_LSTMLayer`'s outputs by a differentiable step loop of the layer formulas."""
    p, hid = LayerParams(w_ih, w_hh, b_ih, b_hh), h0.shape[-1]
    hs, cs, gates, pres, h, c = [h0], [c0], [], [], h0, c0
    for x_t in x:
        gi, gh = _pre(p, x_t, h)
        pre = gi + gh
        i, f = torch.sigmoid(pre[:, : 2 * hid]).chunk(2, -1)
        g, o = torch.tanh(pre[:, 2 * hid : 3 * hid]), torch.sigmoid(pre[:, 3 * hid :])
        c = f * c + i * g
        h = o * torch.tanh(c)
        hs.append(h)
        cs.append(c)
        gates.append(torch.cat([i, f, g, o], -1))
        pres.append(pre)
    return torch.stack(hs), torch.stack(cs), torch.stack(gates), torch.stack(pres)


class _LSTMLayer(torch.autograd.Function):
    """Time-major ``x (T, B, I)`` -> ``hs, cs (T+1, B, H)``, activated gates ``(T, B, 4H)`` (i, f, g, o) and their
    pre-activations ``(T, B, 4H)``."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        ctx.set_materialize_grads(False)
        steps, b, _ = x.shape
        hid = h0.shape[-1]
        # the input part of every step's pre-activations, then each step's recurrent GEMM accumulated in place
        # (beta = 1 into its own rows: no copy of the input part per step)
        pre = x.new_empty(steps, b, 4 * hid)  # not a view: pre is an output of this Function
        _input_projection(x, w_ih, _bias_sum(b_ih, b_hh), out=pre.view(-1, 4 * hid))
        hs, cs = x.new_empty(steps + 1, b, hid), x.new_empty(steps + 1, b, hid)
        gates, tc = x.new_empty(steps, b, 4 * hid), x.new_empty(steps, b, hid)
        hs[0], cs[0] = h0, c0
        wt = w_hh.t()
        for t in range(steps):
            p_t, g_t = pre[t].addmm_(hs[t], wt), gates[t]
            torch.sigmoid(p_t, out=g_t)  # one operator for i, f, o (and g, overwritten next)
            torch.tanh(p_t[:, 2 * hid : 3 * hid], out=g_t[:, 2 * hid : 3 * hid])
            torch.mul(g_t[:, :hid], g_t[:, 2 * hid : 3 * hid], out=cs[t + 1]).addcmul_(g_t[:, hid : 2 * hid], cs[t])
            torch.mul(g_t[:, 3 * hid :], torch.tanh(cs[t + 1], out=tc[t]), out=hs[t + 1])
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, hs, cs, gates, tc)
        return hs, cs, gates, pre

    @staticmethod
    def backward(ctx, dhs, dcs, dgates, dpre_out):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, hs, cs, gates, tc = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
            return graph_vjp(_lstm_reference, inputs, (dhs, dcs, dgates, dpre_out))
        steps, b, hid = tc.shape
        coef, s_m, ext = _lstm_coefficients(cs, gates, tc, dgates, dpre_out)
        f = gates[..., hid : 2 * hid]
        dhs, dcs = _or_zeros(dhs, hs), _or_zeros(dcs, cs)
        dpre = x.new_empty(steps, b, 4 * hid)
        dh, dc_carry = dhs[-1], dcs[-1]
        for t in range(steps - 1, -1, -1):
            dc = torch.addcmul(dc_carry, dh, s_m[t])
            _affine_into(dpre[t], coef[t], torch.cat([dc, dc, dc, dh], 1), None if ext is None else ext[t])
            dc_carry = torch.addcmul(dcs[t], dc, f[t])
            dh = torch.addmm(dhs[t], dpre[t], w_hh)
        need = ctx.needs_input_grad
        dx, dw_ih, db = _linear_grads((need[0], need[3], need[5] or need[6]), x, w_ih, dpre)
        _, dw_hh, _ = _linear_grads((False, need[4], False), hs[:-1], w_hh, dpre)
        # one tensor per bias: the same object for both would let an in-place edit of one gradient change the other
        db_ih = db if need[5] else None
        db_hh = (db.clone() if need[5] else db) if need[6] else None
        return dx, dh, dc_carry, dw_ih, dw_hh, db_ih, db_hh


def _lstm_coefficients(cs, gates, tc, dgates, dpre) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per step: the derivatives of the pre-activations (i, f, g) by ``c_{t+1}`` and of o by ``h_{t+1}``
    ``(T, B, 4H)``; ``d c_{t+1} / d h_{t+1}`` through ``m = o tanh c`` ``(T, B, H)``; and the gradients that other
    consumers gave the gates and the pre-activations, carried to the pre-activations (None when there are none)."""
    i, _, g, o = gates.chunk(4, -1)
    one = gates.new_ones(())
    coef = torch.addcmul(gates, gates, gates, value=-1)  # sigmoid' = s - s^2 of i, f, o: one pass
    c_i, c_f, c_g, c_o = coef.chunk(4, -1)
    torch.addcmul(one, g, g, value=-1, out=c_g)  # tanh' of g
    ext = dpre if dgates is None else (dgates * coef if dpre is None else torch.addcmul(dpre, dgates, coef))
    c_i.mul_(g)
    c_f.mul_(cs[:-1])
    c_g.mul_(i)
    c_o.mul_(tc)
    s_m = torch.addcmul(one, tc, tc, value=-1).mul_(o)
    return coef, s_m, ext


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, p: LayerParams) -> tuple[Tensor, Tensor, LayerRecord]:
    """An LSTM layer's states ``h_0..h_T``, ``c_0..c_T`` (each ``(B, T+1, H)``) and what its forward kept
    (:class:`LayerRecord`: iterate it for the activated gates ``(i, f, g, o)``, each ``(B, T, H)``), from
    batch-first ``x (B, T, I)``; no projection (``proj_size=0``). The outputs are views of time-major buffers.

    Examples
    --------
    >>> lstm = torch.nn.LSTM(2, 3, batch_first=True)
    >>> x = torch.randn(4, 5, 2)
    >>> p = LayerParams(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    >>> hs, cs, record = lstm_layer(x, torch.zeros(4, 3), torch.zeros(4, 3), p)
    >>> out, (h_T, c_T) = lstm(x)
    >>> bool(torch.allclose(hs[:, 1:], out, atol=1e-6)), bool(torch.allclose(cs[:, -1], c_T[0], atol=1e-6))
    (True, True)
    """
    if p.w_hr is not None:
        raise ValueError("lstm_layer has no projection: use torch's fused op for proj_size > 0")
    xt = x.transpose(0, 1).contiguous()
    hs, cs, gates, pre = _LSTMLayer.apply(xt, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh)
    return hs.transpose(0, 1), cs.transpose(0, 1), LayerRecord(hs, cs, gates, pre, None)
