"""The re-orthonormalisation schedule and the transients: ``reortho_every="auto"``, the condition-number guard of
``reortho_every > 1``, ``tangent_warmup="auto"`` and the MSER truncation rule (``rnnjac._uncertainty``).

References are independent of the code under test: a brute-force MSER, the every-step QR (the textbook Benettin
algorithm, exact to rounding), closed-form exponents of linear and Ginibre systems.
"""

from __future__ import annotations

import importlib.resources
import warnings
from functools import partial

import numpy as np
import pytest
import torch

import rnnjac
from rnnjac._lyapunov_qr import (
    MAX_INTERVAL,
    WIDENED_TARGET,
    LyapunovQR,
    condition_target,
    initial_basis,
)
from rnnjac._orthonormalise import householder_diag
from rnnjac._transients import mser_truncation
from rnnjac.tasks import flipflop

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mser_brute(x: np.ndarray, m: int) -> int:
    """White's MSER-m written out: batch means, every truncation d < n/2, the first minimum of var/(n-d)."""
    n = len(x) // m
    z = x[: n * m].reshape(n, m).mean(1)
    best, arg = np.inf, 0
    for d in range(0, (n + 1) // 2):
        rest = z[d:]
        value = ((rest - rest.mean()) ** 2).sum() / len(rest) ** 2
        if value < best - 1e-15 * abs(best if np.isfinite(best) else 0):
            best, arg = value, d
    return arg * m


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_mser_matches_a_brute_force_reference(m, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(301)
    x = 5.0 + 2.0 * np.exp(-t / rng.uniform(5, 40)) + rng.normal(0, 0.3, t.size)
    assert mser_truncation(torch.from_numpy(x), batch_size=m) == mser_brute(x, m)


def test_mser_finds_a_step_transient_and_leaves_a_stationary_series():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 1000)
    x[:120] += 4.0  # a level shift for the first 120 items
    assert 120 <= mser_truncation(torch.from_numpy(x)) <= 130
    assert 120 <= mser_truncation(torch.from_numpy(x), batch_size=5) <= 130
    cut = [mser_truncation(torch.from_numpy(rng.normal(0, 1, 1000)), batch_size=5) for _ in range(20)]
    assert np.median(cut) <= 50  # stationary: little or nothing is deleted


def test_mser_edges():
    assert mser_truncation(torch.ones(1)) == 0
    assert mser_truncation(torch.ones(50)) == 0  # constant: no reason to delete
    assert mser_truncation(torch.arange(7.0), batch_size=4) == 0  # one full batch only
    assert mser_truncation(torch.tensor([1e9 + 1, 1e9, 1e9, 1e9, 1e9], dtype=F64)) == 1  # large mean, no cancellation
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        mser_truncation(torch.ones(5), batch_size=0)
    with pytest.raises(ValueError, match=r"series must be a real 1-D tensor; got torch.Size\(\[2, 3\]\)"):
        mser_truncation(torch.ones(2, 3))
    with pytest.raises(ValueError, match="series must be finite"):
        mser_truncation(torch.tensor([1.0, float("nan")]))


# ----------------------------------------------------------------------------- reortho_every="auto"
def cell_from_jacobian(jac) -> rnnjac.CustomCell:
    """``s -> J(s, x) s`` with the closed form ``J``."""
    return rnnjac.CustomCell(lambda s, x: (jac(s, x) @ s.unsqueeze(-1)).squeeze(-1), jacobian=jac)


def nonnormal(mu: torch.Tensor, cond: float = 1e3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` with singular values from 1 to ``1/cond`` and its inverse: ``S diag(mu) S^-1`` has exponents log|mu|."""
    n = len(mu)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed + 1), dtype=F64))
    s = u @ torch.diag(torch.logspace(0, -np.log10(cond), n, dtype=F64)) @ v.T
    return s, torch.linalg.inv(s)


def linear_system(mu, cond=1e3, seed=0):
    s, s_inv = nonnormal(torch.as_tensor(mu, dtype=F64), cond, seed)
    w = s @ torch.diag(torch.as_tensor(mu, dtype=F64)) @ s_inv
    return cell_from_jacobian(lambda st, x: w.expand(st.shape[0], *w.shape))


def tanh_rnn(n: int, gain: float, seed: int = 0) -> torch.nn.RNN:
    rnn = torch.nn.RNN(1, n, bias=False, batch_first=True).to(F64)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(n, n, generator=gen(seed), dtype=F64) * gain / n**0.5)
        rnn.weight_ih_l0.copy_(torch.randn(n, 1, generator=gen(seed + 1), dtype=F64))
    return rnn


def bundled_gru():
    return rnnjac.load_checkpoint(importlib.resources.files("rnnjac") / "data" / "flipflop_gru.safetensors")


def known_systems() -> dict:
    """``(model, inputs, h0)`` per system of the issue's list (float64, small)."""
    n = 6
    ginibre = cell_from_jacobian(lambda s, x: x.view(-1, n, n))
    orth, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen(3), dtype=F64))
    rotation = cell_from_jacobian(lambda s, x: orth.expand(s.shape[0], 8, 8))
    noise = 0.5 * torch.randn(2, 300, 1, generator=gen(5), dtype=F64)
    return {
        "ginibre": (
            ginibre,
            torch.randn(2, 300, n * n, generator=gen(1), dtype=F64) / n**0.5,
            torch.ones(2, n, dtype=F64),
        ),
        "linear": (
            linear_system([0.95, -0.8, 0.6, 0.3, -0.1]),
            torch.zeros(2, 300, 5, dtype=F64),
            torch.ones(2, 5, dtype=F64),
        ),
        "orthogonal": (rotation, torch.zeros(2, 300, 8, dtype=F64), torch.ones(2, 8, dtype=F64)),
        "tanh-g0.5": (tanh_rnn(24, 0.5), noise, None),
        "tanh-g1.5": (tanh_rnn(24, 1.5), noise, None),
        "tanh-g3": (tanh_rnn(24, 3.0), noise, None),
        "gru": (bundled_gru(), flipflop(2, 300, generator=gen(0))[0].to(F64), None),
    }


SYSTEMS = known_systems()


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_auto_equals_the_every_step_exponents(name):
    """The issue's accuracy bar: ``reortho_every="auto"`` gives the exponents of a QR at every step to 1e-6."""
    model, x, h0 = SYSTEMS[name]
    kw = dict(warmup=20, ci=None, dtype=F64)
    every = rnnjac.lyapunov_spectrum(model, x, h0, generator=gen(0), **kw)
    auto = rnnjac.lyapunov_spectrum(model, x, h0, reortho_every="auto", generator=gen(0), **kw)
    np.testing.assert_allclose(auto.lyapunov_exponents.values, every.lyapunov_exponents.values, rtol=0, atol=1e-6)
    qrs, steps = auto.attrs["lyapunov_qr_count"], x.shape[1] - 20
    assert auto.attrs["reortho_every"] == "auto" and 1 <= auto.attrs["reortho_interval_min"]
    assert auto.attrs["reortho_interval_max"] <= MAX_INTERVAL
    assert auto.attrs["reortho_interval_mean"] == pytest.approx(steps / qrs)
    assert auto.attrs["lyapunov_mean_log10_condition"] <= np.log10(condition_target(F64)) + 1e-9
    if name != "tanh-g3":  # lambda_1 - lambda_24 is about 10 nats per step there: a QR at every step is needed
        assert qrs < steps / 1.9


def test_auto_on_a_linear_system_gives_log_abs_eigenvalues():
    mu = torch.tensor([1.0, -0.6, 0.35, 0.2, 0.05], dtype=F64)
    ds = rnnjac.lyapunov_spectrum(
        linear_system(mu),
        torch.zeros(1, 2000, 5, dtype=F64),
        torch.ones(1, 5, dtype=F64),
        reortho_every="auto",
        generator=gen(0),
        ci=None,
    )
    np.testing.assert_allclose(ds.lyapunov_exponents.values[0], np.log(np.abs(mu.numpy())), atol=20 / 2000)


def test_a_long_fixed_interval_loses_the_small_exponents_and_is_warned_auto_is_not():
    """``S diag(mu) S^-1`` with exponents log|mu| spread by 3 nats per step: 50 steps between QRs make the
    tangent block's condition about e^150, beyond float64; the warning names the lost exponents."""
    mu = torch.tensor([1.0, -0.6, 0.35, 0.2, 0.05], dtype=F64)
    truth = np.log(np.abs(mu.numpy()))
    args = (linear_system(mu), torch.zeros(1, 1000, 5, dtype=F64), torch.ones(1, 5, dtype=F64))
    with pytest.warns(rnnjac.ConditioningWarning, match=r"lambda_3, lambda_4, lambda_5\).*reortho_every='auto'"):
        fixed = rnnjac.lyapunov_spectrum(*args, reortho_every=50, generator=gen(0), ci=None)
    assert np.abs(fixed.lyapunov_exponents.values[0, 2:] - truth[2:]).max() > 0.1  # really lost
    assert fixed.attrs["lyapunov_mean_log10_condition"] > 13  # the estimate from R saturates near 1/u = 1e15.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = rnnjac.lyapunov_spectrum(*args, reortho_every="auto", generator=gen(0), ci=None)
        every = rnnjac.lyapunov_spectrum(*args, generator=gen(0), ci=None)
    np.testing.assert_allclose(auto.lyapunov_exponents.values, every.lyapunov_exponents.values, atol=1e-6)
    np.testing.assert_allclose(auto.lyapunov_exponents.values[0], truth, atol=0.02)
    assert auto.attrs["lyapunov_qr_count"] < 0.7 * 1000  # kappa = e^(3 m) <= 1e6 (and S's non-normality): m ~ 2


def test_a_modest_fixed_interval_is_not_warned():
    mu = torch.tensor([1.0, 0.8, 0.7], dtype=F64)
    args = (linear_system(mu), torch.zeros(1, 400, 3, dtype=F64), torch.ones(1, 3, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = rnnjac.lyapunov_spectrum(*args, reortho_every=10, generator=gen(0), ci=None)
    assert 0 < ds.attrs["lyapunov_max_log10_condition"] < 8
    np.testing.assert_allclose(ds.lyapunov_exponents.values[0], np.log(mu.numpy()), atol=10 / 400)


def run_qr(jac: torch.Tensor, q0: torch.Tensor, **kw) -> tuple[LyapunovQR, object]:
    """``LyapunovQR`` over the step Jacobians ``jac (B, T, D, D)``."""
    acc = LyapunovQR(q0, jac.shape[1], **kw)
    for t in range(1, jac.shape[1] + 1):
        acc.step(t, lambda q, t=t: jac[:, t - 1] @ q)
    return acc, acc.result()


def test_auto_intervals_double_up_to_the_cap_and_keep_the_forced_qrs():
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen(0), dtype=F64))
    jac = rot.expand(1, 300, 4, 4)  # condition 1 at every interval: only the doubling and the cap limit it
    q0 = initial_basis(4, 4, gen(1), batch=1)
    _, res = run_qr(jac, q0, warmup=10, tangent_warmup=27, reortho_every="auto", local=True)
    # intervals 1, 2, 4, 8 (planned: 16) cut to 12 at the end of the tangent transient (t = 37), then 32, the cap
    # of 64 three times and the last step: 39
    counted = torch.nonzero(~torch.isnan(res.local[0, :, 0])).flatten().add(1).tolist()
    assert counted == [69, 133, 197, 261, 300] and MAX_INTERVAL == 64
    assert res.attrs["lyapunov_qr_count"] == 10 and res.counted_qrs == 5
    assert (res.attrs["reortho_interval_min"], res.attrs["reortho_interval_max"]) == (1, 64)
    assert res.attrs["reortho_interval_mean"] == 29.0
    np.testing.assert_allclose(res.exponents, 0.0, atol=1e-13)
    assert res.counted_steps == 300 - 37


def test_auto_bounds_the_growth_of_a_column_in_float32():
    """No overflow: a column growing by e^2 per step is QR'd before it grows by a quarter of float32's range."""
    jac = torch.tensor([[7.389, 0.0], [0.0, 7.389]], dtype=torch.float32).expand(1, 200, 2, 2)
    _, res = run_qr(jac, torch.eye(2)[None], reortho_every="auto")
    assert res.attrs["reortho_interval_max"] == int(0.25 * -np.log(torch.finfo(torch.float32).tiny) / np.log(7.389))
    np.testing.assert_allclose(res.exponents, np.log(7.389), rtol=1e-5)


def test_auto_in_the_differentiable_pass_matches_the_every_step_values_and_gradients():
    w = (0.9 * torch.randn(5, 5, generator=gen(2), dtype=F64) / 5**0.5).requires_grad_()
    jac = lambda: w.expand(2, 80, 5, 5)  # noqa: E731
    q0 = initial_basis(5, 3, gen(1), batch=2)
    out = []
    for r in (1, "auto"):
        _, res = run_qr(jac(), q0, reortho_every=r, differentiable=True, warmup=3, tangent_warmup=5)
        (grad,) = torch.autograd.grad(res.exponents.sum(), w)
        out.append((res.exponents.detach(), grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-9)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=1e-8)


def test_lyapunov_qr_refuses_auto_transient_in_the_differentiable_pass():
    with pytest.raises(ValueError, match="tangent_warmup='auto' needs the in-place pass"):
        LyapunovQR(torch.eye(2, dtype=F64)[None], 10, tangent_warmup="auto", differentiable=True)


# ----------------------------------------------------------------------------- tangent_warmup="auto"
def commuting_system(cond: float, sigma: float = 0.1, seed: int = 4):
    """``J_t = S diag(mu exp(sigma x_t)) S^-1`` (a non-normal S of condition ``cond``): the ``J_t`` commute, so over
    any window of steps sample b's exponents are exactly ``log mu_i + sigma mean_t x_bti`` once the tangents are
    aligned; before that, the random initial basis and S's non-normality give a transient."""
    mu = torch.tensor([1.0, 0.9, 0.6, 0.3], dtype=F64)
    s, s_inv = nonnormal(mu, cond, seed)

    def truth(x: torch.Tensor, start: int) -> np.ndarray:
        return np.log(mu.numpy()) + sigma * x[:, start:].mean(1).numpy()

    return cell_from_jacobian(lambda st, x: s @ torch.diag_embed(mu * torch.exp(sigma * x)) @ s_inv), truth, (s, mu)


@pytest.mark.slow
def test_auto_tangent_warmup_removes_the_transient_that_a_zero_warmup_leaves():
    cell, truth, _ = commuting_system(1e5)
    x = torch.randn(4, 1500, 4, generator=gen(7), dtype=F64)
    args = (cell, x, 1e-3 * torch.ones(4, 4, dtype=F64))
    with pytest.warns(rnnjac.ConvergenceWarning, match="have not converged"):  # the transient is flagged ...
        plain = rnnjac.lyapunov_spectrum(*args, generator=gen(0))
    assert np.abs(plain.lyapunov_exponents.values - truth(x, 0)).max() > 3e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error", rnnjac.ConvergenceWarning)  # ... and handled
        auto = rnnjac.lyapunov_spectrum(*args, tangent_warmup="auto", local_lyapunov=True, generator=gen(0))
    used = auto.attrs["tangent_warmup_used"]
    assert 1 <= used <= 100 and auto.attrs["tangent_warmup"] == "auto"
    assert np.abs(auto.lyapunov_exponents.values - truth(x, used)).max() < 1e-4
    assert bool(auto.local_lyapunov[:, :used].isnull().all()) and not bool(auto.local_lyapunov[:, used:].isnull().any())
    assert bool(auto.lyapunov_converged.all())


def test_auto_tangent_warmup_drops_little_without_a_transient():
    """Tangents started on the Gram-Schmidt basis of S (already aligned): local exponents are stationary."""
    _, _, (s, mu) = commuting_system(1e3)
    x = torch.randn(2, 2000, 4, generator=gen(8), dtype=F64)
    jac = s @ torch.diag_embed(mu * torch.exp(0.1 * x)) @ torch.linalg.inv(s)
    q0, _ = torch.linalg.qr(s)
    acc, res = run_qr(jac, q0.expand(2, 4, 4), tangent_warmup="auto", warmup=10, local=True, blocks=True)
    used = res.attrs["tangent_warmup_used"]
    assert used <= 100 and res.counted_steps == 2000 - 10 - used
    assert res.blocks.qrs == res.counted_qrs == 2000 - 10 - used
    want = np.log(mu.numpy()) + 0.1 * x[:, 10 + used :].mean(1).numpy()
    np.testing.assert_allclose(res.exponents, want, atol=1e-10)


# ----------------------------------------------------------------------------- the in-place QR and its dtype
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("k", [3, 7])
def test_householder_diag_is_a_qr_with_the_abs_diagonal_of_linalg_qr(dtype, k):
    a = torch.randn(4, 7, k, generator=gen(0), dtype=F64)
    q, d = householder_diag(a.to(dtype))
    _, r = torch.linalg.qr(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(d.double(), torch.diagonal(r, dim1=-2, dim2=-1).abs(), rtol=tol, atol=0)
    torch.testing.assert_close((q.mT @ q).double(), torch.eye(k, dtype=F64).expand(4, k, k), rtol=0, atol=10 * tol)
    r_back = q.double().mT @ a  # upper triangular, diagonal |R_ii| up to the columns' signs
    torch.testing.assert_close(r_back.tril(-1), torch.zeros_like(r_back), rtol=0, atol=10 * tol)
    torch.testing.assert_close(torch.diagonal(r_back, dim1=-2, dim2=-1).abs(), d.double(), rtol=tol, atol=0)


def test_a_float32_dense_chain_runs_in_float64_with_a_wider_condition_bound():
    """Steps given with ``matrix=J`` (float32) on float32 tangents: the chain is kept in float64, so "auto" takes
    a wider bound (fewer QRs than float32's) and the exponents are those of the float32 ``J`` in float64 (eigenvalues
    of a non-normal linear map) to 1e-9, where a float32 chain (any other ``apply``) misses by 1e-7 or more."""
    mu = torch.tensor([1.5, -0.9, 0.6, 0.25, -0.1], dtype=F64)
    s, s_inv = nonnormal(mu, cond=1e2)
    j32 = (s @ torch.diag(mu) @ s_inv).float().expand(2, 5, 5).contiguous()
    want = torch.linalg.eigvals(j32[0].double()).abs().log().sort(descending=True).values.expand(2, 5)
    q0 = initial_basis(5, 5, gen(1), torch.float32, batch=2)
    runs = {}
    for name, matrix in (("dense", j32), ("lambda", None)):
        acc = LyapunovQR(q0, 400, tangent_warmup=100, reortho_every="auto")
        for t in range(1, 401):
            acc.step(t, partial(torch.bmm, j32) if matrix is not None else (lambda q: j32 @ q), matrix=matrix)
        runs[name] = (acc, acc.result())
    (dense, r_dense), (plain, r_plain) = runs["dense"], runs["lambda"]
    assert dense.widened and dense.q.dtype == F64 and not plain.widened and plain.q.dtype == torch.float32
    assert r_dense.exponents.dtype == r_plain.exponents.dtype == torch.float32
    # the transient of the eigen-directions decays as (0.9/1.5)^t: after 100 steps, 1e-22; the rest is 1/300 steps
    torch.testing.assert_close(r_dense.exponents.double(), want, rtol=0, atol=2e-7)
    # a spread of log(15) per step and cond(S) = 100: float32's bound (30) allows one step, the float64 chain's
    # (WIDENED_TARGET, 1e7) four
    assert r_plain.attrs["reortho_interval_max"] == 1 and r_dense.attrs["reortho_interval_max"] == 4
    assert r_dense.attrs["lyapunov_qr_count"] < r_plain.attrs["lyapunov_qr_count"] / 2


def test_a_float32_model_s_auto_exponents_equal_a_float64_every_step_reference():
    """Through the public API: a float32 GRU's "auto" spectrum (its J_t chain in float64) equals the float64 model's
    every-step spectrum to float32's rounding of J_t, with fewer than half the QRs."""
    model, x = bundled_gru(), flipflop(2, 300, generator=gen(0))[0]
    kw = dict(warmup=20, ci=None)
    ref = rnnjac.lyapunov_spectrum(model, x, dtype=F64, generator=gen(0), **kw).lyapunov_exponents.values
    auto = rnnjac.lyapunov_spectrum(model, x, reortho_every="auto", generator=gen(0), **kw)
    assert auto.lyapunov_exponents.dtype == np.float32
    assert auto.attrs["lyapunov_mean_log10_condition"] <= np.log10(WIDENED_TARGET) + 1e-9
    np.testing.assert_allclose(auto.lyapunov_exponents.values[:, :4], ref[:, :4], rtol=0, atol=2e-7)
    np.testing.assert_allclose(auto.lyapunov_exponents.values, ref, rtol=0, atol=3e-5)
    assert auto.attrs["lyapunov_qr_count"] < 280 / 2


def test_a_factored_step_with_wide_true_runs_the_chain_in_float64():
    """``step(..., wide=True)``: ``apply`` takes the float64 tangents itself (operands widened by the caller);
    the chain is widened exactly as a dense one, and gives the same exponents."""
    mu = torch.tensor([1.5, -0.9, 0.6, 0.25, -0.1], dtype=F64)
    s, s_inv = nonnormal(mu, cond=1e2)
    j32 = (s @ torch.diag(mu) @ s_inv).float().expand(2, 5, 5).contiguous()
    q0 = initial_basis(5, 5, gen(1), torch.float32, batch=2)
    results = []
    for wide in (False, True):
        acc = LyapunovQR(q0, 300, tangent_warmup=100, reortho_every="auto")
        for t in range(1, 301):
            if wide:
                acc.step(t, lambda q: j32.double() @ q, wide=True)
            else:
                acc.step(t, partial(torch.bmm, j32), matrix=j32)
        assert acc.widened and acc.q.dtype == F64
        results.append(acc.result())
    assert results[0].attrs["lyapunov_qr_count"] == results[1].attrs["lyapunov_qr_count"]
    torch.testing.assert_close(results[1].exponents, results[0].exponents, rtol=0, atol=1e-12)


def _float32_auto_and_float64_reference(model, x, warmup: int):
    """A float32 model's "auto" spectrum (checked to have run its chain in float64: a condition beyond float32's
    bound of 30) and the float64 model's every-step exponents (the reference)."""
    kw = dict(warmup=warmup, ci=None)
    ref = rnnjac.lyapunov_spectrum(model, x, dtype=F64, generator=gen(0), **kw).lyapunov_exponents.values
    auto = rnnjac.lyapunov_spectrum(model, x, reortho_every="auto", generator=gen(0), **kw)
    assert auto.lyapunov_exponents.dtype == np.float32
    assert auto.attrs["lyapunov_mean_log10_condition"] > np.log10(30)
    return auto, ref


def test_a_float32_stacked_rnn_takes_the_widened_factored_chain():
    """A 2-layer float32 tanh RNN's full spectrum (J Q from the shared weights, no J_t formed): its "auto" exponents
    equal the float64 model's every-step spectrum to float32's rounding of the weights, with the float64 chain's
    condition bound (fewer than a third of the QRs)."""
    torch.manual_seed(0)
    model = torch.nn.RNN(3, 6, num_layers=2, batch_first=True)
    auto, ref = _float32_auto_and_float64_reference(model, torch.randn(2, 300, 3, generator=gen(2)), warmup=20)
    np.testing.assert_allclose(auto.lyapunov_exponents.values, ref, rtol=0, atol=1e-6)
    assert auto.attrs["lyapunov_qr_count"] < 280 / 3


def test_auto_widens_a_float32_chain_up_to_d_256_and_a_fixed_schedule_only_to_128():
    """A float32 2-layer GRU with D = 256: with ``reortho_every="auto"`` its chain runs in float64 (fewer QRs, the
    float64 model's every-step exponents to float32's rounding of J_t); with a QR every step it stays float32."""
    assert LyapunovQR(initial_basis(256, 4, gen(0), torch.float32), 10, reortho_every="auto").chain_dtype == F64
    assert LyapunovQR(initial_basis(256, 4, gen(0), torch.float32), 10).chain_dtype == torch.float32
    assert (
        LyapunovQR(initial_basis(512, 4, gen(0), torch.float32), 10, reortho_every="auto").chain_dtype == torch.float32
    )
    torch.manual_seed(0)
    model = torch.nn.GRU(3, 128, num_layers=2, batch_first=True)
    auto, ref = _float32_auto_and_float64_reference(model, torch.randn(1, 60, 3, generator=gen(2)), warmup=10)
    np.testing.assert_allclose(auto.lyapunov_exponents.values, ref, rtol=0, atol=1e-5)
    assert auto.attrs["lyapunov_qr_count"] < 50 / 2
