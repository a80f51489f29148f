"""Standard errors, intervals and convergence of Lyapunov exponents (``rnnjac._uncertainty``).

Coverage is measured on systems whose exponents are known in closed form, never against rnnjac's own output:

- products of real Ginibre matrices, entries N(0, c^2/N): ``R_ii^2`` of the QR of ``J Q`` is ``c^2/N`` times a
  chi-square with ``N - i + 1`` degrees of freedom, independently at every step, so
  ``lambda_i = 1/2 [ln(2 c^2 / N) + psi((N - i + 1) / 2)]`` (Newman 1986; checked below against an independent
  NumPy simulation);
- a linear system ``J_t = S diag(mu exp(x_t)) S^-1`` with a non-normal S and AR(1) inputs ``x_t`` of mean 0: the
  ``J_t`` commute, so ``lambda_i = ln mu_i``, and the local exponents are autocorrelated (time blocks needed).

The repetitions run as one ``lyapunov_spectrum`` call with B = repetitions x trajectories, then are grouped.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma

import rnnjac
from rnnjac._uncertainty import autocorrelation_time, convergence, lyapunov_uncertainty

REPS = 300


def newman(n: int, log_scale: float = 0.0) -> np.ndarray:
    """Exponents of products of N x N real Gaussian matrices with entries N(0, exp(2 log_scale) / N)."""
    return 0.5 * (np.log(2 / n) + digamma((n - np.arange(1, n + 1) + 1) / 2)) + log_scale


def ginibre_cell(n: int, scale: float = 1.0):
    """The step ``s -> X_t s`` with the matrix ``X_t`` carried by the input (entries N(0, scale^2 / n))."""

    def jac(s, x):
        return scale * x.view(-1, n, n)

    return rnnjac.CustomCell(lambda s, x: (jac(s, x) @ s.unsqueeze(-1)).squeeze(-1), jacobian=jac)


def ginibre_run(n, reps, per, steps, *, scale=1.0, reortho_every=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(reps * per, steps, n * n, generator=g, dtype=torch.float64) / math.sqrt(n)
    h0 = torch.randn(reps * per, n, generator=g, dtype=torch.float64)
    return rnnjac.lyapunov_spectrum(
        ginibre_cell(n, scale), x, h0, local_lyapunov=True, reortho_every=reortho_every, generator=g
    )


MU = torch.tensor([1.1, 0.9, 0.5], dtype=torch.float64)
S = torch.tensor([[1.0, 0.8, 0.3], [0.0, 1.0, 0.7], [0.2, 0.0, 1.0]], dtype=torch.float64)


def linear_run(reps, per, steps, *, rho=0.7, sd=0.3, tangent_warmup=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(reps * per, steps, 3, generator=g, dtype=torch.float64)
    x = torch.empty_like(e)
    x[:, 0] = sd * e[:, 0]
    for t in range(1, steps):  # stationary AR(1): the local exponents are correlated over ~ (1+rho)/(1-rho) steps
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho**2) * sd * e[:, t]
    s_inv = torch.linalg.inv(S)

    def jac(s, x):
        return S @ torch.diag_embed(MU * torch.exp(x)) @ s_inv

    cell = rnnjac.CustomCell(lambda s, x: (jac(s, x) @ s.unsqueeze(-1)).squeeze(-1), jacobian=jac)
    h0 = torch.randn(reps * per, 3, generator=g, dtype=torch.float64)
    return rnnjac.lyapunov_spectrum(cell, x, h0, local_lyapunov=True, tangent_warmup=tangent_warmup, generator=g)


def grouped(ds, per):
    e = torch.from_numpy(ds.lyapunov_exponents.values)
    loc = torch.from_numpy(ds.local_lyapunov.values)
    return [(e[i : i + per], loc[i : i + per]) for i in range(0, e.shape[0], per)]


def coverage(ds, per, truth, **kw) -> np.ndarray:
    truth = torch.as_tensor(truth, dtype=torch.float64)
    hits = []
    for e, loc in grouped(ds, per):
        est = lyapunov_uncertainty(e, loc, n_boot=2, **kw).exponents
        hits.append(((est.lower <= truth) & (truth <= est.upper)).numpy())
    return np.mean(hits, 0)


def test_newman_formula_against_an_independent_simulation():
    """The normalisation of Newman's formula, by NumPy QR over 20,000 steps (not rnnjac)."""
    rng, n, steps = np.random.default_rng(1), 3, 20_000
    q, logs = np.eye(n), np.zeros((steps, n))
    for t in range(steps):
        q, r = np.linalg.qr(rng.normal(0, 1 / math.sqrt(n), (n, n)) @ q)
        logs[t] = np.log(np.abs(np.diag(r)))
    se = logs.std(0) / math.sqrt(steps)  # the steps are independent (module docstring)
    assert np.all(np.abs(logs.mean(0) - newman(n)) < 4 * se), (logs.mean(0), newman(n), se)


def test_coverage_ginibre_batch_and_time():
    """300 repetitions of 4 trajectories x 200 steps, N = 3: measured coverage 0.973, 0.967, 0.957."""
    cov = coverage(ginibre_run(3, REPS, 4, 200), 4, newman(3))
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov


