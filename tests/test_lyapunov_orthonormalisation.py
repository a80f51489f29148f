"""The orthonormalisation of the in-place Lyapunov pass (issue 18): one CholeskyQR pass where it keeps the answer,
Householder otherwise (``rnnjac._lyapunov_qr``, module docstring).

References are independent of the route under test: LAPACK's Householder QR (``torch.linalg.qr``), the every-step
Householder pass (``qr_method="householder"``), closed-form exponents of linear systems.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_reortho import SYSTEMS, gen, linear_system

import rnnjac
import rnnjac._orthonormalise as orthonormalise
from rnnjac._linalg import cholesky_qr_diag
from rnnjac._lyapunov_qr import LyapunovQR, initial_basis
from rnnjac._orthonormalise import CHOLESKY_MAX_CONDITION

F64 = torch.float64


def counting(monkeypatch) -> list[dict]:
    """Record the ``qr_counts`` of every in-place pass that :func:`rnnjac.lyapunov_spectrum` runs."""
    seen: list[dict] = []
    result = LyapunovQR.result

    def spy(self):
        seen.append(dict(self.qr_counts))
        return result(self)

    monkeypatch.setattr(LyapunovQR, "result", spy)
    return seen


def exponents(model, x, h0, monkeypatch, method: str, **kw) -> np.ndarray:
    monkeypatch.setattr(orthonormalise, "QR_METHOD", method)
    ds = rnnjac.lyapunov_spectrum(model, x, h0, generator=gen(0), ci=None, dtype=F64, **kw)
    return ds.lyapunov_exponents.values


@pytest.mark.parametrize("shape", [(3, 40, 12), (2, 9, 9), (1, 100, 100)])
def test_cholesky_qr_diag_is_a_qr_with_the_diagonal_of_householder(shape):
    a = torch.randn(*shape, generator=gen(0), dtype=F64)
    q, d, norms, failed = cholesky_qr_diag(a)
    r_ref = torch.linalg.qr(a).R
    assert not bool(failed)
    np.testing.assert_allclose(d, torch.diagonal(r_ref, dim1=-2, dim2=-1).abs(), rtol=1e-9)
    np.testing.assert_allclose(norms, torch.linalg.vector_norm(a, dim=-2), rtol=1e-14)
    eye = torch.eye(shape[-1], dtype=F64)
    assert (q.mT @ q - eye).abs().max() < 1e-9
    # Q R = a with R = Q^T a upper triangular
    r = q.mT @ a
    assert torch.tril(r, -1).abs().max() < 1e-9 * d.max() and torch.allclose(q @ r, a, atol=1e-11)


def test_cholesky_qr_diag_reports_a_rank_deficient_block():
    a = torch.randn(2, 10, 4, generator=gen(1), dtype=F64)
    a[1, :, 2] = 0  # sample 1 is exactly singular: the Cholesky factorisation breaks down
    assert bool(cholesky_qr_diag(a)[3]) and not bool(cholesky_qr_diag(a[:1])[3])
    a[1, :, 2] = a[1, :, 0]  # singular up to rounding: a breakdown, or a tiny R_ii the condition estimate flags
    _, d, norms, failed = cholesky_qr_diag(a[1:])
    assert bool(failed) or float((norms / d).max()) > 1e6


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_the_default_route_equals_householder_on_the_known_answer_systems(name, monkeypatch):
    """The every-step answer (reortho_every=1, the default) by the default route equals the Householder one to 1e-8;
    Cholesky is taken on the slowly separating systems and refused where one step's condition is large."""
    model, x, h0 = SYSTEMS[name]
    seen = counting(monkeypatch)
    house = exponents(model, x, h0, monkeypatch, "householder", warmup=20)
    new = exponents(model, x, h0, monkeypatch, "auto", warmup=20)
    np.testing.assert_allclose(new, house, rtol=0, atol=1e-8)
    assert seen[0]["cholesky"] == 0 and seen[0]["householder"] == x.shape[1] - 20
    assert seen[1]["cholesky"] + seen[1]["householder"] == x.shape[1] - 20
    if name == "orthogonal":  # condition 1 at every step
        assert seen[1]["cholesky"] == x.shape[1] - 20
    elif name in ("linear", "tanh-g3"):  # S with condition 1e3; lambda_1 - lambda_24 about 10 nats per step
        assert seen[1]["fallback"] >= 5 and seen[1]["householder"] > 0.9 * (x.shape[1] - 20)
    else:
        assert seen[1]["cholesky"] > 0.75 * (x.shape[1] - 20)


