"""Core: adapters, trajectories and Jacobians against independent references.

The reference Jacobian differentiates the *module's own forward* (one step at a time, with
``torch.autograd.functional.jacobian``), not rnnjac's Python step, so the closed forms, the Python
step and the autograd path are all checked against PyTorch itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import PROBLEMS, PROBLEMS_F32, SMALL, Problem, ids
from torch import nn

import rnnjac
from rnnjac._dynamics import as_dynamics


def module_step_reference(module: nn.Module, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Flat next state from the module's own forward, for one sample ``s (D,)``, ``x (I,)``."""
    dyn = as_dynamics(module)
    parts = dyn.split(s.unsqueeze(0))
    h0 = torch.stack([h for h, _ in parts])  # (L, 1, H)
    if isinstance(module, nn.LSTM):
        c0 = torch.stack([c for _, c in parts])
        _, (hn, cn) = module(x.view(1, 1, -1), (h0, c0))
        return dyn.join([(hn[i], cn[i]) for i in range(dyn.num_layers)]).squeeze(0)
    _, hn = module(x.view(1, 1, -1), h0)
    return dyn.join([(hn[i], None) for i in range(dyn.num_layers)]).squeeze(0)


def reference_jacobians(module, xs_bf, states):
    b, t = xs_bf.shape[:2]
    out = torch.empty(b, t, states.shape[-1], states.shape[-1], dtype=states.dtype)
    for i in range(b):
        for k in range(t):
            out[i, k] = torch.autograd.functional.jacobian(
                lambda s: module_step_reference(module, s, xs_bf[i, k]), states[i, k]
            )
    return out


def to_bf(problem, x):
    return x if problem.batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("problem", PROBLEMS, ids=ids(PROBLEMS))
