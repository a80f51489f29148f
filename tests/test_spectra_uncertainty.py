"""The uncertainty and convergence variables of ``spectra``/``lyapunov_spectrum`` (issue 17), streamed in blocks.

The statistics themselves are checked against systems with known exponents in ``tests/test_uncertainty.py``; here:
the streamed block sums give the same intervals as the full local exponents, the coarse blocks of long runs keep
the coverage, memory does not grow with T, the ``ConvergenceWarning``, the schema, sweeps, plots and the CLI line.
"""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_uncertainty import MU, REPS, ginibre_run, grouped, linear_run, newman  # noqa: E402

import rnnjac  # noqa: E402
from rnnjac._datasets import concat_checkpoints, stack_checkpoints, validate  # noqa: E402
from rnnjac._lyapunov_qr import LyapunovQR, initial_basis  # noqa: E402
from rnnjac._uncertainty import MAX_BLOCKS, BlockAccumulator, blocks_from_local, lyapunov_uncertainty  # noqa: E402
from rnnjac.cli._messages import exponent_summary  # noqa: E402
from rnnjac.errors import ConvergenceWarning  # noqa: E402

NEW = (
    "lyapunov_exponents_mean",
    "lyapunov_exponents_stderr",
    "lyapunov_exponents_bounds",
    "kaplan_yorke_dimension_mean",
    "kaplan_yorke_dimension_stderr",
    "kaplan_yorke_dimension_bounds",
    "ks_entropy_mean",
    "ks_entropy_stderr",
    "ks_entropy_bounds",
    "lyapunov_block_length",
    "lyapunov_converged",
    "lyapunov_more_steps",
)


def test_default_dataset_has_intervals_that_match_the_full_local_exponents():
    """The streamed block sums (no local exponents kept) give the intervals of the full ``(B, T, k)`` series."""
    ds = ginibre_run(3, 1, 6, 300, seed=4)  # local_lyapunov=True as well, to compare
    validate(ds)
    assert set(NEW) <= set(ds.data_vars) and list(ds.bound.values) == ["lower", "upper"]
    assert ds.attrs["ci"] == 0.95 and "bootstrap" in ds.attrs["uncertainty_method"]
    e, loc = (torch.from_numpy(ds[v].values) for v in ("lyapunov_exponents", "local_lyapunov"))
    ref = lyapunov_uncertainty(e, loc, seed=ds.attrs["bootstrap_seed"])
    np.testing.assert_allclose(ds.lyapunov_exponents_mean.values, e.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ds.lyapunov_exponents_stderr.values, ref.exponents.stderr.numpy(), rtol=1e-9)
    bounds = ds.lyapunov_exponents_bounds
    np.testing.assert_allclose(bounds.sel(bound="lower").values, ref.exponents.lower.numpy(), rtol=1e-9)
    np.testing.assert_allclose(bounds.sel(bound="upper").values, ref.exponents.upper.numpy(), rtol=1e-9)
    np.testing.assert_allclose(ds.ks_entropy_bounds.values, [ref.entropy.lower, ref.entropy.upper], rtol=1e-9)
    assert ds.lyapunov_block_length.values.tolist() == ref.block_length.tolist()
    truth = newman(3)
    assert np.all((bounds.sel(bound="lower").values < truth) & (truth < bounds.sel(bound="upper").values))


