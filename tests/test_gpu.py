"""CUDA: the same numbers as the CPU (penalties in eval mode; the shared forward on cuDNN, whose backward is
first-order only, and without it for a double backward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import Problem

import rnnjac
from rnnjac.regularizers import jacobian_penalty, lyapunov_penalty

pytestmark = pytest.mark.gpu
F64 = torch.float64


def _pair(arch, layers=1, proj=0):
    p = Problem(arch, layers=layers, proj=proj)
    m, x = p.module().eval(), p.inputs(batch=3, steps=12)
    return m, x, m.to("cuda"), x.to("cuda")


@pytest.mark.parametrize("arch,layers,proj", [("rnn_tanh", 2, 0), ("gru", 1, 0), ("lstm", 2, 2)])
def test_jacobians_and_spectra_match_cpu(arch, layers, proj):
    m, x, mg, xg = _pair(arch, layers, proj)
    m = Problem(arch, layers=layers, proj=proj).module().eval()  # a CPU copy (mg is the moved module)
    for method in ("analytic", "autograd"):
        torch.testing.assert_close(rnnjac.jacobians(mg, xg, method=method).cpu(), rnnjac.jacobians(m, x, method=method))
    kw = dict(eigenvalues=True, end_to_end=True, k=4, warmup=2)
    a = rnnjac.spectra(m, x, generator=torch.Generator().manual_seed(0), **kw)
    b = rnnjac.spectra(mg, xg, generator=torch.Generator().manual_seed(0), **kw)
    for name in ("singular_values", "lyapunov_exponents", "spectral_radius"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-9, atol=1e-9)
    # end-to-end: compare the values float64 resolves (within 30 nats of the top); lower ones may
    # differ between devices before the graded form's row scales are ordered (see _linalg)
    ea, eb = a.end_to_end_log_singular_values.values, b.end_to_end_log_singular_values.values
    ok = ea >= ea[..., :1] - 30
    np.testing.assert_allclose(eb[ok], ea[ok], rtol=1e-7, atol=1e-7)
    assert b.attrs["device"].startswith("cuda")
    assert rnnjac.verify(mg, xg).attrs["passed"] == 1


def test_float32_singular_values_on_cuda_use_the_accurate_route():
    p = Problem("lstm", dtype=torch.float32, hidden=32)
    m, x = p.module().eval(), p.inputs(batch=4, steps=6)
    ref = Problem("lstm", dtype=torch.float64, hidden=32).module().eval()  # same weights, float64, CPU
    ds = rnnjac.spectra(m.to("cuda"), x.to("cuda"), lyapunov=False)
    with torch.no_grad():
        want = torch.linalg.svdvals(rnnjac.jacobians(ref, x.double())).numpy()
    np.testing.assert_allclose(ds.singular_values.values, want, rtol=0, atol=1e-5 * want.max())


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_penalties_match_cpu_in_eval_mode_with_double_backward(arch):
    m = Problem(arch).module().eval()
    x = Problem(arch).inputs(batch=3, steps=10)
    mg, xg = Problem(arch).module().eval().to("cuda"), x.to("cuda")
    for kind, est in (("frobenius", "exact"), ("spectral", "exact"), ("end_to_end", "exact")):
        a = jacobian_penalty(m, x, kind=kind, estimator=est, n_iter=50, generator=torch.Generator().manual_seed(0))
        b = jacobian_penalty(mg, xg, kind=kind, estimator=est, n_iter=50, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-9)
        (ga,) = torch.autograd.grad(a, m.weight_hh_l0)
        (gb,) = torch.autograd.grad(b, mg.weight_hh_l0)
        torch.testing.assert_close(gb.cpu(), ga, rtol=1e-5, atol=1e-8)
    pen = jacobian_penalty(mg, xg)
    (g,) = torch.autograd.grad(pen, mg.weight_hh_l0, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), mg.weight_hh_l0)  # double backward, eval mode, CUDA
    assert torch.isfinite(gg).all()
    la = lyapunov_penalty(m, x, k=2, generator=torch.Generator().manual_seed(0))
    lb = lyapunov_penalty(mg, xg, k=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lb.cpu(), la, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch,layers,proj", [("rnn_tanh", 2, 0), ("gru", 2, 0), ("lstm", 2, 2), ("lstm", 1, 0)])
@pytest.mark.parametrize("train", [False, True])
def test_shared_forward_on_cudnn_matches_cpu(arch, layers, proj, train):
    """forward_with_states runs cuDNN by default (train=True inside, so eval-mode modules backpropagate too): outputs,
    states, a penalty and the gradients of the whole loss equal the CPU's."""
    from rnnjac.regularizers import forward_with_states

    p = Problem(arch, layers=layers, proj=proj)
    m, x = p.module().train(train), p.inputs(batch=3, steps=12)
    mg, xg = p.module().train(train).to("cuda"), x.to("cuda")
    grads = []
    for mod, inp in ((m, x), (mg, xg)):
        out, states = forward_with_states(mod, inp)
        spectral = jacobian_penalty(
            mod, inp, kind="spectral", n_iter=20, states=states, generator=torch.Generator().manual_seed(0)
        )  # a CPU generator: the same start vectors on both devices
        loss = out.pow(2).mean() + jacobian_penalty(mod, inp, states=states) + spectral
        grads.append([out, states, *torch.autograd.grad(loss, list(mod.parameters()))])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-9)


def test_shared_forward_double_backward_on_cuda():
    from rnnjac.regularizers import forward_with_states

    m = Problem("gru", layers=2).module().eval().to("cuda")
    x = Problem("gru").inputs(batch=3, steps=8).to("cuda")
    out, states = forward_with_states(m, x, double_backward=True)  # torch's own kernels: differentiable twice
    loss = out.pow(2).mean() + jacobian_penalty(m, x, states=states)
    (g,) = torch.autograd.grad(loss, m.weight_hh_l0, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), m.weight_hh_l0)
    assert torch.isfinite(gg).all()


def test_cell_state_scan_on_cuda_equals_the_loop():
    from rnnjac._elementwise import linear_recurrence

    g = torch.Generator().manual_seed(0)
    f, u = torch.rand(4, 200, 8, dtype=F64, generator=g), torch.randn(4, 200, 8, dtype=F64, generator=g)
    f[0, 50], f[1, 99] = 0.0, 1.0
    c0 = torch.randn(4, 8, dtype=F64, generator=g)
    want = linear_recurrence(f, u, c0, method="loop")
    args = [t.cuda().requires_grad_() for t in (f, u, c0)]
    got = linear_recurrence(*args)  # the scan: the default on CUDA
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(gr).all() for gr in torch.autograd.grad(got.pow(2).sum(), args))
