"""Penalties at training speed: fused states for every layer count, the shared forward (``forward_with_states``),
the stacked Frobenius form and the LSTM cell-state scan, each against an independent reference: the same model as
a :class:`rnnjac.CustomCell` stepping its own ``step`` (trajectory step by step, Jacobians by autograd)."""

from __future__ import annotations

import pytest
import torch
from problems import Problem
from torch import nn

import rnnjac
from rnnjac._checks import prepare
from rnnjac._elementwise import linear_recurrence
from rnnjac.regularizers import JacobianPenalty, forward_with_states, jacobian_penalty, lyapunov_penalty

F64 = torch.float64
CONFIGS = [(a, layers, proj) for a in ("rnn_tanh", "gru", "lstm") for layers in (1, 2, 3) for proj in (0, 2)]
CONFIGS = [c for c in CONFIGS if c[2] == 0 or c[0] == "lstm"]


def _ids(c):
    return f"{c[0]}-L{c[1]}" + (f"-proj{c[2]}" if c[2] else "")


def _setup(arch, layers, proj, batch_first=True):
    p = Problem(arch, layers=layers, proj=proj, batch_first=batch_first, input_size=2, hidden=4)
    return p.module(seed=3), p.inputs(batch=3, steps=6, seed=4)


def _reference(model, x, fn, **kw):
    """``fn`` on the model's step as a custom cell: trajectory by the step loop, Jacobians by autograd."""
    problem = prepare(model, x)
    dyn = problem.dyn
    cell = rnnjac.CustomCell(lambda s, xt: dyn.step(s, xt))
    xs = problem.xs if model.batch_first else problem.xs.transpose(0, 1)
    return fn(cell, xs, problem.s0, batch_first=model.batch_first, **kw)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_fused_states_equal_the_step_loop(config):
    m, x = _setup(*config)
    problem = prepare(m, x)
    want = problem.dyn.run(problem.s0, problem.xs)
    torch.testing.assert_close(problem.dyn.fused_states(problem.s0, problem.xs), want, rtol=1e-10, atol=1e-10)
    out, states = forward_with_states(m, x)
    torch.testing.assert_close(states, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, m(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("stride", [1, 2])
def test_frobenius_values_and_gradients_equal_the_reference(config, stride):
    m, x = _setup(*config)
    _, states = forward_with_states(m, x)
    got = jacobian_penalty(m, x, states=states, time_stride=stride)
    want = _reference(m, x, jacobian_penalty, time_stride=stride)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = list(m.parameters())
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("config", [("gru", 2, 0), ("lstm", 2, 2), ("lstm", 3, 0)], ids=_ids)
def test_spectral_end_to_end_and_lyapunov_equal_the_reference(config):
    m, x = _setup(*config)
    _, states = forward_with_states(m, x)
    for fn, kw in (
        (jacobian_penalty, {"kind": "spectral", "n_iter": 4}),
        (jacobian_penalty, {"kind": "frobenius", "estimator": "projection", "n_proj": 2}),
        (jacobian_penalty, {"kind": "end_to_end"}),
        (lyapunov_penalty, {"k": 2, "warmup": 1}),
    ):
        got = fn(m, x, states=states, generator=torch.Generator().manual_seed(5), **kw)
        want = _reference(m, x, fn, generator=torch.Generator().manual_seed(5), **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"{fn.__name__} {kw}")
        torch.testing.assert_close(fn(m, x, generator=torch.Generator().manual_seed(5), **kw), want)


@pytest.mark.parametrize("state", ["h", "full"])
def test_lstm_h_state_and_time_major_unbatched(state):
    m, x = _setup("lstm", 2, 0, batch_first=False)
    out, states = forward_with_states(m, x)
    torch.testing.assert_close(out, m(x)[0], rtol=1e-10, atol=1e-10)
    got = jacobian_penalty(m, x, states=states, state=state)
    problem = prepare(m, x)  # reference: the step loop, J by autograd, its h block (c held fixed)
    s = problem.dyn.run(problem.s0, problem.xs)[:, :-1]
    lin = problem.dyn.linearize(s.reshape(-1, s.shape[-1]), problem.xs.reshape(-1, 2), method="autograd")
    want = lin.materialize(state).pow(2).sum((-2, -1)).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    x1 = x[:, 0]
    out1, states1 = forward_with_states(m, x1)
    assert states1.shape == (1, x1.shape[0] + 1, 16)
    torch.testing.assert_close(out1, m(x1)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", [("gru", 2, 0), ("lstm", 2, 2), ("rnn_tanh", 3, 0)], ids=_ids)
def test_gradcheck_through_the_fused_states(config):
    m, x = _setup(*config)
    x = x[:2, :3].clone().requires_grad_(True)
    top = f"weight_hh_l{config[1] - 1}"
    w = m.weight_ih_l1.detach().clone().requires_grad_(True)

    def f(w, x):
        params = {name: t for name, t in m.named_parameters()}
        params["weight_ih_l1"] = w
        with torch.nn.utils.stateless._reparametrize_module(m, params):
            _, states = forward_with_states(m, x)
            return jacobian_penalty(m, x, states=states)

    assert torch.autograd.gradcheck(f, (w, x))
    assert torch.autograd.gradgradcheck(f, (w, x))
    assert getattr(m, top).grad is None


def test_grad_untouched_and_train_eval_modes():
    m, x = _setup("lstm", 2, 0)
    m.dropout = 0.3
    with pytest.raises(ValueError, match="dropout=0.3.*call model.eval()"):
        forward_with_states(m, x)
    m.eval()
    out, states = forward_with_states(m, x)
    pen = JacobianPenalty("frobenius", weight=2.0)(m, x, states=states)
    assert all(p.grad is None for p in m.parameters())
    torch.testing.assert_close(pen, 2.0 * _reference(m, x, jacobian_penalty), rtol=1e-10, atol=1e-10)
    (out.sum() + pen).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_states_errors():
    m, x = _setup("gru", 2, 0)
    out, states = forward_with_states(m, x)
    with pytest.raises(ValueError, match=r"states must be the \(B, T\+1, D\)"):
        jacobian_penalty(m, x, states=states[:, 1:])
    with pytest.raises(ValueError, match="not both"):
        jacobian_penalty(m, x, states=states, outputs=out)
    with pytest.raises(ValueError, match="initial state of h0"):
        jacobian_penalty(m, x, torch.ones(2, 3, 4, dtype=F64), states=states)
    with pytest.raises(TypeError, match="nn.RNN, nn.GRU or nn.LSTM"):
        forward_with_states(nn.GRUCell(2, 4), x[:, 0])
    with pytest.raises(ValueError, match="leave h0=None, outputs=None, states=None"):
        JacobianPenalty("input_output")(m, x, states=states)


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("method", ["loop", "scan"])
def test_linear_recurrence_equals_the_plain_loop(method, steps):
    """Both methods (the scan is the GPU default) against a loop written here, values and gradients by ``f``, ``u``
    and ``c_0``, with forget gates at 0, at 1 and next to 1; the scan's hand-written backward is differentiable
    again (gradgradcheck)."""
    g = torch.Generator().manual_seed(steps)
    f = torch.rand(3, steps, 4, dtype=F64, generator=g)
    f[0, steps // 2], f[1, -1], f[2] = 0.0, 1.0, 1.0 - 1e-12  # forget gates at 0, at 1, and next to 1
    f.requires_grad_(True)
    u = torch.randn(3, steps, 4, dtype=F64, generator=g, requires_grad=True)
    c0 = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
    cs, c = [c0], c0
    for t in range(steps):
        c = f[:, t] * c + u[:, t]
        cs.append(c)
    want = torch.stack(cs, 1)
    got = linear_recurrence(f, u, c0, method=method)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(want.shape, dtype=F64, generator=g)
    g_got, g_want = torch.autograd.grad((got * w).sum(), (f, u, c0)), torch.autograd.grad((want * w).sum(), (f, u, c0))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if method == "scan" and steps in (5, 16):
        small = (f.detach()[:2, :, :2].requires_grad_(), u.detach()[:2, :, :2].requires_grad_(), c0.detach()[:2, :2])
        assert torch.autograd.gradgradcheck(lambda *a: linear_recurrence(*a, method="scan"), (*small[:2], small[2]))
    with pytest.raises(ValueError, match="method must be 'loop' or 'scan'; got 'blocked'"):
        linear_recurrence(f, u, c0, method="blocked")


@pytest.mark.parametrize("method", ["loop", "scan"])
def test_linear_recurrence_of_no_step(method):
    """T = 0: the only output is ``c_0``, whose gradient is the incoming one (the scan's backward took an index of
    the empty time axis)."""
    f, u = (torch.rand(2, 0, 3, dtype=F64, requires_grad=True) for _ in range(2))
    c0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    got = linear_recurrence(f, u, c0, method=method)
    torch.testing.assert_close(got, c0.unsqueeze(1), rtol=0, atol=0)
    w = torch.randn(2, 1, 3, dtype=F64)
    (got * w).sum().backward()
    torch.testing.assert_close(c0.grad, w[:, 0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own imports
def test_linear_recurrence_scan_under_torch_func():
    """The scan's autograd Function works under torch.func (forward-mode jvp, vmap, grad) as the loop does."""
    g = torch.Generator().manual_seed(3)
    f, u = torch.rand(2, 3, 9, 4, dtype=F64, generator=g), torch.randn(2, 3, 9, 4, dtype=F64, generator=g)
    c0 = torch.randn(2, 3, 4, dtype=F64, generator=g)
    loop, scan = (lambda *a, m=m: linear_recurrence(*a, method=m) for m in ("loop", "scan"))
    tangents = tuple(torch.randn_like(t) for t in (f[0], u[0], c0[0]))
    want, got = torch.func.jvp(loop, (f[0], u[0], c0[0]), tangents), torch.func.jvp(scan, (f[0], u[0], c0[0]), tangents)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(scan)(f, u, c0), torch.func.vmap(loop)(f, u, c0), rtol=1e-12, atol=1e-12)
    grads = [torch.func.grad(lambda f, fn=fn: fn(f, u[0], c0[0]).pow(2).sum())(f[0]) for fn in (loop, scan)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["gru", "lstm", "rnn_tanh"])
def test_spectral_power_iterations_in_a_cheaper_dtype(arch):
    """``power_dtype``: the power iterations (the direction only) run in float32 for a float64 model; the value is
    still a Rayleigh quotient of the exact ``J^T J`` in float64, so it lies below the largest squared singular
    value of the materialised Jacobian, and it equals the float64 iterations' value from the same starts up to the
    second-order effect of rounding the direction."""
    m, x = _setup(arch, 1, 0)
    _, states = forward_with_states(m, x)
    j = rnnjac.jacobians(m, x)  # (B, T, D, D), float64, closed form
    top = torch.linalg.svdvals(j).amax(-1).pow(2).mean()

    def kw():  # the same random starts for every call
        return {"kind": "spectral", "n_iter": 60, "states": states, "generator": torch.Generator().manual_seed(0)}

    rounded = jacobian_penalty(m, x, power_dtype=torch.float32, **kw())
    assert rounded.dtype == torch.float64
    assert rounded <= top * (1 + 1e-12)
    full = jacobian_penalty(m, x, **kw())
    torch.testing.assert_close(rounded, full, rtol=1e-7, atol=0)
    torch.testing.assert_close(full, top, rtol=1e-3, atol=0)  # (some steps' top two singular values are close)
    (g,) = torch.autograd.grad(rounded, [m.weight_hh_l0])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    same = jacobian_penalty(m, x, power_dtype=torch.float64, **kw())  # the states' own dtype: no conversion at all
    torch.testing.assert_close(same, full, rtol=0, atol=0)
    pen = JacobianPenalty("spectral", power_dtype=torch.bfloat16, n_iter=3)(m, x, states=states)
    assert 0 < pen <= top * (1 + 1e-12)
    with pytest.raises(TypeError, match="power_dtype must be a floating torch.dtype .* got torch.int32"):
        jacobian_penalty(m, x, kind="spectral", power_dtype=torch.int32)
    with pytest.raises(ValueError, match="power_dtype applies to kind='spectral' .* got kind='frobenius'"):
        jacobian_penalty(m, x, power_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- edges found by a review
@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_shared_forward_under_inference_mode(arch):
    """``forward_with_states`` under ``torch.inference_mode`` (Lightning's validation and test steps): it raised on
    the inference tensor's missing version counter when keeping the gates. It now keeps none there and gives the
    outputs and the penalty of ``no_grad``."""
    m, x = _setup(arch, 2, 0)
    with torch.no_grad():
        out, states = forward_with_states(m, x)
        want = jacobian_penalty(m, x, states=states)
    with torch.inference_mode():
        out_i, states_i = forward_with_states(m, x)
        got = jacobian_penalty(m, x, states=states_i)
    torch.testing.assert_close(out_i, out, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_lstm_layer_gives_each_bias_its_own_gradient():
    """The LSTM layer's backward returned one tensor object as the gradient of both biases: an in-place edit of one
    (gradient clipping on the tuple of ``autograd.grad``) changed the other. Values against torch's own LSTM."""
    m, x = _setup("lstm", 1, 0)
    params = [m.bias_ih_l0, m.bias_hh_l0]
    g_ih, g_hh = torch.autograd.grad(forward_with_states(m, x)[0].sum(), params)
    want = torch.autograd.grad(m(x)[0].sum(), params)
    assert g_ih is not g_hh
    torch.testing.assert_close(g_ih, want[0], rtol=1e-12, atol=1e-12)
    g_ih.mul_(0.5)
    torch.testing.assert_close(g_hh, want[1], rtol=1e-12, atol=1e-12)


def test_no_gradient_warning_counts_h0():
    """The "no gradient" warning is for a penalty with nothing to differentiate: a frozen model with ``h0`` requiring
    grad has a gradient (by ``h0``) and gets no warning."""
    m, x = _setup("gru", 1, 0)
    m.requires_grad_(False)
    h0 = torch.zeros(1, 3, 4, dtype=F64, requires_grad=True)
    pen = jacobian_penalty(m, x, h0)  # warnings are errors in this suite
    (grad,) = torch.autograd.grad(pen, h0)
    assert grad.abs().sum() > 0
    with pytest.warns(rnnjac.RnnjacWarning, match=r"nor the inputs, nor h0\) require grad"):
        jacobian_penalty(m, x, h0.detach())


def test_a_generator_that_is_not_one_is_refused_before_work():
    m, x = _setup("gru", 1, 0)
    for call in (
        lambda: jacobian_penalty(m, x, kind="spectral", generator=0),
        lambda: lyapunov_penalty(m, x, k=2, generator=1),
    ):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None .*; got int"):
            call()
