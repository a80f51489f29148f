"""The fast paths of the spectra pass (issue 18): no linearisation of warm-up steps, warmup="auto", the h-only
Jacobian of stacked LSTMs, and top-k per-step singular values by block Krylov, each against an independent
reference (a run started after the warm-up, torch.func Jacobians, full SVDs, a first-entry rule)."""

from __future__ import annotations

import math

import pytest
import torch
from problems import Problem

import rnnjac
from rnnjac._checks import prepare
from rnnjac._dynamics import as_dynamics
from rnnjac._kernels import spectra_tensors, top_singular_values
from rnnjac._options import SpectraOptions
from rnnjac._transients import auto_warmup

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingRate:
    """A tanh rate network ``h <- (1 - dt) h + dt (W tanh(h) + x)`` as a CustomCell whose closed-form jacobian
    counts the points it is asked for."""

    def __init__(self, n: int, gain: float, seed: int = 0, dt: float = 0.1):
        g = gen(seed)
        self.w = gain * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
        self.w.fill_diagonal_(0)
        self.dt, self.n, self.rows = dt, n, 0
        self.cell = rnnjac.CustomCell(self.step, self.jacobian, name="rate")

    def step(self, s, x):
        return (1 - self.dt) * s + self.dt * (torch.tanh(s) @ self.w.T + x)

    def jacobian(self, s, x):
        self.rows += s.shape[0]
        d = 1 - torch.tanh(s) ** 2
        eye = torch.eye(self.n, dtype=s.dtype)
        return (1 - self.dt) * eye + self.dt * self.w * d[:, None, :]


def lyap_only(**kw) -> SpectraOptions:
    return SpectraOptions(singular_values=False, ci=None, **kw)


# ----------------------------------------------------------------------------- warm-up: the state only
def test_warmup_steps_are_run_not_linearised():
    rate = CountingRate(6, 1.5)
    b, steps, warmup = 3, 60, 50
    xs = 0.3 * torch.randn(b, steps, 6, generator=gen(1), dtype=F64)
    h0 = torch.randn(b, 6, generator=gen(2), dtype=F64)
    problem = prepare(rate.cell, xs, h0)
    rate.rows = 0
    out = spectra_tensors(problem, lyap_only(warmup=warmup, keep_states=True), generator=gen(3))
    assert rate.rows == b * (steps - warmup)  # the jacobian saw only the 10 used steps
    # the same numbers as a run that starts at s_warmup
    states = problem.dyn.run(h0, xs)
    torch.testing.assert_close(out["states"], states[:, 1:], atol=1e-14, rtol=0)
    later = prepare(rate.cell, xs[:, warmup:], states[:, warmup])
    ref = spectra_tensors(later, lyap_only(), generator=gen(3))
    torch.testing.assert_close(out["lyapunov_exponents"], ref["lyapunov_exponents"], atol=1e-13, rtol=0)


@pytest.mark.parametrize("k", [2, None])  # the structured J Q and the materialised bmm path
def test_warmup_skip_matches_a_later_start_for_builtin_cells(k):
    p = Problem("gru", hidden=40)
    m, x = p.module(), p.inputs(batch=2, steps=50)
    states = rnnjac.trajectory(m, x)
    out = spectra_tensors(prepare(m, x), lyap_only(k=k, warmup=35, tangent_warmup=3), generator=gen(1))
    ref = spectra_tensors(prepare(m, x[:, 35:], states[:, 35]), lyap_only(k=k, tangent_warmup=3), generator=gen(1))
    torch.testing.assert_close(out["lyapunov_exponents"], ref["lyapunov_exponents"], atol=1e-13, rtol=0)


def test_per_step_outputs_still_linearise_the_warmup_steps():
    rate = CountingRate(5, 0.8)
    xs = torch.zeros(2, 30, 5, dtype=F64)
    problem = prepare(rate.cell, xs, torch.ones(2, 5, dtype=F64))
    rate.rows = 0
    out = spectra_tensors(problem, SpectraOptions(warmup=20, ci=None), generator=gen(0))
    assert rate.rows == 2 * 30
    assert bool(torch.isfinite(out["singular_values"]).all())


# ----------------------------------------------------------------------------- warmup="auto"
def rate_states(gain: float, seed: int = 0, n: int = 100, batch: int = 16, steps: int = 1000) -> torch.Tensor:
    """States of the rate network from a large h0 (RMS 20) with weak input noise: a decaying transient."""
    rate = CountingRate(n, gain, seed)
    g = gen(100 + seed)
    xs = 0.3 * torch.randn(batch, steps, n, generator=g, dtype=F64)
    return as_dynamics(rate.cell, state_size=n).run(20 * torch.randn(batch, n, generator=g, dtype=F64), xs)


