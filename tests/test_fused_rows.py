"""``||J||_F^2`` of one GRU/LSTM layer from its gates (:mod:`rnnjac._fused_rows`) against the materialised Jacobian.

The reference is independent of the row form: the cell's linearisation materialised as ``(N, D, D)`` matrices and
squared entry by entry; derivatives by finite differences (gradcheck, gradgradcheck), over several row blocks.
"""

import pytest
import torch

import rnnjac._fused_rows as fused_rows
from rnnjac._cells import ARCHITECTURES, LayerParams, _rowgram
from rnnjac._linearization import FactoredLinearization, StateLayout


def _layer(arch, hidden=5, inp=3, seed=0):
    torch.manual_seed(seed)
    g = ARCHITECTURES[arch].n_gates
    w = [1.5 * torch.randn(g * hidden, n, dtype=torch.float64) for n in (inp, hidden)]
    b = [0.5 * torch.randn(g * hidden, dtype=torch.float64) for _ in range(2)]
    return LayerParams(*w, *b)


def _points(arch, p, n=9, seed=1):
    torch.manual_seed(seed)
    hidden, inp = p.w_hh.shape[1], p.w_ih.shape[1]
    x, h = torch.randn(n, inp, dtype=torch.float64), torch.randn(n, hidden, dtype=torch.float64)
    c = 2 * torch.randn(n, hidden, dtype=torch.float64) if arch == "lstm" else None
    return x, h, c


def _materialised(arch, p, x, h, c):
    """``||J||_F^2`` per point from the full ``(N, D, D)`` Jacobian of the step."""
    cell = ARCHITECTURES[arch]
    _, _, coef = cell.linearize(p, x, h, c)
    parts = [("h", h.shape[-1])] + ([("c", c.shape[-1])] if c is not None else [])
    s = torch.cat([h] + ([c] if c is not None else []), -1)
    lin = FactoredLinearization(cell, [p], StateLayout([parts]), s, x, [coef])
    return lin.materialize().pow(2).sum((-2, -1))


def _gate_inputs(arch, p, x, h, c):
    """The inputs of the fused rows, as the forward keeps them."""
    cell = ARCHITECTURES[arch]
    if arch == "gru":
        r, z, n, gh_n, _ = cell._forward(p, x, h)
        bordered = cell._bordered_gram(p)
        return (r, z, n, gh_n, h, bordered)
    i, f, g, o, _, _, c_new = cell._forward(p, x, h, c)
    return (i, f, g, o, c, c_new, _rowgram(p.w_hh, 4))


FUNCS = {"gru": fused_rows.gru_frobenius_rows, "lstm": fused_rows.lstm_frobenius_rows}


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_rows_equal_the_materialised_jacobian(arch, monkeypatch):
    monkeypatch.setattr(fused_rows, "_BLOCK_ELEMENTS", 12)  # blocks of 2 rows: 5 blocks for 9 points
    p = _layer(arch)
    x, h, c = _points(arch, p)
    got = FUNCS[arch](*_gate_inputs(arch, p, x, h, c))
    torch.testing.assert_close(got, _materialised(arch, p, x, h, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gradients_equal_those_of_the_materialised_jacobian(arch, monkeypatch):
    """Through the weights (via the Gram matrix and the gates) and the states: the hand-derived backward."""
    monkeypatch.setattr(fused_rows, "_BLOCK_ELEMENTS", 12)
    p = _layer(arch)
    params = [t.requires_grad_() for t in (p.w_ih, p.w_hh, p.b_ih, p.b_hh)]
    x, h, c = _points(arch, p)
    h.requires_grad_()
    weights = torch.rand(x.shape[0], dtype=torch.float64)
    got = torch.autograd.grad((FUNCS[arch](*_gate_inputs(arch, p, x, h, c)) * weights).sum(), [*params, h])
    want = torch.autograd.grad((_materialised(arch, p, x, h, c) * weights).sum(), [*params, h])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gradcheck_and_gradgradcheck(arch, monkeypatch):
    monkeypatch.setattr(fused_rows, "_BLOCK_ELEMENTS", 8)
    p = _layer(arch, hidden=3, inp=2)
    x, h, c = _points(arch, p, n=5)
    inputs = [t.detach().clone().requires_grad_() for t in _gate_inputs(arch, p, x, h, c)]
    gram = inputs[-1]
    with torch.no_grad():  # keep the Gram matrix symmetric under gradcheck's perturbations: symmetrise inside
        gram.copy_((gram + gram.transpose(1, 2)) / 2)

    def fn(*args):
        *gates, g = args
        return FUNCS[arch](*gates, (g + g.transpose(1, 2)) / 2)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
