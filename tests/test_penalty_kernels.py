"""The closed forms behind the penalties at training speed (issue 14): ``J^T U`` of the factored linearisation
(against ``J`` materialised by autograd, and against the generic vjp), the h-only Jacobian of an LSTM stack (against
the autograd Jacobian's h block), the hand-written backward of the row quadratic forms (gradcheck/gradgradcheck),
and gradcheck/gradgradcheck of the penalties through them for RNN/GRU/LSTM x 1-3 layers x proj_size."""

from __future__ import annotations

import pytest
import torch
from problems import Problem

from rnnjac._cells import _rowgram, row_quadratic
from rnnjac._checks import prepare
from rnnjac._linearization import Linearization
from rnnjac.regularizers import forward_with_states, jacobian_penalty

F64 = torch.float64
CONFIGS = [(a, n, 0) for a in ("rnn_tanh", "gru", "lstm") for n in (1, 2, 3)] + [("lstm", n, 2) for n in (1, 2, 3)]


def _ids(c):
    return f"{c[0]}-L{c[1]}" + (f"-proj{c[2]}" if c[2] else "")


def _lin(arch, layers, proj, hidden=4):
    """A factored linearisation at a trajectory's points, and the autograd one (independent reference)."""
    p = Problem(arch, layers=layers, proj=proj, input_size=2, hidden=hidden)
    problem = prepare(p.module(seed=3), p.inputs(batch=3, steps=4, seed=4))
    dyn = problem.dyn
    s = dyn.run(problem.s0, problem.xs)[:, :-1].reshape(-1, dyn.state_size)
    x = problem.xs.reshape(s.shape[0], -1)
    return dyn.linearize(s, x), dyn.linearize(s, x, "autograd")


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("state", ["full", "h"])
def test_closed_form_transpose_and_h_jacobian(config, state):
    lin, ref = _lin(*config)
    assert lin.factored and not ref.factored
    jac = ref.materialize(state)  # autograd's J (its h block for state="h": c held fixed)
    torch.testing.assert_close(lin.materialize(state), jac, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    for k in (1, 3):
        u = torch.randn(jac.shape[0], jac.shape[-1], k, dtype=F64, generator=g)
        want = jac.transpose(-2, -1) @ u
        torch.testing.assert_close(lin.apply_transpose(u, state), want, rtol=1e-12, atol=1e-12)
        generic = Linearization.apply_transpose(lin, u, state)  # the vjp through torch.func
        torch.testing.assert_close(generic, want, rtol=1e-12, atol=1e-12)
        with torch.inference_mode():
            torch.testing.assert_close(lin.apply_transpose(u, state), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state", ["full", "h"])
def test_materialized_stack_is_differentiable_and_equal_without_autograd(state):
    """A stack's ``J`` is assembled from the rows of the layer below: copied under autograd (the GEMM saves them
    and ``J`` is written afterwards), read in place otherwise; both give the same ``J``, and gradients through it
    pass gradcheck (finite differences)."""
    p = Problem("lstm", layers=3, input_size=2, hidden=3)
    dyn = prepare(p.module(seed=3), p.inputs(batch=1, steps=2, seed=4)).dyn
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, dyn.state_size, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(2, 2, dtype=F64, generator=g)
    assert torch.autograd.gradcheck(lambda s: dyn.linearize(s, x).materialize(state), (s,))
    with torch.no_grad():
        plain = dyn.linearize(s, x).materialize(state)
    torch.testing.assert_close(plain, dyn.linearize(s, x).materialize(state).detach(), rtol=0, atol=0)


def test_h_jacobian_forms_no_c_column(monkeypatch):
    lin, _ = _lin("lstm", 2, 2)
    monkeypatch.setattr(type(lin.layout), "h_block", lambda self, j: pytest.fail("the full J was formed"))
    assert lin.materialize("h").shape == (12, 4, 4)  # 2 layers of proj_size 2


def test_row_quadratic_value_gradients_and_second_derivatives():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 3, dtype=F64, generator=g, requires_grad=True) for _ in range(4)]
    w = torch.randn(12, 6, dtype=F64, generator=g, requires_grad=True)  # the gram of 4 gate blocks of (3, 6) rows

    def f(w, *xs):
        return row_quadratic(list(xs), _rowgram(w, 4))

    x = torch.stack([t.detach() for t in xs], -1)  # (N, H, K)
    want = torch.einsum("nhk,hkm,nhm->nh", x, _rowgram(w.detach(), 4), x)
    torch.testing.assert_close(f(w, *xs), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, (w, *xs))
    assert torch.autograd.gradgradcheck(f, (w, *xs))
    with torch.no_grad():
        torch.testing.assert_close(f(w, *xs), want, rtol=1e-12, atol=1e-12)


def _penalty_fn(config, **kw):
    """The penalty as a function of the top layer's ``weight_hh`` and the inputs, through the shared forward."""
    arch, layers, proj = config
    p = Problem(arch, layers=layers, proj=proj, input_size=2, hidden=3)
    m, x = p.module(seed=3), p.inputs(batch=2, steps=3, seed=4).requires_grad_(True)
    name = f"weight_hh_l{layers - 1}"
    w = getattr(m, name).detach().clone().requires_grad_(True)

    def f(w, x):
        params = dict(m.named_parameters())
        params[name] = w
        with torch.nn.utils.stateless._reparametrize_module(m, params):
            _, states = forward_with_states(m, x)
            return jacobian_penalty(m, x, states=states, generator=torch.Generator().manual_seed(1), **kw)

    return m, f, w, x


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_gradcheck_and_gradgradcheck_of_the_penalties(config):
    for kw in ({}, {"estimator": "projection", "n_proj": 2}, {"time_stride": 2}):
        m, f, w, x = _penalty_fn(config, **kw)
        assert torch.autograd.gradcheck(f, (w, x)), kw
        if not kw:  # second derivatives through the row forms (inputs held fixed: the same graph, fewer evaluations)
            assert torch.autograd.gradgradcheck(lambda w: f(w, x.detach()), (w,))
        assert all(p.grad is None for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("config", [("gru", 2, 0), ("lstm", 2, 2)], ids=_ids)
def test_gradcheck_spectral_with_the_closed_form_transpose(config):
    # ||J v||^2 at the power-iteration vector v: the gradient of sigma_max^2 once v has converged
    m, f, w, x = _penalty_fn(config, kind="spectral", n_iter=200)
    x = x.detach()
    assert torch.autograd.gradcheck(lambda w: f(w, x), (w,), eps=1e-6, atol=1e-6)
    if config[0] == "lstm":
        m.eval()
        assert torch.autograd.gradcheck(lambda w: f(w, x), (w,), eps=1e-6, atol=1e-6)