def first_entry(states: torch.Tensor, window: int = 10, tol: float = 3.0) -> int:
    """Hand-tuned warm-up: the step at which the 10-step moving average of the batch-mean RMS state first comes
    within 3 standard deviations of its mean over the second half of the run."""
    rms = (torch.linalg.vector_norm(states[:, 1:], dim=-1) / math.sqrt(states.shape[-1])).mean(0)
    smooth = rms.unfold(0, window, 1).mean(-1)
    tail = smooth[len(smooth) // 2 :]
    inside = torch.nonzero((smooth - tail.mean()).abs() <= tol * tail.std()).flatten()
    return int(inside[0]) + window


@pytest.mark.parametrize("gain", [0.5, 1.5, 3.0])  # stable, near the transition, chaotic
def test_auto_warmup_lands_near_a_hand_tuned_warmup(gain):
    states = rate_states(gain)
    hand, auto = first_entry(states), auto_warmup(states, 900)
    assert hand / 2 <= auto <= 2 * hand, (hand, auto)
    assert auto_warmup(states, 7) == 7  # bounded by the caller's limit


def test_auto_warmup_through_the_pass_records_it_and_skips_those_steps():
    rate = CountingRate(20, 3.0)
    g = gen(5)
    xs = 0.3 * torch.randn(4, 300, 20, generator=g, dtype=F64)
    h0 = 20 * torch.randn(4, 20, generator=g, dtype=F64)
    problem = prepare(rate.cell, xs, h0)
    rate.rows = 0
    out = spectra_tensors(problem, lyap_only(warmup="auto", k=3), generator=gen(0))
    used = out["attrs"]["warmup_used"]
    assert used == auto_warmup(problem.dyn.run(h0, xs), 299) and 10 <= used <= 150
    assert rate.rows == 4 * (300 - used)
    ref = spectra_tensors(problem, lyap_only(warmup=used, k=3), generator=gen(0))
    torch.testing.assert_close(out["lyapunov_exponents"], ref["lyapunov_exponents"], atol=1e-13, rtol=0)


# ----------------------------------------------------------------------------- state="h" without [h; c]
@pytest.mark.parametrize("proj", [0, 3])
def test_h_jacobian_equals_torch_func_of_the_h_step(proj):
    m = torch.nn.LSTM(3, 5, num_layers=3, proj_size=proj, batch_first=True).double()
    dyn = as_dynamics(m)
    s = torch.randn(6, dyn.state_size, generator=gen(0), dtype=F64)
    x = torch.randn(6, 3, generator=gen(1), dtype=F64)
    base, step = dyn.restricted_step("h", s)

    def one(z, xi, si):
        return step(z[None], xi[None], si[None])[0]

    ref = torch.func.vmap(torch.func.jacrev(one))(base, x, s)
    torch.testing.assert_close(dyn.linearize(s, x).materialize("h"), ref, atol=1e-13, rtol=0)


def test_state_h_spectrum_equals_the_autograd_path():
    p = Problem("lstm", layers=2, hidden=6)
    m, x = p.module(), p.inputs(batch=2, steps=40)
    opts = dict(state="h", singular_values=True, ci=None)
    ours = spectra_tensors(prepare(m, x, state="h"), SpectraOptions(**opts), generator=gen(0))
    ref = spectra_tensors(prepare(m, x, state="h", method="autograd"), SpectraOptions(**opts), generator=gen(0))
    for name in ("lyapunov_exponents", "singular_values"):
        torch.testing.assert_close(ours[name], ref[name], atol=1e-11, rtol=0)


# ----------------------------------------------------------------------------- top-k singular values
@pytest.mark.parametrize(
    ("model", "state", "dtype", "formed"),
    [
        (lambda: torch.nn.GRU(4, 96), "full", torch.float32, True),
        (lambda: torch.nn.GRU(4, 96), "full", F64, True),
        (lambda: torch.nn.LSTM(4, 40), "full", F64, True),
        (lambda: torch.nn.LSTM(4, 40), "h", F64, True),
        (lambda: torch.nn.LSTM(4, 40, proj_size=30), "full", F64, False),
        (lambda: torch.nn.LSTM(4, 40, num_layers=2), "full", torch.float32, False),
        (lambda: torch.nn.LSTM(4, 40, num_layers=2), "h", F64, False),
    ],
)
def test_top_singular_values_equal_full_svd(model, state, dtype, formed):
    """Both routes of the Krylov products, against full SVDs: ``J`` formed once (one layer, no projection: row
    scalings of the weights) and the factored products (a stack or a projection, whose ``J`` holds products)."""
    torch.manual_seed(0)
    dyn = as_dynamics(model().to(dtype))
    s = torch.randn(5, dyn.state_size, generator=gen(0), dtype=dtype)
    lin = dyn.linearize(s, torch.randn(5, 4, generator=gen(1), dtype=dtype))
    assert lin.factored and lin.forms_cheaply == formed
    j = lin.materialize(state)
    want = torch.linalg.svdvals(j.double())[:, :8]
    got = top_singular_values(lin, 8, state)
    assert got.shape == (5, 8) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("dtype", "rtol"), [(F64, 1e-10), (torch.float32, 1e-5)])
