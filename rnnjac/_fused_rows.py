r"""``||J_t||_F^2`` of one GRU or LSTM layer straight from what its forward kept, forward and backward by hand.

The exact Frobenius penalty of a single layer is a sum over rows of small quadratic forms (:mod:`rnnjac._cells`:
``row_i = sum_k a_ki W_k[i, :] (+ diagonal terms)``, so ``||J||_F^2 = sum_i a_i^T G_i a_i`` with per-row Gram
matrices ``G_i`` of ``W_hh``'s gate blocks). The formulas, forward and backward, are plain functions in
:mod:`rnnjac._elementwise` (:func:`~rnnjac._elementwise.gru_gate_rows` and its hand-written
:func:`~rnnjac._elementwise.gru_gate_rows_vjp`, the same for the LSTM); this module runs them over the recorded
trajectory as one autograd Function per layer kind:

- they read what the layer's forward kept (:class:`rnnjac._recurrence.LayerRecord`, time-major) where it lies: the
  activated gates are reused, never recomputed;
- the backward's gradients are by the *pre-activations*, written into one ``(T, B, 4H)`` tensor in the layout of the
  layer's own backward (:mod:`rnnjac._recurrence`), so they join the backward recurrence with no conversion pass and
  no autograd glue (no slicing or concatenation of per-gate gradients);
- eagerly they run on chunks of steps small enough to stay in cache (the same values, several times fewer trips to
  memory); with ``compile=True`` each of the two functions is one ``torch.compile``d kernel over all steps.

A backward that must itself be differentiated (``create_graph=True``) falls back to autograd through
:func:`~rnnjac._elementwise.gru_pre_rows` / :func:`~rnnjac._elementwise.lstm_pre_rows` (the gates recomputed from the
pre-activations), so second derivatives stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._elementwise import (
    elementwise,
    entry_first,
    graph_vjp,
    gru_gate_rows,
    gru_gate_rows_vjp,
    gru_pre_rows,
    lstm_gate_rows,
    lstm_gate_rows_vjp,
    lstm_pre_rows,
)

__all__ = ["gru_frobenius_rows", "lstm_frobenius_rows"]

#: elements of one ``(steps, B, H)`` chunk in eager mode: 2**16 float32 values are 256 KiB, a few fit in L2
_BLOCK_ELEMENTS = 2**16


def _chunks(steps: slice, length: int, per_step: int, compile: bool) -> list[slice]:  # noqa: A002
    """The steps ``steps`` of ``range(length)`` in chunks of about ``_BLOCK_ELEMENTS / per_step`` steps (one
    chunk when compiled), each chunk a slice of time indices with the same stride."""
    start, stop, stride = steps.indices(length)
    count = len(range(start, stop, stride))
    per = max(1, count) if compile else max(1, _BLOCK_ELEMENTS // max(1, per_step))
    return [slice(start + k * stride, start + min(count, k + per) * stride, stride) for k in range(0, count, per)]


def _next(sl: slice) -> slice:
    return slice(sl.start + 1, sl.stop + 1, sl.step)


class _Rows(torch.autograd.Function):
    """``||J_t||_F^2`` ``(T', B)`` of a recorded layer; ``kind``: :data:`_GRU` or :data:`_LSTM`."""

    @staticmethod
    def forward(ctx, pre, states, gates, gram, steps, compile, kind):  # noqa: A002
        length, batch, hid = pre.shape[0], states.shape[1], states.shape[2]
        rows, gk = elementwise(kind.rows, compile), entry_first(gram)
        out = pre.new_empty(len(range(*steps.indices(length))), batch)
        done = 0
        for sl in _chunks(steps, length, batch * hid, compile):
            q = rows(*kind.inputs(pre, states, gates, sl), gk)
            out[done : done + q.shape[0]] = q
            done += q.shape[0]
        ctx.save_for_backward(pre, states, gates, gram)
        ctx.steps, ctx.compile, ctx.kind = steps, compile, kind
        return out

    @staticmethod
    def backward(ctx, grad):
        pre, states, gates, gram = ctx.saved_tensors
        steps, kind = ctx.steps, ctx.kind
        if torch.is_grad_enabled():  # double backward: differentiate the autograd composition
            wanted = [k for k in range(4) if ctx.needs_input_grad[k]]
            reference = lambda *a: kind.reference(*a, steps)  # noqa: E731
            return (*graph_vjp(reference, (pre, states, gates, gram), (grad,), wanted), None, None, None)
        length, batch, hid = pre.shape[0], states.shape[1], states.shape[2]
        compiled, gk = ctx.compile, entry_first(gram)
        every = steps.indices(length) == (0, length, 1)  # every step: every entry of dpre is written
        if compiled and every:  # one kernel writes the whole of dpre and of the states' gradient
            every_step = slice(0, length, 1)
            dpre, dstates, dgram = elementwise(kind.vjp_whole, True)(
                grad, *kind.inputs(pre, states, gates, every_step), gk
            )
            return dpre, dstates, None, dgram.permute(2, 0, 1), None, None, None
        vjp = elementwise(kind.vjp_joined if compiled else kind.vjp, compiled)
        dpre = (pre.new_empty if every else pre.new_zeros)(pre.shape)
        dstates, dgram, done = states.new_zeros(states.shape), gram.new_zeros(gk.shape), 0
        for sl in _chunks(steps, length, batch * hid, compiled):
            w = grad[done : done + len(range(*sl.indices(length)))]
            done += w.shape[0]
            blocks, *dst, dg = vjp(w, *kind.inputs(pre, states, gates, sl), gk)
            if compiled or sl.step != 1:
                dpre[sl] = blocks if compiled else torch.cat(blocks, -1)
            else:
                torch.cat(blocks, -1, out=dpre[sl])  # a contiguous run of steps: written in place
            kind.add_state_grads(dstates, sl, dst)
            dgram += dg
        return dpre, dstates, None, dgram.permute(2, 0, 1), None, None, None


def _joined(vjp):
    """``vjp`` with its four gradient blocks joined into one ``(..., 4H)`` tensor: compiled, one kernel writes it."""

    def joined(*args):
        blocks, *rest = vjp(*args)
        return (torch.cat(blocks, -1), *rest)

    joined.__name__ = f"{vjp.__name__}_joined"
    return joined


def _gru_vjp_whole(*args):
    """:func:`~rnnjac._elementwise.gru_gate_rows_vjp` over every step: ``dpre (T, B, 4H)`` and ``dhs (T+1, B, H)``
    (the last state enters no row: a zero row) as whole tensors, for one compiled kernel to write."""
    blocks, dh, dgram = gru_gate_rows_vjp(*args)
    return torch.cat(blocks, -1), torch.nn.functional.pad(dh, (0, 0, 0, 0, 0, 1)), dgram


def _lstm_vjp_whole(*args):
    """:func:`~rnnjac._elementwise.lstm_gate_rows_vjp` over every step, as :func:`_gru_vjp_whole`: ``dcs`` joins
    the gradients by ``c_t`` (rows ``0..T-1``) and by ``c_new = c_{t+1}`` (rows ``1..T``)."""
    blocks, dc, dc_new, dgram = lstm_gate_rows_vjp(*args)
    pad = torch.nn.functional.pad
    return torch.cat(blocks, -1), pad(dc, (0, 0, 0, 0, 0, 1)) + pad(dc_new, (0, 0, 0, 0, 1, 0)), dgram


class _GRU:
    rows, vjp = staticmethod(gru_gate_rows), staticmethod(gru_gate_rows_vjp)
    vjp_joined, vjp_whole = staticmethod(_joined(gru_gate_rows_vjp)), staticmethod(_gru_vjp_whole)

    @staticmethod
    def inputs(pre, hs, gates, sl):
        """One chunk's ``r, z, n, gh_n, h``, each ``(steps, B, H)``: views where the forward wrote them."""
        hid = hs.shape[-1]
        g, p = gates[sl], pre[sl]
        return g[..., :hid], g[..., hid : 2 * hid], g[..., 2 * hid :], p[..., 2 * hid : 3 * hid], hs[sl]

    @staticmethod
    def add_state_grads(dhs, sl, grads):
        dhs[sl] += grads[0]

    @staticmethod
    def reference(pre, hs, gates, gram, steps):
        return gru_pre_rows(pre[steps], hs[:-1][steps], entry_first(gram))


class _LSTM:
    rows, vjp = staticmethod(lstm_gate_rows), staticmethod(lstm_gate_rows_vjp)
    vjp_joined, vjp_whole = staticmethod(_joined(lstm_gate_rows_vjp)), staticmethod(_lstm_vjp_whole)

    @staticmethod
    def inputs(pre, cs, gates, sl):
        """One chunk's ``i, f, g, o, c, c_new``, each ``(steps, B, H)`` (views)."""
        return (*gates[sl].chunk(4, -1), cs[sl], cs[_next(sl)])

    @staticmethod
    def add_state_grads(dcs, sl, grads):
        dcs[sl] += grads[0]
        dcs[_next(sl)] += grads[1]

    @staticmethod
    def reference(pre, cs, gates, gram, steps):
        return lstm_pre_rows(pre[steps], cs[:-1][steps], cs[1:][steps], entry_first(gram))


def gru_frobenius_rows(
    pre: Tensor,
    hs: Tensor,
    gates: Tensor,
    gram: Tensor,
    steps: slice = slice(None),
    *,
    compile: bool = False,  # noqa: A002
) -> Tensor:
    """``||J_t||_F^2`` ``(T', B)`` at the steps ``steps`` of one GRU layer from what its forward kept
    (:class:`rnnjac._recurrence.LayerRecord`, time-major): the pre-activations ``pre (T, B, 4H)`` (blocks r, z,
    hidden n, input n), the states ``hs (T+1, B, H)`` and the activated gates ``gates (T, B, 3H)`` (their values
    only: no gradient reaches them), with the bordered row Gram ``(H, 4, 4)`` of
    :meth:`rnnjac._cells.GRUArch.frobenius_sq`; differentiable in ``pre``, ``hs`` and ``gram``. ``compile=True``:
    through ``torch.compile`` (:func:`rnnjac._elementwise.elementwise`).

    Examples
    --------
    >>> pre = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]])  # r = z = 1/2, n = tanh(0) = 0
    >>> gates, hs = torch.tensor([[[0.5, 0.5, 0.0]]]), torch.ones(2, 1, 1)
    >>> gram = torch.eye(4).expand(1, 4, 4)
    >>> gru_frobenius_rows(pre, hs, gates, gram).tolist()  # a_z = 0.25, a_hn = 0.25, z = 0.5
    [[0.375]]
    """
    return _Rows.apply(pre, hs, gates.detach(), gram, steps, compile, _GRU)


def lstm_frobenius_rows(
    pre: Tensor,
    cs: Tensor,
    gates: Tensor,
    gram: Tensor,
    steps: slice = slice(None),
    *,
    compile: bool = False,  # noqa: A002
) -> Tensor:
    """``||J_t||_F^2`` ``(T', B)`` at the steps ``steps`` of one LSTM layer without projection from what its
    forward kept (:class:`rnnjac._recurrence.LayerRecord`, time-major): the pre-activations ``pre (T, B, 4H)``,
    the cell states ``cs (T+1, B, H)`` and the activated gates ``gates (T, B, 4H)`` (values only), with the row
    Gram ``(H, 4, 4)`` of ``W_hh``'s gate blocks (:meth:`rnnjac._cells.LSTMArch.frobenius_sq`); differentiable in
    ``pre``, ``cs`` and ``gram``.

    Examples
    --------
    >>> pre, cs = torch.zeros(1, 1, 4), torch.zeros(2, 1, 1)  # i = f = o = 1/2, g = 0, c = c_new = 0
    >>> gates = torch.tensor([[[0.5, 0.5, 0.0, 0.5]]])
    >>> lstm_frobenius_rows(pre, cs, gates, torch.eye(4).expand(1, 4, 4)).tolist()
    [[0.625]]
    """
    return _Rows.apply(pre, cs, gates.detach(), gram, steps, compile, _LSTM)