def test_coverage_ginibre_one_trajectory_and_reortho():
    """300 single trajectories of 400 steps (time blocks alone): measured coverage 0.950, 0.940, 0.950.
    With ``reortho_every=3`` (NaN between QRs), 300 x 4 x 210 steps: 0.933, 0.943, 0.957."""
    cov = coverage(ginibre_run(3, REPS, 1, 400, seed=1), 1, newman(3))
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov
    cov = coverage(ginibre_run(3, REPS, 4, 210, reortho_every=3, seed=2), 4, newman(3))
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov


@pytest.mark.slow
def test_coverage_linear_system_with_correlated_local_exponents():
    """Known eigenvalues 1.1, 0.9, 0.5 behind a non-normal basis, AR(1) inputs (rho = 0.7). 300 repetitions of
    4 trajectories x 200 counted steps: measured coverage 0.943, 0.930, 0.927; of one trajectory x 400 steps:
    0.920, 0.953, 0.937."""
    truth = torch.log(MU)
    cov = coverage(linear_run(REPS, 4, 220), 4, truth)
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov
    cov = coverage(linear_run(REPS, 1, 420, seed=1), 1, truth)
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov


def test_coverage_kaplan_yorke_and_entropy_bootstrap():
    """Ginibre N = 4 shifted by ln c = 0.45: exponents (0.315, 0.122, -0.185, -0.878), entropy 0.437,
    Kaplan-Yorke dimension 3.287. 300 repetitions of 4 trajectories x 200 steps, 200 bootstrap replicates each:
    measured coverage 0.937 (Kaplan-Yorke) and 0.950 (entropy)."""
    truth = newman(4, 0.45)
    ky_true = 3 + truth[:3].sum() / abs(truth[3])
    h_true = truth[truth > 0].sum()
    hits = []
    for e, loc in grouped(ginibre_run(4, REPS, 4, 200, scale=math.exp(0.45), seed=3), 4):
        u = lyapunov_uncertainty(e, loc, n_boot=200, seed=7)
        hits.append(
            [u.kaplan_yorke.lower <= ky_true <= u.kaplan_yorke.upper, u.entropy.lower <= h_true <= u.entropy.upper]
        )
    cov = np.mean(hits, 0)
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov


def test_bootstrap_is_seeded_and_point_estimates_are_functions_of_the_mean():
    e, loc = grouped(ginibre_run(4, 1, 4, 200, scale=math.exp(0.45)), 4)[0]
    a, b = lyapunov_uncertainty(e, loc, seed=5), lyapunov_uncertainty(e, loc, seed=5)
    assert torch.equal(a.kaplan_yorke.lower, b.kaplan_yorke.lower)
    m = e.mean(0)
    assert float(a.entropy.mean) == pytest.approx(float(m.clamp(min=0).sum()))
    assert torch.allclose(a.exponents.mean, m)


def test_autocorrelation_time_of_an_ar1_sequence():
    """Integrated autocorrelation time of AR(1) is (1 + rho) / (1 - rho) = 5.67 for rho = 0.7."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(8, 4000, 1, generator=g, dtype=torch.float64)
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, 4000):
        x[:, t] = 0.7 * x[:, t - 1] + math.sqrt(1 - 0.49) * e[:, t]
    assert float(autocorrelation_time(x)) == pytest.approx(1.7 / 0.3, rel=0.15)
    assert float(autocorrelation_time(e)) == pytest.approx(1.0, abs=0.2)


def test_collapsed_exponents_and_too_little_data():
    e = torch.tensor([[0.1, float("-inf")], [0.2, float("-inf")]], dtype=torch.float64)
    loc = torch.full((2, 5, 2), float("nan"), dtype=torch.float64)
    loc[:, -1] = torch.tensor([[0.1, -50.0], [0.2, -50.0]])  # one QR: no time blocks
    u = lyapunov_uncertainty(e, loc)
    assert u.exponents.mean[1] == float("-inf") and u.exponents.stderr[1] == 0 and u.exponents.upper[1] == float("-inf")
    assert float(u.exponents.stderr[0]) == pytest.approx(0.05) and u.block_length.tolist() == [0, 0]
    one = lyapunov_uncertainty(e[:1], loc[:1])  # one sample, one QR: no error at all
    assert torch.isnan(one.exponents.stderr[0]) and torch.isnan(one.exponents.lower[0])


def test_errors_name_the_keyword():
    e, loc = torch.zeros(2, 3), torch.zeros(2, 10, 3)
    with pytest.raises(ValueError, match="ci must be"):
        lyapunov_uncertainty(e, loc, ci=95)
    with pytest.raises(ValueError, match=r"exponents must be \(B, k\)"):
        lyapunov_uncertainty(e, loc[:, :, :2])
    with pytest.raises(ValueError, match="fraction must be"):
        convergence(loc, fraction=1.5)


def test_convergence_flags_a_short_run_and_not_a_long_one():
    """The non-normal linear system without tangent warm-up: the random initial basis needs time to align, a
    transient bias ~ 1/n. Too short a run is flagged (with more steps asked for); the long run is not."""
    short = linear_run(1, 4, 60, tangent_warmup=0, sd=0.05, rho=0.0)
    long = linear_run(1, 4, 6000, tangent_warmup=0, sd=0.05, rho=0.0)
    c_short = convergence(torch.from_numpy(short.local_lyapunov.values))
    c_long = convergence(torch.from_numpy(long.local_lyapunov.values))
    assert not bool(c_short.converged.all()) and int(c_short.more_steps.max()) >= 60, c_short
    assert bool(c_long.converged.all()), c_long