def test_top_singular_values_from_the_banded_ritz_problem_equal_full_svd(monkeypatch, dtype, rtol):
    """Past four blocks the Ritz values come from LAPACK's banded solver on the block-tridiagonal Gram matrix (the
    entries outside the band, rounding, left out): still the top values of a full SVD of the materialised J."""
    import scipy.linalg

    calls = []
    banded = scipy.linalg.eig_banded
    monkeypatch.setattr(scipy.linalg, "eig_banded", lambda *a, **kw: calls.append(1) or banded(*a, **kw))
    torch.manual_seed(0)
    dyn = as_dynamics(torch.nn.GRU(2, 120).to(dtype))
    s, x = torch.randn(3, 120, generator=gen(0)), torch.randn(3, 2, generator=gen(1))
    lin = dyn.linearize(s.to(dtype), x.to(dtype))
    want = torch.linalg.svdvals(lin.materialize().double())[:, :3]
    got = top_singular_values(lin, 3)
    assert calls and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize(("active", "k"), [(1, 4), (3, 4), (6, 4), (12, 8)])
def test_top_singular_values_of_a_low_rank_jacobian(active, k):
    """A ReLU RNN with all but ``active`` units dead has rank(J) = active: the Krylov space stops growing, and the
    QR of a rank-deficient block returns columns of normalised rounding (they pointed back into the basis and the
    Ritz values overshot by up to 70%). Against full SVDs, relative to the largest value."""
    rnn = torch.nn.RNN(2, 64, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.bias_hh_l0.fill_(-100.0)
        rnn.bias_hh_l0[:active] = 100.0
    dyn = as_dynamics(rnn)
    lin = dyn.linearize(torch.randn(3, 64, generator=gen(0), dtype=F64), torch.randn(3, 2, generator=gen(1), dtype=F64))
    want = torch.linalg.svdvals(lin.materialize().detach())[:, :k]
    got = top_singular_values(lin, k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * float(want[:, 0].max()))


def test_singular_values_k_through_the_pass():
    torch.manual_seed(0)
    m = torch.nn.GRU(3, 64, batch_first=True).double()
    x = torch.randn(2, 12, 3, generator=gen(2), dtype=F64)
    out = spectra_tensors(prepare(m, x), SpectraOptions(singular_values=4, lyapunov=False), generator=gen(0))
    want = torch.linalg.svdvals(rnnjac.jacobians(m, x).detach())[..., :4]
    assert out["singular_values"].shape == (2, 12, 4)
    torch.testing.assert_close(out["singular_values"], want, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("d", "k"), [(5, 2), (5, 1), (7, 3), (9, 2), (33, 5)])
def test_top_singular_values_when_the_blocks_do_not_tile_the_space(d, k):
    """D not a multiple of the block width 2k: the last Krylov block is narrower (it was left out, and a GRU
    with D=5, k=2 gave 0.667 for a top value of 0.685)."""
    from rnnjac._dynamics import as_dynamics
    from rnnjac._kernels import top_singular_values

    torch.manual_seed(d)
    dyn = as_dynamics(torch.nn.GRU(2, d).double())
    lin = dyn.linearize(torch.randn(3, d, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    full = torch.linalg.svdvals(lin.materialize())[:, :k]
    torch.testing.assert_close(top_singular_values(lin, k), full, rtol=1e-10, atol=1e-12)


def test_top_singular_values_of_a_diverging_model_raise_non_finite_error():
    """A state that overflows is reported as such (NonFiniteError with its step) before the Krylov solve meets it
    (it raised LAPACK's error from an eigensolver)."""
    rnn = torch.nn.RNN(2, 64, nonlinearity="relu", batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(64) * 1e30)
        rnn.bias_hh_l0.fill_(1.0)
    with pytest.raises(rnnjac.errors.NonFiniteError, match="step t=3"):
        rnnjac.spectra(rnn, torch.randn(1, 10, 2, generator=gen(0)), singular_values=4, lyapunov=False)
