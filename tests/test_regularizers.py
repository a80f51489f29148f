"""Penalties: gradients (gradcheck), exactness, unbiasedness, no stray .grad, bad input."""

from __future__ import annotations

import contextlib

import pytest
import torch
from problems import SMALL, Problem, ids
from torch import nn

import rnnjac
from rnnjac.regularizers import JacobianPenalty, jacobian_penalty, lyapunov_penalty

F64 = torch.float64


@contextlib.contextmanager
def swapped(module: nn.Module, name: str, value: torch.Tensor):
    """Temporarily replace a parameter by a plain tensor (so gradcheck can vary it)."""
    param = module._parameters.pop(name)
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)
        module.register_parameter(name, param)


def tiny(arch: str, layers: int = 1, proj: int = 0) -> nn.Module:
    return Problem(arch, layers=layers, proj=proj, input_size=2, hidden=3).module(seed=3)


CASES = [
    ("frobenius", "exact"),
    ("frobenius", "projection"),
    ("spectral", "exact"),
    ("end_to_end", "exact"),
    ("end_to_end", "projection"),
]


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("kind,estimator", CASES, ids=[f"{k}-{e}" for k, e in CASES])
def test_gradcheck_wrt_weights_and_inputs(arch, kind, estimator):
    m = tiny(arch)
    x = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = m.weight_hh_l0.detach().clone().requires_grad_(True)

    # the spectral kind differentiates ||J v||^2 at the power-iteration vector v, which is the
    # gradient of sigma_max^2 once v has converged: give it enough iterations to converge
    n_iter = 200 if kind == "spectral" else 1

    def f(w, x):
        with swapped(m, "weight_hh_l0", w):
            return jacobian_penalty(
                m,
                x,
                kind=kind,
                estimator=estimator,
                n_proj=2,
                n_iter=n_iter,
                generator=torch.Generator().manual_seed(1),
            )

    assert torch.autograd.gradcheck(f, (w, x), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch,layers,proj", [("gru", 1, 0), ("lstm", 2, 2), ("rnn_tanh", 2, 0)])
def test_gradgradcheck_frobenius(arch, layers, proj):
    m = tiny(arch, layers, proj)
    x = torch.randn(2, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = m.weight_hh_l0.detach().clone().requires_grad_(True)

    def f(w):
        with swapped(m, "weight_hh_l0", w):
            return jacobian_penalty(m, x)

    assert torch.autograd.gradgradcheck(f, (w,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
def test_lyapunov_penalty_gradient_matches_finite_differences(arch):
    m = tiny(arch)
    x = torch.randn(2, 8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = m.weight_hh_l0.detach().clone().requires_grad_(True)

    def f(w):
        with swapped(m, "weight_hh_l0", w):
            return lyapunov_penalty(
                m,
                x,
                k=2,
                target=-0.1,
                warmup=2,
                tangent_warmup=1,
                reortho_every=2,
                generator=torch.Generator().manual_seed(0),
            )

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6)


def test_lyapunov_penalty_value_matches_lyapunov_spectrum():
    m = tiny("gru")
    x = torch.randn(3, 40, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    kw = dict(k=2, warmup=5, tangent_warmup=5, reortho_every=3)
    pen = lyapunov_penalty(m, x, target=0.25, generator=torch.Generator().manual_seed(4), **kw)
    ds = rnnjac.lyapunov_spectrum(m, x, generator=torch.Generator().manual_seed(4), **kw)
    lam = torch.from_numpy(ds.lyapunov_exponents.values)
    torch.testing.assert_close(pen.detach(), (lam - 0.25).pow(2).mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("problem", SMALL + [Problem("lstm", 2, proj=2)], ids=ids(SMALL) + ["lstm-L2-proj2"])
@pytest.mark.parametrize("state", ["full", "h"])
def test_exact_frobenius_equals_materialised_sum(problem, state):
    m, x = problem.module(), problem.inputs(steps=6)
    j = rnnjac.jacobians(m, x, state=state)
    want = j.pow(2).sum((-2, -1)).mean()
    torch.testing.assert_close(jacobian_penalty(m, x, state=state), want, rtol=1e-12, atol=1e-12)
    strided = jacobian_penalty(m, x, state=state, time_stride=4)  # steps t = 1 and 5
    torch.testing.assert_close(strided, j[:, ::4].pow(2).sum((-2, -1)).mean(), rtol=1e-12, atol=1e-12)


def test_spectral_and_end_to_end_exact_values():
    m, x = Problem("lstm", layers=2).module(), Problem("lstm").inputs(steps=5)
    j = rnnjac.jacobians(m, x)
    top = torch.linalg.svdvals(j)[..., 0].pow(2).mean()
    torch.testing.assert_close(jacobian_penalty(m, x, kind="spectral", n_iter=200), top, rtol=1e-6, atol=0)
    prod = torch.eye(j.shape[-1], dtype=F64).expand(2, -1, -1)
    for t in range(5):
        prod = j[:, t] @ prod
    torch.testing.assert_close(jacobian_penalty(m, x, kind="end_to_end"), prod.pow(2).sum((-2, -1)).mean())


@pytest.mark.parametrize("kind", ["frobenius", "end_to_end"])
def test_projection_estimator_is_unbiased(kind):
    m, x = Problem("gru").module(), Problem("gru").inputs(steps=4)
    exact = float(jacobian_penalty(m, x, kind=kind).detach())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.stack(
            [jacobian_penalty(m, x, kind=kind, estimator="projection", generator=g) for _ in range(600)]
        )
    se = float(draws.std() / len(draws) ** 0.5)
    assert abs(float(draws.mean()) - exact) < 3 * se
    assert float(draws.std()) > 0  # it is random: the test would be vacuous otherwise


def test_grad_is_left_untouched():
    m, x = Problem("lstm").module(), Problem("lstm").inputs()
    for p in m.parameters():
        p.grad = torch.full_like(p, 7.0)
    for kind, est in CASES:
        jacobian_penalty(m, x, kind=kind, estimator=est, generator=torch.Generator().manual_seed(0))
    lyapunov_penalty(m, x, k=2)
    for p in m.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


def test_train_and_eval_mode_give_the_same_penalty():
    torch.manual_seed(0)
    m = nn.GRU(3, 5, num_layers=2, dropout=0.5, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=F64)
    m.train()
    a = jacobian_penalty(m, x)
    m.eval()
    torch.testing.assert_close(jacobian_penalty(m, x), a)


def test_single_layer_fast_path_equals_transparent_step():
    from rnnjac.regularizers import _states_and_gates

    for arch, proj in (("lstm", 2), ("gru", 0), ("rnn_relu", 0)):
        m = Problem(arch, proj=proj, batch_first=False).module()
        x = Problem(arch, batch_first=False).inputs()
        problem = rnnjac._checks.prepare(m, x)
        states = _states_and_gates(problem)[0]
        torch.testing.assert_close(states, problem.dyn.run(problem.s0, problem.xs), rtol=1e-12, atol=1e-12)


def test_custom_cell_through_autograd_path():
    w = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    cell = rnnjac.CustomCell(lambda s, x: torch.tanh(s @ w.T + x), parameters=[w])
    x, h0 = torch.randn(2, 5, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    exact = jacobian_penalty(cell, x, h0)
    j = rnnjac.jacobians(cell, x, h0)
    torch.testing.assert_close(exact, j.pow(2).sum((-2, -1)).mean())
    (g,) = torch.autograd.grad(exact, w)
    (g_ref,) = torch.autograd.grad(j.pow(2).sum((-2, -1)).mean(), w)
    torch.testing.assert_close(g, g_ref)
    assert torch.isfinite(jacobian_penalty(cell, x, h0, estimator="projection")).all()
    assert torch.isfinite(lyapunov_penalty(cell, x, h0, k=2))


def test_module_wrapper():
    m, x = Problem("gru").module(), Problem("gru").inputs()
    pen = JacobianPenalty("frobenius", weight=0.5)
    torch.testing.assert_close(pen(m, x), 0.5 * jacobian_penalty(m, x))
    lyap = JacobianPenalty("lyapunov", weight=2.0, k=2, generator=None)
    assert lyap(m, x).requires_grad
    assert "kind='frobenius'" in repr(pen)


def test_training_step_reduces_penalty():
    torch.manual_seed(0)
    m = nn.RNN(2, 8, batch_first=True)
    with torch.no_grad():
        m.weight_hh_l0.mul_(3)
    x = torch.randn(4, 10, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    before = float(jacobian_penalty(m, x).detach())
    for _ in range(20):
        opt.zero_grad()
        jacobian_penalty(m, x).backward()
        opt.step()
    assert float(jacobian_penalty(m, x).detach()) < 0.8 * before


def test_bad_input():
    m, x = Problem("gru").module(), Problem("gru").inputs()
    with pytest.raises(ValueError, match="kind must be one of"):
        jacobian_penalty(m, x, kind="nuclear")
    with pytest.raises(ValueError, match="estimator must be one of"):
        jacobian_penalty(m, x, estimator="hutchinson")
    with pytest.raises(ValueError, match="n_proj must be an integer >= 1"):
        jacobian_penalty(m, x, estimator="projection", n_proj=0)
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= D = 5"):
        lyapunov_penalty(m, x, k=6)
    with pytest.raises(ValueError, match="k must be an integer"):
        lyapunov_penalty(m, x, k=0)
    frozen = Problem("gru").module().requires_grad_(False)
    with pytest.warns(rnnjac.RnnjacWarning, match="require grad"):
        jacobian_penalty(frozen, x)
    relu = Problem("rnn_relu").module()
    with torch.no_grad():
        relu.weight_hh_l0.copy_(torch.eye(5, dtype=F64) * 1e200)
    with pytest.raises(rnnjac.NonFiniteError, match="t="):
        jacobian_penalty(relu, torch.ones(2, 4, 3, dtype=F64))


@pytest.mark.parametrize("arch,proj", [("gru", 0), ("lstm", 2), ("rnn_tanh", 0)])
def test_reusing_the_callers_forward_gives_the_same_penalty_and_gradient(arch, proj):
    m = Problem(arch, proj=proj, batch_first=False).module()
    x = Problem(arch, batch_first=False).inputs(steps=7)
    out, _ = m(x)  # the caller's own forward, time-major
    shared = jacobian_penalty(m, x, outputs=out) + out.pow(2).mean()
    alone = jacobian_penalty(m, x) + m(x)[0].pow(2).mean()
    torch.testing.assert_close(shared, alone)
    g_shared = torch.autograd.grad(shared, list(m.parameters()))
    g_alone = torch.autograd.grad(alone, list(m.parameters()))
    for a, b in zip(g_shared, g_alone, strict=True):
        torch.testing.assert_close(a, b)
    lyap = lyapunov_penalty(m, x, k=2, outputs=m(x)[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lyap, lyapunov_penalty(m, x, k=2, generator=torch.Generator().manual_seed(0)))


def test_outputs_errors():
    m2 = Problem("gru", layers=2).module()
    x = Problem("gru").inputs()
    with pytest.raises(ValueError, match="only for a single-layer"):
        jacobian_penalty(m2, x, outputs=m2(x)[0])
    m = Problem("gru").module()
    with pytest.raises(ValueError, match=r"shape \(2, 4, 5\)"):
        jacobian_penalty(m, x, outputs=m(x)[0][:, :3])
