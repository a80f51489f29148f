"""Numerics at the edges: exactly singular steps, collapsed Lyapunov directions, bounded memory, progress."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
from rnnjac import _linalg

F64 = torch.float64
spectra_module = importlib.import_module("rnnjac._spectra")  # the module, not the function rnnjac.spectra


def linear_cell(w: torch.Tensor) -> rnnjac.CustomCell:
    n = w.shape[0]
    return rnnjac.CustomCell(lambda s, x: s @ w.T + x, jacobian=lambda s, x: w.expand(s.shape[0], n, n))


def tanh_rnn(n: int, gain: float, dtype, seed: int = 0) -> nn.RNN:
    rnn = nn.RNN(1, n, bias=False, batch_first=True).to(dtype)
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64) * gain / n**0.5
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w.to(dtype))
    return rnn


def mp_log_svdvals(mats: list[np.ndarray]) -> list[float]:
    """log singular values of the product ``mats[-1] @ ... @ mats[0]`` with 200 digits (descending)."""
    with mpmath.workdps(200):
        prod = mpmath.eye(mats[0].shape[0])
        for m in mats:
            prod = mpmath.matrix(m.tolist()) * prod
        sv = mpmath.svd_r(prod, compute_uv=False)
        return sorted((float(mpmath.log(v)) if v > 0 else -np.inf for v in sv), reverse=True)


def assert_inf_only_at_the_bottom(e2e: np.ndarray) -> None:
    """Descending per step, with any -inf as a block at the end: no -inf between finite neighbours."""
    assert not np.isnan(e2e).any() and not np.isposinf(e2e).any()
    ninf = np.isneginf(e2e)
    assert (ninf[..., :-1] <= ninf[..., 1:]).all(), "a -inf above a finite value"
    fin = np.where(ninf, -np.inf, e2e)
    assert (np.diff(fin, axis=-1) <= 1e-9 * np.maximum(1.0, np.abs(fin[..., 1:]))).all()


# ----------------------------------------------------------------------------- exactly singular products
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_recurrent_weights_lose_every_direction(dtype):
    rnn = nn.RNN(2, 5, batch_first=True).to(dtype)
    with torch.no_grad():
        rnn.weight_hh_l0.zero_()
    x = torch.randn(3, 30, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    ds = rnnjac.spectra(rnn, x, end_to_end=True, singular_values=False, generator=torch.Generator().manual_seed(0))
    # J_t = diag(tanh') W_hh = 0: ds_t/ds_0 = 0 from t = 1 on, and every direction collapses
    assert np.isneginf(ds.end_to_end_log_singular_values.values).all()
    assert np.isneginf(ds.lyapunov_exponents.values).all()
    np.testing.assert_array_equal(ds.kaplan_yorke_dimension.values, 0.0)
    np.testing.assert_array_equal(ds.ks_entropy.values, 0.0)


@pytest.mark.parametrize("seed", [0, 3, 5, 10])  # 3, 5, 10: weights where R had an exact zero diagonal entry
def test_lstm_with_zero_recurrent_weights_keeps_the_cell_path(seed):
    # gates depend on x only: J_t = [[0, diag(a_t)], [0, diag(f_t)]] with a_t = o_t tanh'(c_t) f_t, so
    # ds_t/ds_0 = [[0, diag(a_t F)], [0, diag(f_t F)]], F = prod_{s<t} f_s: H values -inf and
    # H values log F + log(a_t^2 + f_t^2) / 2
    h, steps = 4, 40
    torch.manual_seed(seed)
    lstm = nn.LSTM(3, h, batch_first=True).double()
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
    x = torch.randn(2, steps, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    c0 = torch.randn(1, 2, h, generator=torch.Generator().manual_seed(2), dtype=F64)
    h0 = torch.zeros(1, 2, h, dtype=F64)
    ds = rnnjac.spectra(lstm, x, (h0, c0), end_to_end=True, singular_values=False)
    with torch.no_grad():
        gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + lstm.bias_hh_l0
        i, f = torch.sigmoid(gates[..., :h]), torch.sigmoid(gates[..., h : 2 * h])
        g, o = torch.tanh(gates[..., 2 * h : 3 * h]), torch.sigmoid(gates[..., 3 * h :])
        c, cs = c0[0], []
        for t in range(steps):
            c = f[:, t] * c + i[:, t] * g[:, t]
            cs.append(c)
        c = torch.stack(cs, 1)
        a = o * (1 - torch.tanh(c) ** 2) * f
        log_f_before = torch.cumsum(torch.log(f), 1) - torch.log(f)
        want = log_f_before + 0.5 * torch.log(a**2 + f**2)
    want = np.sort(want.numpy(), -1)[..., ::-1]
    got = ds.end_to_end_log_singular_values.values
    assert np.isneginf(got[..., h:]).all()
    np.testing.assert_allclose(got[..., :h], want, rtol=1e-10, atol=1e-10)
    lam = ds.lyapunov_exponents.values
    assert np.isneginf(lam[:, h:]).all() and np.isfinite(lam[:, :h]).all()


def test_diagonal_linear_system_with_a_zero_eigenvalue():
    eigs = torch.tensor([0.9, -0.5, 0.0, 0.3, 1.1], dtype=F64)
    steps = 400
    ds = rnnjac.spectra(
        linear_cell(torch.diag(eigs)),
        torch.zeros(2, steps, 5, dtype=F64),
        torch.randn(2, 5, dtype=F64),
        generator=torch.Generator().manual_seed(0),
        end_to_end=True,
    )
    e2e = ds.end_to_end_log_singular_values.values
    logs = np.log([1.1, 0.9, 0.5, 0.3])
    want = np.arange(1, steps + 1)[:, None] * logs[None]
    np.testing.assert_allclose(e2e[..., :4], np.broadcast_to(want, (2, steps, 4)), rtol=1e-12, atol=1e-9)
    assert np.isneginf(e2e[..., 4]).all()
    lam = ds.lyapunov_exponents.values
    assert np.isneginf(lam[:, 4]).all()
    np.testing.assert_allclose(lam[:, :4], np.broadcast_to(logs, (2, 4)), atol=5.0 / steps)
    # Kaplan-Yorke: 0.0953 - 0.105 < 0 after two exponents, so j = 1 and D = 1 + 0.0953 / 0.105
    np.testing.assert_allclose(ds.kaplan_yorke_dimension.values, 1 + lam[:, 0] / np.abs(lam[:, 1]))
    np.testing.assert_allclose(ds.ks_entropy.values, lam[:, 0])


def test_relu_with_dead_units_against_a_200_digit_product():
    n, steps = 6, 12
    rnn = nn.RNN(2, n, nonlinearity="relu", batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.3 * torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=F64))
        rnn.bias_ih_l0.fill_(5.0)  # the other units stay active
        rnn.bias_ih_l0[[0, 3]] = -1e3  # units 0 and 3 are dead at every step (rows of J_t exactly zero)
    x = torch.randn(1, steps, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    h0 = torch.ones(1, 1, n, dtype=F64)
    ds = rnnjac.spectra(rnn, x, h0, end_to_end=True, singular_values=False)
    got = ds.end_to_end_log_singular_values.values[0]
    with torch.no_grad():
        j = rnnjac.jacobians(rnn, x, h0)[0].numpy()
    for t in (1, 2, 5, steps):
        want = mp_log_svdvals(list(j[:t]))
        finite = np.array(want) > -300  # 200 digits: exact zeros come out below exp(-400)
        assert finite.sum() == n - 2
        np.testing.assert_array_equal(np.isneginf(got[t - 1]), ~finite)
        np.testing.assert_allclose(got[t - 1][finite], np.array(want)[finite], rtol=1e-9, atol=1e-8)
    assert np.isneginf(ds.lyapunov_exponents.values[0]).sum() == 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype,gain,steps", [(torch.float64, 2.0, 300), (torch.float32, 3.0, 200)])
def test_chaotic_end_to_end_has_no_spurious_minus_inf(dtype, gain, steps):
    n = 48
    rnn = tanh_rnn(n, gain, dtype)
    h0 = torch.randn(1, 2, n, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    x = torch.zeros(2, steps, 1, dtype=dtype)
    ds = rnnjac.spectra(rnn, x, h0, singular_values=False, lyapunov=False, end_to_end=True)
    e2e = ds.end_to_end_log_singular_values.values
    assert_inf_only_at_the_bottom(e2e)
    # a direction is lost only by an exactly zero row of some J_s, s <= t (tanh' = 0 in the dtype)
    with torch.no_grad():
        zero_rows = (rnnjac.jacobians(rnn, x, h0) == 0).all(-1).sum(-1).numpy()
    assert (np.isneginf(e2e).sum(-1) <= np.cumsum(zero_rows, -1)).all()
    if dtype == torch.float64:  # no tanh' is exactly 0 at gain 2 in float64: every value is finite
        assert np.isfinite(e2e).all()
        assert e2e.min() < -1000  # far below the float64 range of the values themselves


def test_graded_log_svdvals_unordered_wide_scales():
    # scales out of order by 5 nats and 800 nats apart: svdvals of the scaled matrix loses the small pair
    log_e = torch.tensor([[0.0, 5.0, -800.0, -795.0]], dtype=F64)
    k = torch.eye(4, dtype=F64)
    k[0, 1] = k[2, 3] = 0.5
    k = k / k.norm(dim=-1, keepdim=True)
    got = _linalg.graded_log_svdvals(log_e, k[None])[0].numpy()
    m = np.diag(np.exp(np.float64([0.0, 5.0]))) @ k[:2, :2].numpy()
    top = np.log(np.linalg.svd(m, compute_uv=False))
    low = np.log(np.linalg.svd(np.diag(np.exp([0.0, 5.0])) @ k[2:, 2:].numpy(), compute_uv=False)) - 800.0
    np.testing.assert_allclose(got, np.concatenate([top, low]), rtol=1e-12)


# ----------------------------------------------------------------------------- collapsed Lyapunov directions
def test_kaplan_yorke_and_entropy_with_minus_inf_exponents():
    inf = float("inf")
    lam = torch.tensor([[0.5, -1.0, -inf], [0.2, -inf, -inf], [-inf, -inf, -inf], [0.3, 0.1, -inf]], dtype=F64)
    got = _linalg.kaplan_yorke(lam).numpy()
    np.testing.assert_array_equal(got, [1.5, 1.0, 0.0, 2.0])
    assert not np.isnan(got).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saturated_tanh_at_gain_10_same_count_in_both_dtypes(dtype):
    # four units at a fixed point with pre-activation 10 (tanh' = 8.2e-9 in float64, exactly 0 in
    # float32) and four contracting ones with gain 0.5: four collapsed directions in both dtypes
    rnn = nn.RNN(1, 8, bias=False, batch_first=True).double()
    w = torch.diag(torch.tensor([10.0] * 4 + [0.5] * 4, dtype=F64))
    w[:4, 4:] = 0.01 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w)
    rnn = rnn.to(dtype)
    h0 = torch.ones(1, 2, 8, dtype=dtype)
    x = torch.zeros(2, 300, 1, dtype=dtype)
    ds = rnnjac.lyapunov_spectrum(rnn, x, h0, warmup=50, generator=torch.Generator().manual_seed(0))
    lam = ds.lyapunov_exponents.values
    assert (np.isneginf(lam).sum(-1) == 4).all()
    # the live units decay to 0 with slope 0.5 (exponent log 0.5 up to the O(1/T) transient)
    np.testing.assert_allclose(lam[:, :4], np.log(0.5), atol=0.05)


def test_floor_leaves_regular_exponents_bit_identical(monkeypatch):
    # the floor is far below any growth of this model: clamping must not change a single bit
    rnn = tanh_rnn(12, 1.5, F64)
    x = torch.randn(2, 200, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(warmup=10, generator=None)
    a = rnnjac.lyapunov_spectrum(rnn, x, **{**kw, "generator": torch.Generator().manual_seed(0)})
    monkeypatch.setattr(_linalg, "COLLAPSE_LOG2", -2000)
    b = rnnjac.lyapunov_spectrum(rnn, x, **{**kw, "generator": torch.Generator().manual_seed(0)})
    np.testing.assert_array_equal(a.lyapunov_exponents.values, b.lyapunov_exponents.values)
    assert np.isfinite(a.lyapunov_exponents.values).all()


# ----------------------------------------------------------------------------- bounded memory
def test_iter_jacobians_runs_the_trajectory_chunk_by_chunk(monkeypatch):
    lengths = []
    run = rnnjac._dynamics.Dynamics.run

    def spy(self, s0, xs):
        lengths.append(xs.shape[1])
        return run(self, s0, xs)

    monkeypatch.setattr(rnnjac._dynamics.Dynamics, "run", spy)
    lstm = nn.LSTM(3, 4, batch_first=True).double()  # parameters require grad
    x = torch.randn(2, 50, 3, dtype=F64)
    with torch.no_grad():
        chunks = list(rnnjac.iter_jacobians(lstm, x, time_chunk=8))
    assert max(lengths) <= 8 and sum(lengths) == 50
    assert all(j.grad_fn is None and not j.requires_grad for _, j in chunks)
    # grad mode on and parameters requiring grad: still no graph by default (bounded memory)
    assert all(j.grad_fn is None for _, j in rnnjac.iter_jacobians(lstm, x, time_chunk=8))


def test_iter_jacobians_differentiable_on_request():
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 20, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    chunks = rnnjac.iter_jacobians(lstm, x, time_chunk=6, differentiable=True)
    total = sum(j.square().sum() for _, j in chunks)
    (g_chunks,) = torch.autograd.grad(total, [lstm.weight_hh_l0])
    (g_whole,) = torch.autograd.grad(rnnjac.jacobians(lstm, x).square().sum(), [lstm.weight_hh_l0])
    torch.testing.assert_close(g_chunks, g_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_iter_jacobians_peak_memory_does_not_grow_with_T():
    script = textwrap.dedent(
        """
        import resource, torch, rnnjac
        torch.manual_seed(0)
        rnn = torch.nn.RNN(1, 8, batch_first=True).double()

        def run(steps):
            x = torch.randn(1024, steps, 1, dtype=torch.float64)
            for _, j in rnnjac.iter_jacobians(rnn, x, time_chunk=50):  # grad mode on, weights require grad
                pass
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

        run(100)
        a = run(500)
        b = run(3000)
        print((b - a) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    # keeping the 1024 x 3001 x 8 float64 states alone would add ~160 MB between T = 500 and 3000
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB from T=500 to T=3000"


# ----------------------------------------------------------------------------- progress and stored variables
class CountingBar:
    def __init__(self, *args, **kwargs):
        self.total, self.calls, self.done = kwargs.get("total"), 0, 0

    def update(self, n=1):
        self.calls += 1
        self.done += n

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("lyapunov", [True, False])
def test_progress_is_reported_per_step_or_per_small_chunk(monkeypatch, lyapunov):
    bars = []
    monkeypatch.setattr(spectra_module, "tqdm", lambda *a, **k: bars.append(CountingBar(*a, **k)) or bars[-1])
    rnn = tanh_rnn(6, 1.0, F64)
    x = torch.zeros(2, 300, 1, dtype=F64)
    rnnjac.spectra(rnn, x, lyapunov=lyapunov, progress=True)
    (bar,) = bars
    assert bar.done == 300
    # one update per step with a sequential loop; otherwise chunks of ~1% (not one update per big chunk)
    assert bar.calls == 300 if lyapunov else bar.calls >= 100


def test_end_to_end_keeps_only_the_log_variable():
    rnn = tanh_rnn(5, 1.0, F64)
    ds = rnnjac.spectra(rnn, torch.zeros(1, 10, 1, dtype=F64), end_to_end=True)
    assert "end_to_end_log_singular_values" in ds and "end_to_end_singular_values" not in ds
