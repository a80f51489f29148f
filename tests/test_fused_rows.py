"""``||J||_F^2`` of one GRU/LSTM layer from what its forward kept (:mod:`rnnjac._fused_rows`) against the
materialised Jacobian.

The reference is independent of the row form: the cell's linearisation at the recorded states, materialised as
``(N, D, D)`` matrices and squared entry by entry; derivatives through the whole layer (the rows' gradients by the
pre-activations join the layer's backward) against autograd through that reference, and by finite differences
(gradcheck, gradgradcheck), over several row blocks and with strided steps.
"""

import pytest
import torch

import rnnjac._fused_rows as fused_rows
from rnnjac._cells import ARCHITECTURES, LayerParams, _rowgram
from rnnjac._linearization import FactoredLinearization, StateLayout
from rnnjac._recurrence import gru_layer, lstm_layer

STEPS = [slice(None), slice(1, None, 2), slice(2, 4)]


def _layer(arch, hidden=5, inp=3, seed=0):
    torch.manual_seed(seed)
    g = ARCHITECTURES[arch].n_gates
    w = [1.5 * torch.randn(g * hidden, n, dtype=torch.float64) for n in (inp, hidden)]
    b = [0.5 * torch.randn(g * hidden, dtype=torch.float64) for _ in range(2)]
    return LayerParams(*[t.requires_grad_() for t in (*w, *b)])


def _inputs(p, batch=3, steps=5, seed=1):
    torch.manual_seed(seed)
    hidden, inp = p.w_hh.shape[1], p.w_ih.shape[1]
    x = torch.randn(batch, steps, inp, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
    c0 = 2 * torch.randn(batch, hidden, dtype=torch.float64)
    return x, h0, c0


def _record(arch, p, x, h0, c0):
    return gru_layer(x, h0, p)[1] if arch == "gru" else lstm_layer(x, h0, c0, p)[2]


def _fused(arch, p, record, steps, compile=False):  # noqa: A002
    if arch == "gru":
        gram = ARCHITECTURES["gru"]._bordered_gram(p)
        return fused_rows.gru_frobenius_rows(record.pre, record.hs, record.gates, gram, steps, compile=compile)
    gram = _rowgram(p.w_hh, 4)
    return fused_rows.lstm_frobenius_rows(record.pre, record.cs, record.gates, gram, steps, compile=compile)


def _materialised(arch, p, x, record, steps):
    """``||J_t||_F^2`` ``(T', B)`` from the full ``(N, D, D)`` Jacobian of each recorded step."""
    cell = ARCHITECTURES[arch]
    xs = x.transpose(0, 1)[steps]
    h = record.hs[:-1][steps]
    c = None if record.cs is None else record.cs[:-1][steps]
    lead = xs.shape[:2]
    flat = [None if t is None else t.reshape(-1, t.shape[-1]) for t in (xs, h, c)]
    _, _, coef = cell.linearize(p, *flat)
    parts = [("h", h.shape[-1])] + ([("c", c.shape[-1])] if c is not None else [])
    s = torch.cat([t for t in flat[1:] if t is not None], -1)
    lin = FactoredLinearization(cell, [p], StateLayout([parts]), s, flat[0], [coef])
    return lin.materialize().pow(2).sum((-2, -1)).reshape(lead)


@pytest.mark.parametrize("steps", STEPS, ids=["all", "odd", "two"])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_rows_and_gradients_equal_those_of_the_materialised_jacobian(arch, steps, monkeypatch):
    """Values, and gradients by the weights, inputs and initial state through the layer's forward and backward."""
    monkeypatch.setattr(fused_rows, "_BLOCK_ELEMENTS", 12)  # chunks of one step (B=3, H=5): several chunks
    p = _layer(arch)
    x, h0, c0 = _inputs(p)
    record = _record(arch, p, x, h0, c0)
    got = _fused(arch, p, record, steps)
    want = _materialised(arch, p, x, record, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.rand_like(want)
    wrt = [p.w_ih, p.w_hh, p.b_ih, p.b_hh, x, h0]
    g_got = torch.autograd.grad((got * weights).sum(), wrt, retain_graph=True)
    g_want = torch.autograd.grad((_materialised(arch, p, x, record, steps) * weights).sum(), wrt)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [slice(None), slice(0, 100), slice(None, None, 2), slice(3, 1)], ids=str)
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_compiled_branches_run_eagerly_equal_the_materialised_jacobian(arch, steps, monkeypatch):
    """The ``compile=True`` code paths (one chunk of every step, whole-tensor gradients, or the joined gradient
    blocks of a strided selection) with ``torch.compile`` replaced by the identity: open-ended, overlong, strided
    and empty step selections."""
    monkeypatch.setattr(fused_rows, "elementwise", lambda fn, compile: fn)
    p = _layer(arch)
    x, h0, c0 = _inputs(p)
    record = _record(arch, p, x, h0, c0)
    got = _fused(arch, p, record, steps, compile=True)
    want = _materialised(arch, p, x, record, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if got.numel():
        weights = torch.rand_like(want)
        wrt = [p.w_hh, p.b_ih, x, h0]
        g_got = torch.autograd.grad((got * weights).sum(), wrt, retain_graph=True)
        g_want = torch.autograd.grad((want * weights).sum(), wrt)
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gradcheck_and_gradgradcheck_through_the_layer(arch, monkeypatch):
    monkeypatch.setattr(fused_rows, "_BLOCK_ELEMENTS", 6)
    p = _layer(arch, hidden=3, inp=2)
    x, h0, c0 = _inputs(p, batch=2, steps=3)

    def fn(w_hh, b_hh, x):
        q = LayerParams(p.w_ih, w_hh, p.b_ih, b_hh)
        return _fused(arch, q, _record(arch, q, x, h0, c0), slice(0, None, 2))

    args = (p.w_hh.detach().clone().requires_grad_(), p.b_hh.detach().clone().requires_grad_(), x)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