def test_python_step_reproduces_module_outputs(problem):
    m, x = problem.module(), problem.inputs()
    states = rnnjac.trajectory(m, x)
    out, hn = m(x)
    out = to_bf(problem, out)
    dyn = as_dynamics(m)
    h_top = torch.stack([dyn.split(states[:, t])[-1][0] for t in range(1, states.shape[1])], 1)
    torch.testing.assert_close(h_top, out, rtol=1e-12, atol=1e-12)
    final = dyn.split(states[:, -1])
    hn, cn = hn if isinstance(hn, tuple) else (hn, None)
    torch.testing.assert_close(torch.stack([h for h, _ in final]), hn, rtol=1e-12, atol=1e-12)
    if cn is not None:
        torch.testing.assert_close(torch.stack([c for _, c in final]), cn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("problem", PROBLEMS, ids=ids(PROBLEMS))
def test_analytic_equals_reference_float64(problem):
    m, x = problem.module(), problem.inputs()
    states = rnnjac.trajectory(m, x)
    ref = reference_jacobians(m, to_bf(problem, x), states[:, :-1])
    analytic = rnnjac.jacobians(m, x, method="analytic")
    auto = rnnjac.jacobians(m, x, method="autograd")
    assert analytic.shape == ref.shape == (2, 4, states.shape[-1], states.shape[-1])
    torch.testing.assert_close(analytic, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(auto, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("problem", PROBLEMS_F32, ids=ids(PROBLEMS_F32))
def test_float32_analytic_agrees_with_autograd(problem):
    m, x = problem.module(), problem.inputs()
    analytic = rnnjac.jacobians(m, x)
    assert analytic.dtype == torch.float32
    torch.testing.assert_close(analytic, rnnjac.jacobians(m, x, method="autograd"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("problem", SMALL, ids=ids(SMALL))
def test_state_h_is_the_h_block_of_the_full_jacobian(problem):
    m, x = problem.module(), problem.inputs()
    full = rnnjac.jacobians(m, x)
    h = rnnjac.jacobians(m, x, state="h")
    idx = as_dynamics(m).h_index()
    torch.testing.assert_close(h, full[..., idx, :][..., idx])
    # independent check: differentiate the step in h with every c held at its recorded value
    states = rnnjac.trajectory(m, x)
    dyn = as_dynamics(m)
    s, xt = states[0, 2], x[0, 2]
    ref = torch.autograd.functional.jacobian(lambda hh: dyn.step(dyn.with_h(hh, s)[None], xt[None])[0][idx], s[idx])
    torch.testing.assert_close(h[0, 2], ref, rtol=0, atol=1e-12)


def test_multilayer_jacobian_is_block_lower_triangular():
    m = Problem("lstm", layers=3).module()
    j = rnnjac.jacobians(m, Problem("lstm").inputs())
    d = j.shape[-1] // 3
    for r in range(3):
        assert torch.all(j[..., r * d : (r + 1) * d, (r + 1) * d :] == 0)
        assert j[..., r * d : (r + 1) * d, : (r + 1) * d].abs().sum() > 0


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_cells(cls):
    torch.manual_seed(0)
    cell = cls(3, 4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    j = rnnjac.jacobians(cell, x)
    states = rnnjac.trajectory(cell, x)
    d = 8 if cls is nn.LSTMCell else 4
    assert j.shape == (2, 5, d, d)

    def f(s, xt):
        if cls is nn.LSTMCell:
            h, c = cell(xt, (s[:, :4], s[:, 4:]))
            return torch.cat([h, c], -1)
        return cell(xt, s)

    for t in range(5):
        torch.testing.assert_close(states[:, t + 1], f(states[:, t], x[:, t]))
        for b in range(2):
            ref = torch.autograd.functional.jacobian(lambda s: f(s[None], x[b : b + 1, t])[0], states[b, t])
            torch.testing.assert_close(j[b, t], ref, rtol=0, atol=1e-12)


def test_custom_cell_with_and_without_its_own_jacobian():
    torch.manual_seed(0)
    w = torch.randn(4, 4, dtype=torch.float64)
    u = torch.randn(4, 2, dtype=torch.float64)

    def step(s, x):
        return torch.tanh(s @ w.T + x @ u.T)

    def jac(s, x):
        a = 1 - step(s, x) ** 2
        return a.unsqueeze(-1) * w

    x = torch.randn(3, 6, 2, dtype=torch.float64)
    h0 = torch.randn(3, 4, dtype=torch.float64)
    by_autograd = rnnjac.jacobians(rnnjac.CustomCell(step), x, h0)
    by_bare_callable = rnnjac.jacobians(step, x, h0)
    by_own = rnnjac.jacobians(rnnjac.CustomCell(step, jacobian=jac), x, h0)
    torch.testing.assert_close(by_autograd, by_own, rtol=0, atol=1e-12)
    torch.testing.assert_close(by_bare_callable, by_autograd, rtol=0, atol=0)
    # and the same system as an nn.RNN with these weights
    rnn = nn.RNN(2, 4, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w)
        rnn.weight_ih_l0.copy_(u)
    torch.testing.assert_close(rnnjac.jacobians(rnn, x, h0[None]), by_own, rtol=0, atol=1e-12)


def test_iter_jacobians_chunks_equal_the_whole():
    p = Problem("gru", layers=2)
    m, x = p.module(), p.inputs(steps=11)
    whole = rnnjac.jacobians(m, x)
    seen = []
    for t0, chunk in rnnjac.iter_jacobians(m, x, time_chunk=3):
        torch.testing.assert_close(chunk, whole[:, t0 : t0 + chunk.shape[1]], rtol=0, atol=1e-14)
        seen.append((t0, chunk.shape[1]))
    assert seen == [(0, 3), (3, 3), (6, 3), (9, 2)]


def test_unbatched_inputs_and_h0_formats():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs(batch=1)
    h0 = torch.randn(2, 1, 5, dtype=torch.float64)
    c0 = torch.randn(2, 1, 5, dtype=torch.float64)
    j_tuple = rnnjac.jacobians(m, x, (h0, c0))
    flat = torch.cat([h0[0], c0[0], h0[1], c0[1]], -1)
    torch.testing.assert_close(rnnjac.jacobians(m, x, flat), j_tuple, rtol=0, atol=0)
    j_unb = rnnjac.jacobians(m, x[0], (h0[:, 0], c0[:, 0]))
    assert j_unb.shape == j_tuple.shape[1:]
    torch.testing.assert_close(j_unb, j_tuple[0], rtol=0, atol=0)
    # batch_first override: pass time-major data to a batch_first module
    jt = rnnjac.jacobians(m, x.transpose(0, 1), (h0, c0), batch_first=False)
    torch.testing.assert_close(jt, j_tuple, rtol=0, atol=0)


def test_jacobians_are_differentiable_wrt_parameters():
    p = Problem("gru")
    m, x = p.module(), p.inputs()
    j = rnnjac.jacobians(m, x)
    (g,) = torch.autograd.grad(j.pow(2).sum(), m.weight_hh_l0)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_dropout_is_ignored_eval_semantics():
    torch.manual_seed(0)
    m = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    m.eval()
    out, _ = m(x)
    m.train()
    states = rnnjac.trajectory(m, x)
    torch.testing.assert_close(states[:, 1:, 4:], out)


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(["rnn_tanh", "rnn_relu", "gru", "lstm"]),
    layers=st.integers(1, 3),
    hidden=st.integers(1, 6),
    input_size=st.integers(1, 4),
    bias=st.booleans(),
    proj=st.integers(0, 3),
    steps=st.integers(1, 4),
    batch=st.integers(1, 3),
)
def test_property_analytic_equals_autograd(arch, layers, hidden, input_size, bias, proj, steps, batch):
    proj = proj if arch == "lstm" and proj < hidden else 0
    p = Problem(arch, layers, bias, True, proj, torch.float64, input_size, hidden)
    m, x = p.module(), p.inputs(batch=batch, steps=steps)
    torch.testing.assert_close(rnnjac.jacobians(m, x), rnnjac.jacobians(m, x, method="autograd"), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    m = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"5 features .* input_size=3"):
        rnnjac.jacobians(m, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 4\)"):
        rnnjac.jacobians(m, x, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="bidirectional"):
        rnnjac.jacobians(nn.LSTM(3, 4, bidirectional=True), x)
    with pytest.raises(ValueError, match="method must be one of"):
        rnnjac.jacobians(m, x, method="magic")
    with pytest.raises(ValueError, match="state must be one of"):
        rnnjac.jacobians(m, x, state="c")
    with pytest.raises(TypeError, match="float64 but the model's weights are torch.float32"):
        rnnjac.jacobians(m, x.double())
    with pytest.raises(ValueError, match="got 4 dims"):
        rnnjac.jacobians(m, x[None])
    with pytest.raises(TypeError, match="expected nn.RNN"):
        rnnjac.jacobians(nn.Linear(3, 3), x)


def test_nonfinite_inputs_and_states_report_first_step():
    m = nn.RNN(3, 4, nonlinearity="relu", batch_first=True)
    x = torch.randn(2, 6, 3)
    x[1, 3, 0] = float("nan")
    with pytest.raises(rnnjac.NonFiniteError, match="t=4"):
        rnnjac.jacobians(m, x)
    with torch.no_grad():
        m.weight_hh_l0.copy_(torch.eye(4) * 1e30)
        m.bias_hh_l0.fill_(1e30)
    with pytest.raises(rnnjac.NonFiniteError, match=r"state becomes NaN/Inf at step t=2"):
        rnnjac.jacobians(m, torch.ones(2, 6, 3))


def test_custom_step_errors():
    h0 = torch.zeros(2, 3)
    x = torch.randn(2, 4, 1)
    with pytest.raises(ValueError, match="h0 is required"):
        rnnjac.jacobians(lambda s, x: s, x)
    with pytest.raises(ValueError, match=r"shape of s \(2, 3\); got \(2, 2\)"):
        rnnjac.jacobians(lambda s, x: s[:, :2], x, h0)
    with pytest.raises(ValueError, match="does not depend on its state argument s"):
        rnnjac.jacobians(lambda s, x: torch.tanh(x).expand(-1, 3).clone(), x, h0)
    with pytest.raises(ValueError, match="does not depend on its state argument s"):
        rnnjac.jacobians(lambda s, x: s.detach() * 2 + x, x, h0)
    with pytest.raises(ValueError, match="method='analytic' needs a closed form"):
        rnnjac.jacobians(lambda s, x: torch.tanh(s + x), x, h0, method="analytic")
    with pytest.raises(ValueError, match=r"jacobian\(s, x\) must return shape \(2, 3, 3\)"):
        rnnjac.jacobians(rnnjac.CustomCell(lambda s, x: torch.tanh(s + x), lambda s, x: s), x, h0)
