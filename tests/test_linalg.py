"""Numerical kernels: CholeskyQR3 (the CUDA route, tested here on the CPU), graded log-SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import Problem

import rnnjac
from rnnjac import _linalg


@pytest.mark.parametrize("dtype,cond", [(torch.float64, 1e10), (torch.float32, 1e5)])
def test_cholesky_qr3_matches_householder_on_ill_conditioned_blocks(dtype, cond):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 200, 16, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 16, 16, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -np.log10(cond), 16, dtype=torch.float64)
    a = (u * s.unsqueeze(-2) @ v.mT).to(dtype)
    q, r = _linalg.cholesky_qr3(a)
    eye = torch.eye(16, dtype=dtype)
    tol = 50 * torch.finfo(dtype).eps * 16
    assert float((q.mT @ q - eye).abs().max()) < tol  # orthonormal to working precision
    assert float((q @ r - a).norm() / a.norm()) < tol
    q_h, d_h = _linalg.qr_positive(a, route="householder")
    q_c, d_c = _linalg.qr_positive(a, route="cholesky")
    torch.testing.assert_close(d_c, d_h, rtol=1e-3 if dtype == torch.float32 else 1e-6, atol=0)


def test_spectra_agree_between_qr_routes(monkeypatch):
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs(batch=2, steps=80)
    kw = dict(k=5, warmup=5, generator=None)
    a = rnnjac.lyapunov_spectrum(m, x, **{**kw, "generator": torch.Generator().manual_seed(0)})
    monkeypatch.setitem(_linalg.QR_ROUTE, "cpu", "cholesky")
    b = rnnjac.lyapunov_spectrum(m, x, **{**kw, "generator": torch.Generator().manual_seed(0)})
    np.testing.assert_allclose(b.lyapunov_exponents.values, a.lyapunov_exponents.values, atol=1e-10)


@pytest.mark.parametrize("spread", [5.0, 15.0])
def test_graded_log_svdvals_plain_range(spread):
    g = torch.Generator().manual_seed(1)
    log_e = torch.sort(torch.rand(3, 7, generator=g, dtype=torch.float64) * spread, descending=True).values
    k = torch.triu(torch.randn(3, 7, 7, generator=g, dtype=torch.float64))
    k = k / k.norm(dim=-1, keepdim=True)
    want = torch.log(torch.linalg.svdvals(torch.exp(log_e).unsqueeze(-1) * k))
    torch.testing.assert_close(_linalg.graded_log_svdvals(log_e, k), want, rtol=1e-9, atol=1e-6)


def test_graded_log_svdvals_exact_two_by_two():
    # M = [[a, a b], [0, c g]] with log a = 300, log c = 100: sigma_1 sigma_2 = a c |g| and
    # sigma_1^2 + sigma_2^2 = a^2 (1 + b^2) + c^2 g^2 give log sigma_2 = 100 + log|g| - log(1 + b^2) / 2
    for b, gam in ((0.5, 1.3), (-3.0, 0.2), (40.0, -2.0)):
        k = torch.tensor([[1.0, b], [0.0, gam]], dtype=torch.float64)
        log_e = torch.tensor([300.0, 100.0], dtype=torch.float64)
        got = _linalg.graded_log_svdvals(log_e[None], k[None])[0]
        want = torch.tensor(
            [300 + 0.5 * np.log1p(b * b), 100 + np.log(abs(gam)) - 0.5 * np.log1p(b * b)], dtype=torch.float64
        )
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-12)


def test_graded_log_svdvals_uncoupled_blocks():
    g = torch.Generator().manual_seed(2)
    k = torch.zeros(6, 6, dtype=torch.float64)
    k[:3, :3] = torch.triu(torch.randn(3, 3, generator=g, dtype=torch.float64))
    k[3:, 3:] = torch.triu(torch.randn(3, 3, generator=g, dtype=torch.float64))
    log_e = torch.tensor([300.0, 299.0, 298.5, 100.0, 99.0, 98.0], dtype=torch.float64)
    got = _linalg.graded_log_svdvals(log_e[None], k[None])[0]
    top = torch.log(torch.linalg.svdvals(torch.exp(log_e[:3] - 300).unsqueeze(-1) * k[:3, :3])) + 300
    low = torch.log(torch.linalg.svdvals(torch.exp(log_e[3:] - 100).unsqueeze(-1) * k[3:, 3:])) + 100
    torch.testing.assert_close(got, torch.cat([top, low]), rtol=1e-12, atol=1e-9)


def test_kaplan_yorke():
    lam = torch.tensor([[0.3, 0.1, -0.2, -1.0], [-0.1, -0.2, -0.3, -0.4], [0.2, 0.1, 0.05, 0.01]], dtype=torch.float64)
    np.testing.assert_allclose(_linalg.kaplan_yorke(lam).numpy(), [3 + (0.2 / 1.0), 0.0, 4.0])


def test_gram64_singular_values_route(monkeypatch):
    """The CUDA route for float32 (sqrt eig of J^T J in float64), checked here on the CPU."""
    p = Problem("lstm", dtype=torch.float32)
    j = rnnjac.jacobians(p.module(), p.inputs()).detach().reshape(-1, 10, 10)
    want = torch.linalg.svdvals(j.double())
    monkeypatch.setitem(_linalg.SVD_ROUTE, "cpu", "gram64")
    got = _linalg.svdvals(j)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * float(want.max()))