def test_exponents_are_unchanged_and_ci_none_turns_it_off():
    x, g = torch.randn(3, 80, 2, generator=torch.Generator().manual_seed(1)), torch.Generator()
    gru = torch.nn.GRU(2, 6, batch_first=True)
    on = rnnjac.lyapunov_spectrum(gru, x, generator=g.manual_seed(0), dtype=torch.float64)
    off = rnnjac.lyapunov_spectrum(gru, x, generator=g.manual_seed(0), dtype=torch.float64, ci=None)
    np.testing.assert_array_equal(on.lyapunov_exponents.values, off.lyapunov_exponents.values)
    assert not set(NEW) & set(off.data_vars) and "ci" not in off.attrs
    narrow = rnnjac.spectra(gru, x, options=rnnjac.SpectraOptions(ci=0.5, dtype="float64"))
    width = narrow.lyapunov_exponents_bounds.diff("bound").squeeze("bound")
    assert np.all(width.values < on.lyapunov_exponents_bounds.diff("bound").squeeze("bound").values)
    assert rnnjac.SpectraOptions.from_json(narrow.attrs["options_json"]).ci == 0.5
    for bad in (1.5, 0, True, "0.9"):
        with pytest.raises(ValueError, match="ci must be a confidence level"):
            rnnjac.SpectraOptions(ci=bad)


def test_streamed_blocks_have_bounded_memory_and_equal_the_local_series():
    """5000 QRs: at most MAX_BLOCKS blocks per sample (the pairs merge), the same as blocking the full series."""
    d, steps = 4, 5000
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(steps, 2, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    acc = LyapunovQR(initial_basis(d, d, g, batch=2), steps, local=True, blocks=True, reortho_every=2)
    for t in range(1, steps + 1):
        acc.step(t, lambda q, m=mats[t - 1]: m @ q)
    res = acc.result()
    assert res.blocks.sums.shape[1] < MAX_BLOCKS and res.blocks.base == 8 and res.blocks.qrs == steps // 2
    ref = blocks_from_local(res.local)
    assert ref.base == res.blocks.base
    torch.testing.assert_close(res.blocks.sums, ref.sums, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.blocks.steps, ref.steps)
    a, b = lyapunov_uncertainty(res.exponents, res.blocks), lyapunov_uncertainty(res.exponents, res.local)
    torch.testing.assert_close(a.exponents.stderr, b.exponents.stderr)


def test_block_accumulator_merges_pairs():
    acc = BlockAccumulator(1, 2, max_blocks=4)
    for i in range(11):
        acc.add(torch.tensor([[float(i), 1.0]]), 1)
    r = acc.result()
    assert r.base == 4 and r.steps.tolist() == [4.0, 4.0, 3.0]
    assert r.sums[0, :, 0].tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10]
    assert r.sumsq[0].tolist() == [sum(i * i for i in range(11)), 11.0]


def test_coverage_with_coarse_blocks_of_correlated_local_exponents():
    """The autocorrelation time from coarse base blocks (MAX_BLOCKS = 16 instead of 512, so 420 QRs give base
    blocks of 32 QRs): the linear system with AR(1) inputs (rho = 0.7, tau = 5.7), 300 single trajectories of 400
    counted steps: measured coverage 0.927, 0.940, 0.953 (with MAX_BLOCKS = 32, base 16: 0.937, 0.947, 0.950;
    from the full series: 0.920, 0.953, 0.937)."""
    truth = torch.log(MU)
    hits = []
    for e, loc in grouped(linear_run(REPS, 1, 420, seed=1), 1):
        stats = blocks_from_local(loc, max_blocks=16)
        assert stats.base == 32
        est = lyapunov_uncertainty(e, stats, n_boot=2).exponents
        hits.append(((est.lower <= truth) & (truth <= est.upper)).numpy())
    cov = np.mean(hits, 0)
    assert np.all((0.90 <= cov) & (cov <= 0.99)), cov