@pytest.mark.parametrize("name", ["linear", "tanh-g1.5", "gru"])
def test_auto_reortho_with_the_default_route_equals_the_every_step_householder_answer(name, monkeypatch):
    model, x, h0 = SYSTEMS[name]
    house = exponents(model, x, h0, monkeypatch, "householder", warmup=20)
    auto = exponents(model, x, h0, monkeypatch, "auto", warmup=20, reortho_every="auto")
    np.testing.assert_allclose(auto, house, rtol=0, atol=1e-6)


def test_a_fixed_interval_on_a_linear_system_gives_log_abs_eigenvalues_by_cholesky(monkeypatch):
    mu = np.array([1.0, -0.9, 0.8, 0.7, 0.6])  # 0.5 nats per step apart at most: kappa ~ e^5 over 10 steps
    seen = counting(monkeypatch)
    x, h0 = torch.zeros(1, 2000, 5, dtype=F64), torch.ones(1, 5, dtype=F64)
    new = exponents(linear_system(mu, cond=2), x, h0, monkeypatch, "auto", reortho_every=10)
    house = exponents(linear_system(mu, cond=2), x, h0, monkeypatch, "householder", reortho_every=10)
    np.testing.assert_allclose(new, house, rtol=0, atol=1e-10)
    np.testing.assert_allclose(new[0], np.log(np.abs(mu)), atol=20 / 2000)
    assert seen[0] == {"cholesky": 200, "householder": 0, "fallback": 0}


def test_an_ill_conditioned_block_falls_back_to_householder_and_retries_later():
    """One step of diag(1, 1e-4) has condition 1e4 > 671: every Cholesky pass tried is rejected (counted), the QR
    is Householder's, the exponents are exact; tries back off (1, 2, 4 ... QRs); a well-conditioned phase returns
    to Cholesky."""
    d_bad = torch.tensor([1.0, 1e-4], dtype=F64)
    d_good = torch.tensor([1.0, 0.5], dtype=F64)
    acc = LyapunovQR(torch.eye(2, dtype=F64).expand(3, 2, 2).contiguous(), 100)  # Q stays I: exact
    for t in range(1, 101):
        d = d_bad if t <= 50 else d_good
        acc.step(t, lambda q, d=d: d[:, None] * q)
    counts = acc.qr_counts
    # tried at QRs 1, 3, 6, 11, 20, 37 (waits of 1, 2, 4, 8, 16 QRs), then 70 (a wait of 32): Cholesky from there
    assert counts["fallback"] == 6 and counts["cholesky"] == 31
    assert counts["cholesky"] + counts["householder"] == 100
    exact = (torch.log(d_bad) + torch.log(d_good)) / 2
    np.testing.assert_allclose(acc.result().exponents, exact.expand(3, 2), rtol=0, atol=1e-12)
    assert CHOLESKY_MAX_CONDITION**2 * torch.finfo(F64).eps == pytest.approx(1e-10)


def test_a_collapsed_direction_is_minus_inf_by_either_route(monkeypatch):
    """A zero row of J makes the block singular: Cholesky breaks down, Householder gives the exact zero."""
    w = torch.diag(torch.tensor([0.9, 0.0, 0.5], dtype=F64))
    cell = rnnjac.CustomCell(lambda s, x: s @ w.T, jacobian=lambda s, x: w.expand(s.shape[0], 3, 3))
    x, h0 = torch.zeros(2, 30, 1, dtype=F64), torch.ones(2, 3, dtype=F64)
    seen = counting(monkeypatch)
    new = exponents(cell, x, h0, monkeypatch, "auto")
    house = exponents(cell, x, h0, monkeypatch, "householder")
    np.testing.assert_array_equal(np.isneginf(new), np.isneginf(house))
    assert np.isneginf(new[:, -1]).all()
    np.testing.assert_allclose(new[:, :2], house[:, :2], rtol=0, atol=1e-12)
    assert seen[0]["fallback"] >= 1 and seen[0]["cholesky"] == 0


def test_float32_tangents_and_the_differentiable_pass_keep_householder():
    d, eye = torch.tensor([1.0, 0.5, 0.25]), torch.eye(3)[None]  # a diagonal J keeps Q = I: exact
    for q0, diff in ((eye, False), (eye.double(), True)):
        acc = LyapunovQR(q0, 20, differentiable=diff)
        for t in range(1, 21):
            acc.step(t, lambda q: d.to(q.dtype)[:, None] * q)
        assert acc.qr_counts["cholesky"] == 0
        np.testing.assert_allclose(acc.result().exponents[0].detach(), torch.log(d), atol=1e-6)


def test_qr_method_is_checked():
    with pytest.raises(ValueError, match=r"qr_method= must be one of \('auto', 'householder'\), got 'cholesky'"):
        LyapunovQR(initial_basis(3, 3), 10, qr_method="cholesky")
