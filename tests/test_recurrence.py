"""The GRU/LSTM layers that return their gates (:mod:`rnnjac._recurrence`) against torch's own modules.

References: the states against ``nn.GRU``/``nn.LSTM``'s forward, the gradients of a loss on the states against
autograd through those modules, the gates against the layer formulas evaluated on the recorded states, and every
derivative (first and second order, including gradients that enter through the gates) by finite differences.
"""

import pytest
import torch
from torch import nn

from rnnjac._builtin_system import builtin_system
from rnnjac._cells import ARCHITECTURES, LayerParams
from rnnjac._recurrence import gru_layer, lstm_layer

MODULES = {"gru": nn.GRU, "lstm": nn.LSTM}


def _params(m) -> LayerParams:
    return LayerParams(m.weight_ih_l0, m.weight_hh_l0, getattr(m, "bias_ih_l0", None), getattr(m, "bias_hh_l0", None))


def _setup(arch, bias=True, dtype=torch.float64, batch=3, steps=5, inp=2, hidden=4, seed=0):
    torch.manual_seed(seed)
    m = MODULES[arch](inp, hidden, batch_first=True, bias=bias).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)  # away from the linear regime: saturating gates, tanh' well below 1
    x = torch.randn(batch, steps, inp, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, hidden, dtype=dtype, requires_grad=True)
    c0 = torch.randn(batch, hidden, dtype=dtype, requires_grad=True)
    return m, x, h0, c0


def _run(arch, m, x, h0, c0, params=None):
    """``(states..., gates...)`` of the layer as a flat tuple of tensors."""
    p = _params(m) if params is None else params
    if arch == "gru":
        hs, gates = gru_layer(x, h0, p)
        return (hs, *gates)
    hs, cs, gates = lstm_layer(x, h0, c0, p)
    return (hs, cs, *gates)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_states_and_state_gradients_equal_the_modules(arch, bias):
    m, x, h0, c0 = _setup(arch, bias)
    outs = _run(arch, m, x, h0, c0)
    hx = h0[None] if arch == "gru" else (h0[None], c0[None])
    want, last = m(x, hx)
    torch.testing.assert_close(outs[0][:, 1:], want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(outs[0][:, 0], h0, rtol=0, atol=0)
    if arch == "lstm":
        torch.testing.assert_close(outs[1][:, -1], last[1][0], rtol=1e-13, atol=1e-13)
    weights = torch.randn_like(want)
    inputs = [x, h0, *m.parameters()] + ([c0] if arch == "lstm" else [])
    got = torch.autograd.grad((outs[0][:, 1:] * weights).sum(), inputs, allow_unused=True)
    ref = torch.autograd.grad((want * weights).sum(), inputs, allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gates_are_the_layer_formulas_at_the_recorded_states(arch):
    m, x, h0, c0 = _setup(arch)
    outs = _run(arch, m, x, h0, c0)
    cell, p = ARCHITECTURES[arch], _params(m)
    hs = outs[0]
    for t in range(x.shape[1]):
        if arch == "gru":
            r, z, n, gh_n, _ = cell._forward(p, x[:, t], hs[:, t])
            want = (r, z, n, gh_n)
        else:
            i, f, g, o, *_ = cell._forward(p, x[:, t], hs[:, t], outs[1][:, t])
            want = (i, f, g, o)
        for got_k, want_k in zip(outs[-4:], want, strict=True):
            torch.testing.assert_close(got_k[:, t], want_k, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gradcheck_and_gradgradcheck_through_states_and_gates(arch, bias):
    """Gradients entering through every output (states and gates: what a penalty sends back) are exact, and so are
    second derivatives (the double backward differentiates a step loop of the same layer)."""
    m, x, h0, c0 = _setup(arch, bias, batch=2, steps=3, hidden=3)
    weights = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, h0, c0, *w):
        params = LayerParams(*w) if bias else LayerParams(*w, None, None)
        return _run(arch, m, x, h0, c0, params)

    inputs = (x, h0, c0, *weights)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_unused_outputs_and_inputs_without_grad(arch):
    """A loss on the states alone gives the gradients of zero gate gradients; inputs that need no gradient get none."""
    m, x, h0, c0 = _setup(arch)
    outs = _run(arch, m, x, h0, c0)
    params = list(m.parameters())
    alone = torch.autograd.grad(outs[0].pow(2).sum(), params)
    outs = _run(arch, m, x, h0, c0)
    zero_gates = outs[0].pow(2).sum() + sum((0.0 * g).sum() for g in outs[1:])
    with_zeros = torch.autograd.grad(zero_gates, params)
    for a, b in zip(alone, with_zeros, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    x_plain, h_plain = x.detach(), h0.detach()
    outs = _run(arch, m, x_plain, h_plain, c0.detach())
    outs[0].sum().backward()
    assert x_plain.grad is None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_float32_matches_the_module(arch):
    m, x, h0, c0 = _setup(arch, dtype=torch.float32, batch=4, steps=20, hidden=16)
    hx = h0[None] if arch == "gru" else (h0[None], c0[None])
    torch.testing.assert_close(_run(arch, m, x, h0, c0)[0][:, 1:], m(x, hx)[0], rtol=1e-5, atol=1e-5)


def test_which_layers_run_the_gated_loop():
    """CPU GRU and LSTM layers run the loop (their gates come with the states); an LSTM projection and plain RNNs
    keep torch's fused op (they need no gates, or the loop has no projection)."""
    x = torch.randn(2, 3, 2)
    expect = {
        nn.GRU(2, 3, num_layers=2): True,
        nn.LSTM(2, 3): True,
        nn.LSTM(2, 3, proj_size=2): False,
        nn.RNN(2, 3): False,
    }
    for module, loop in expect.items():
        system = builtin_system(module)
        assert all(system._gated_loop(p, x) is loop for p in system.layers), module
    with pytest.raises(ValueError, match="no projection"):
        lstm = nn.LSTM(2, 3, proj_size=2)
        lstm_layer(x, torch.zeros(2, 2), torch.zeros(2, 3), builtin_system(lstm).layers[0])


@pytest.mark.parametrize("which", ["input bias only", "hidden bias only"])
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_one_of_the_two_biases(arch, which):
    """A hand-built layer with only one of the two biases: states and their gradients equal the module's with the
    other bias set to zero (torch's modules always have both or neither)."""
    m, x, h0, c0 = _setup(arch)
    drop = "bias_hh_l0" if which == "input bias only" else "bias_ih_l0"
    with torch.no_grad():
        getattr(m, drop).zero_()
    p = _params(m)
    p = LayerParams(p.w_ih, p.w_hh, None if drop == "bias_ih_l0" else p.b_ih, None if drop == "bias_hh_l0" else p.b_hh)
    got = _run(arch, m, x, h0, c0, p)[: 2 if arch == "lstm" else 1]
    want_out, final = m(x, h0[None] if arch == "gru" else (h0[None], c0[None]))
    torch.testing.assert_close(got[0][:, 1:], want_out, rtol=1e-12, atol=1e-12)
    if arch == "lstm":
        torch.testing.assert_close(got[1][:, -1], final[1][0], rtol=1e-12, atol=1e-12)
    kept = [t for t in (x, h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh) if t is not None]
    g_got = torch.autograd.grad(got[0][:, 1:].pow(2).sum(), kept)
    g_want = torch.autograd.grad(want_out.pow(2).sum(), kept)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