def test_convergence_warning_calls_an_approach_to_a_fixed_point_a_transient():
    """A contracting tanh RNN (g = 0.5) started far from its fixed point: the local exponents are nearly constant
    once there, so the errors are tiny and the drift from the approach would "need" trillions of steps. The
    warning says it is a slow transient instead of quoting that count, and points to the cure."""
    torch.manual_seed(0)
    rnn = torch.nn.RNN(1, 50, bias=False, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.normal_(0, 0.5 / 50**0.5)
    with pytest.warns(ConvergenceWarning, match=r"a slow transient .* tangent_warmup='auto' removes it"):
        ds = rnnjac.lyapunov_spectrum(rnn, torch.zeros(4, 400, 1), 3 * torch.randn(1, 4, 50), k=5)
    assert int(ds.lyapunov_more_steps.max()) > 10**6


def test_convergence_warning_flags_a_short_run_and_not_a_long_one():
    """The non-normal linear system without tangent warm-up (a transient bias ~ 1/n while the basis aligns)."""
    with pytest.warns(ConvergenceWarning, match=r"Lyapunov exponents have not converged \(lambda_.*more counted steps"):
        short = linear_run(1, 4, 60, tangent_warmup=0, sd=0.05, rho=0.0)
    assert short.lyapunov_converged.values.min() == 0
    assert int(short.lyapunov_more_steps.max()) >= 60
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        long = linear_run(1, 4, 6000, tangent_warmup=0, sd=0.05, rho=0.0)
    assert long.lyapunov_converged.values.tolist() == [1, 1, 1] and long.lyapunov_more_steps.values.tolist() == [0] * 3
    assert long.lyapunov_block_length.values.min() % 16 == 0  # 6000 QRs: base blocks of 16


def test_collapsed_exponents_give_infinite_bounds_and_plot():
    rnn = torch.nn.RNN(1, 3, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.zero_()
    ds = rnnjac.lyapunov_spectrum(rnn, torch.randn(2, 30, 1), generator=torch.Generator().manual_seed(0))
    assert np.all(ds.lyapunov_exponents_bounds.values == -np.inf) and np.all(ds.lyapunov_exponents_stderr == 0)
    assert ds.lyapunov_converged.values.tolist() == [1, 1, 1]
    rnnjac.plot.lyapunov_spectrum(ds)
    matplotlib.pyplot.close("all")


def _dataset(path: str, seed: int):
    gru = torch.nn.GRU(2, 5, batch_first=True)
    x = torch.randn(3, 60, 2, generator=torch.Generator().manual_seed(seed))
    attrs = {"checkpoint": path, "checkpoint_sha256": f"{seed:064d}", "training_step": seed}
    return rnnjac.lyapunov_spectrum(gru, x, generator=torch.Generator().manual_seed(0), attrs=attrs)


def test_sweep_stacking_validates_and_plots():
    sweep = concat_checkpoints([stack_checkpoints([_dataset("a.pt", 1), _dataset("b.pt", 2)])])
    validate(sweep)
    assert sweep.lyapunov_exponents_bounds.dims == ("checkpoint", "bound", "le_index")
    assert sweep.ks_entropy_mean.dims == ("checkpoint",) and sweep.attrs["ci"] == 0.95
    rnnjac.plot.lyapunov_spectrum(sweep)
    ax = rnnjac.plot.lyapunov_spectrum(sweep, checkpoint=1)
    bars = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    ends = np.array([[s[0][1], s[1][1]] for s in bars[0].get_segments()])
    bounds = sweep.lyapunov_exponents_bounds.isel(checkpoint=1).values
    np.testing.assert_allclose(np.sort(ends, 1), bounds.T, rtol=1e-6)  # the bars span the intervals
    matplotlib.pyplot.close("all")


def test_cli_summary_prints_mean_and_interval_half_width():
    ds = _dataset("a.pt", 1)
    line = exponent_summary(ds, n=2)
    mean, b = ds.lyapunov_exponents_mean.values, ds.lyapunov_exponents_bounds.values
    half = (b[1] - b[0]) / 2
    for i in range(2):
        sym = "λ" if "λ" in line else "lambda"
        pm = "±" if "±" in line else "+/-"
        assert f"{sym}{i + 1} = {mean[i]:+.4f} {pm} {half[i]:.4f}" in line
    assert "95% interval" in line
    off = exponent_summary(ds.drop_vars("lyapunov_exponents_bounds"))
    assert off.startswith("top Lyapunov exponents (median over batch")
