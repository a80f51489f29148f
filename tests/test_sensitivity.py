"""Lagged input sensitivities ds_t/dx_{t-tau}: explicit autograd through the module, exact answers of linear
systems (also past float32's range), the Lyapunov decay rate, the Dataset, the profile, the plot, bad input."""

import math

import numpy as np
import pytest
import torch
import xarray as xr

import rnnjac


def _module_states(module, x):
    """States s_1..s_T (B, T, D) from the module's own forward, one step at a time (autograd-differentiable)."""
    b = x.shape[0]
    hdim = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h = torch.zeros(module.num_layers, b, hdim, dtype=x.dtype)
    lstm = isinstance(module, torch.nn.LSTM)
    hx = (h, torch.zeros(module.num_layers, b, module.hidden_size, dtype=x.dtype)) if lstm else h
    out = []
    for t in range(x.shape[1]):
        _, hx = module(x[:, t : t + 1], hx)
        if lstm:
            out.append(torch.cat([torch.cat([hx[0][li], hx[1][li]], -1) for li in range(module.num_layers)], -1))
        else:
            out.append(torch.cat(list(hx), -1))
    return torch.stack(out, 1)


def _explicit(module, x, rows, readout=None):
    """ds_t/dx_s for all t, s by backpropagating from every state entry: (B, T, T, R, I) (zero for s > t)."""
    full = torch.autograd.functional.jacobian(lambda xx: _module_states(module, xx)[..., rows], x)
    b = x.shape[0]
    jac = torch.stack([full[i, :, :, i] for i in range(b)])  # (B, T, R, T, I)
    jac = jac.permute(0, 1, 3, 2, 4)
    if readout is not None:
        jac = torch.einsum("or,btsri->btsoi", readout.weight.detach(), jac)
    return jac


def _check_against(ds, jac, max_lag, kind="input", atol=1e-9):
    b, steps = jac.shape[:2]
    n_sv = ds.sizes["sensitivity_sv_index"]
    log_norm = ds[f"{kind}_sensitivity_log_norm"].values
    log_sv = ds[f"{kind}_sensitivity_log_singular_values"].values
    for t in range(steps):
        for tau in range(max_lag + 1):
            if t - tau < 0:
                assert np.isnan(log_norm[:, t, tau]).all() and np.isnan(log_sv[:, t, tau]).all()
                continue
            block = jac[:, t, t - tau]
            want_n = torch.linalg.matrix_norm(block).log().numpy()
            want_sv = torch.linalg.svdvals(block)[:, :n_sv].log().numpy()
            np.testing.assert_allclose(log_norm[:, t, tau], want_n, atol=atol, rtol=0)
            # values far below the top are round-off in both: compare them relative to sigma_1
            got_sv = np.exp(log_sv[:, t, tau, : want_sv.shape[1]] - want_sv[:, :1])
            np.testing.assert_allclose(got_sv, np.exp(want_sv - want_sv[:, :1]), atol=atol, rtol=0)
            np.testing.assert_allclose(log_sv[:, t, tau, 0], want_sv[:, 0], atol=atol, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.GRU(2, 3, num_layers=2, batch_first=True),
        lambda: torch.nn.LSTM(2, 3, num_layers=2, proj_size=2, batch_first=True),
        lambda: torch.nn.RNN(2, 4, nonlinearity="relu", batch_first=True),
    ],
    ids=["gru2", "lstm2_proj", "rnn_relu"],
)
def test_lagged_sensitivities_equal_explicit_autograd_through_the_module(make):
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(2, 6, 2, dtype=torch.float64)
    lstm = isinstance(module, torch.nn.LSTM)
    top = (module.proj_size or module.hidden_size) if lstm else module.hidden_size
    readout = torch.nn.Linear(top, 3).double()
    ds = rnnjac.sensitivity(module, x, max_lag=4, readout=readout, n_sv=2)
    d = rnnjac.trajectory(module, x).shape[-1]
    _check_against(ds, _explicit(module, x, torch.arange(d)), 4)
    end = d - module.hidden_size if lstm else d  # the top layer's h sits before its c
    top_rows = torch.arange(end - top, end)
    _check_against(ds, _explicit(module, x, top_rows, readout), 4, kind="output")


def test_h_state_reports_the_h_rows_of_the_exact_derivative():
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(2, 3, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    ds = rnnjac.sensitivity(lstm, x, max_lag=3, state="h")
    _check_against(ds, _explicit(lstm, x, torch.tensor([0, 1, 2, 6, 7, 8])), 3)
    assert ds.attrs["state"] == "h"


def _linear_cell(w, u):
    return rnnjac.CustomCell(lambda s, x: s @ w.T + x @ u.T, name="linear")


def test_linear_rnn_gives_powers_of_w_times_u_exactly():
    torch.manual_seed(2)
    w = torch.randn(5, 5, dtype=torch.float64) * 0.4
    u = torch.randn(5, 2, dtype=torch.float64)
    x, h0 = torch.randn(3, 12, 2, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    ds = rnnjac.sensitivity(_linear_cell(w, u), x, h0, max_lag=8, n_sv=2)
    for tau in range(9):
        block = torch.linalg.matrix_power(w, tau) @ u
        got = ds.input_sensitivity_log_norm.isel(lag=tau).values[:, tau:]
        np.testing.assert_allclose(got, math.log(float(torch.linalg.matrix_norm(block))), rtol=0, atol=1e-12)
        sv = ds.input_sensitivity_log_singular_values.isel(lag=tau).values[:, tau:]
        np.testing.assert_allclose(sv, np.broadcast_to(torch.linalg.svdvals(block).log().numpy(), sv.shape), atol=1e-12)


def test_long_lags_stay_exact_in_log_scale_past_the_float32_range():
    """W = 0.01 Q (Q orthogonal): ||W^tau U||_F = 0.01^tau ||U||_F falls to 1e-300 at tau = 150, far below
    float32's smallest number; the log-scale blocks still give it to float32 accuracy."""
    torch.manual_seed(3)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    u = torch.randn(6, 2, dtype=torch.float64)
    w32, u32 = (0.01 * q).float(), u.float()
    x, h0 = torch.randn(2, 160, 2), torch.zeros(2, 6)
    ds = rnnjac.sensitivity(_linear_cell(w32, u32), x, h0, max_lag=150)
    tau = np.arange(151)
    want = tau * math.log(0.01) + math.log(float(torch.linalg.matrix_norm(u)))
    got = ds.input_sensitivity_log_norm.isel(time=-1).values  # t = 160: every lag defined
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5)
    sv = ds.input_sensitivity_log_singular_values.isel(time=-1, lag=150).values
    np.testing.assert_allclose(
        sv, np.broadcast_to(150 * math.log(0.01) + torch.linalg.svdvals(u).log().numpy(), sv.shape), rtol=1e-5
    )
    assert np.isfinite(got).all()


def test_contracting_tanh_rnn_profile_decays_at_the_top_lyapunov_exponent():
    torch.manual_seed(1)
    rnn = torch.nn.RNN(2, 16, batch_first=True).double()
    x = torch.randn(8, 200, 2, dtype=torch.float64)
    profile = rnnjac.memory_profile(rnnjac.sensitivity(rnn, x, max_lag=30, n_sv=1))
    lag = profile["lag"].values
    slope = np.polyfit(lag[10:], profile.values[10:], 1)[0]
    lam = float(rnnjac.lyapunov_spectrum(rnn, x, k=1, warmup=30).lyapunov_exponents.median())
    assert lam < -0.1  # contracting
    assert abs(slope - lam) < 0.1 * abs(lam), (slope, lam)


def test_dataset_merges_into_spectra_and_round_trips(tmp_path):
    torch.manual_seed(4)
    gru = torch.nn.GRU(2, 4, batch_first=True)
    x = torch.randn(3, 10, 2)
    sens = rnnjac.sensitivity(gru, x, max_lag=4, readout=torch.nn.Linear(4, 1))
    assert sens.lag.attrs["units"] == "step" and sens.time.values.tolist() == list(range(1, 11))
    assert sens.attrs["max_lag"] == 4 and sens.attrs["n_sv"] == 2 and "Linear" in sens.attrs["readout"]
    merged = xr.merge([rnnjac.spectra(gru, x), sens], combine_attrs="override")
    assert merged.sizes["time"] == 10 and "singular_values" in merged and "output_sensitivity_log_norm" in merged
    rnnjac.save(merged, tmp_path / "merged.nc")
    back = rnnjac.open_dataset(tmp_path / "merged.nc")
    np.testing.assert_array_equal(back.input_sensitivity_log_norm.values, sens.input_sensitivity_log_norm.values)
    # a readout with one output has one singular value: the second is log 0
    assert np.isneginf(sens.output_sensitivity_log_singular_values.isel(sensitivity_sv_index=1, lag=0)).all()


def test_memory_profile_is_the_median_over_batch_and_time():
    torch.manual_seed(5)
    ds = rnnjac.sensitivity(torch.nn.GRU(2, 4, batch_first=True), torch.randn(3, 9, 2), max_lag=3)
    prof = rnnjac.memory_profile(ds)
    raw = ds.input_sensitivity_log_norm.values
    want = [np.median(raw[:, tau:, tau]) for tau in range(4)]
    np.testing.assert_allclose(prof.values, want, rtol=1e-6)
    assert prof.attrs["units"] == "nats"
    with pytest.raises(ValueError, match="output_sensitivity_log_norm.*readout="):
        rnnjac.memory_profile(ds, output=True)


def test_plot_draws_the_profile_with_a_band():
    torch.manual_seed(6)
    ds = rnnjac.sensitivity(
        torch.nn.GRU(2, 8, batch_first=True), torch.randn(4, 30, 2), max_lag=12, readout=torch.nn.Linear(8, 2)
    )
    ax = rnnjac.plot.sensitivity(ds)
    assert ax.get_yscale() == "log"
    median = ax.lines[0].get_ydata()
    np.testing.assert_allclose(np.log(median), rnnjac.memory_profile(ds).values, rtol=1e-6)
    assert len(ax.collections) == 1  # the inter-quartile band
    assert rnnjac.plot.sensitivity(ds, output=True).get_title().startswith("Memory profile (readout)")
    with pytest.raises(ValueError, match="needs the variable 'input_sensitivity_log_norm'"):
        rnnjac.plot.sensitivity(xr.Dataset())


def test_plot_switches_to_log_values_beyond_the_float64_range():
    w, u = torch.eye(2, dtype=torch.float64) * 1e-5, torch.ones(2, 1, dtype=torch.float64)
    ds = rnnjac.sensitivity(
        _linear_cell(w, u),
        torch.randn(1, 80, 1, dtype=torch.float64),
        torch.zeros(1, 2, dtype=torch.float64),
        max_lag=70,
    )
    ax = rnnjac.plot.sensitivity(ds)
    assert ax.get_yscale() == "linear" and ax.lines[0].get_ydata()[-1] < -700


def test_bad_arguments_are_refused_before_work():
    gru = torch.nn.GRU(2, 4, batch_first=True)
    x = torch.randn(2, 5, 2)
    for bad in (5, 6):
        with pytest.raises(ValueError, match=f"max_lag must be smaller than the number of steps T = 5.*max_lag={bad}"):
            rnnjac.sensitivity(gru, x, max_lag=bad)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_lag must be an integer >= 0"):
            rnnjac.sensitivity(gru, x, max_lag=bad)
    with pytest.raises(ValueError, match="n_sv must be an integer >= 1; got 0"):
        rnnjac.sensitivity(gru, x, max_lag=2, n_sv=0)
    bad_x = x.clone()
    bad_x[0, 3, 1] = float("inf")
    with pytest.raises(rnnjac.NonFiniteError, match="inputs contain NaN/Inf, first at step t=4"):
        rnnjac.sensitivity(gru, bad_x, max_lag=2)
    with pytest.raises(
        ValueError, match=r"readout must map the top layer's h states \(B, H\) = \(2, 4\).*got shape \(2,\)"
    ):
        rnnjac.sensitivity(gru, x, max_lag=2, readout=lambda h: h.sum(-1))
    with pytest.raises(TypeError, match="readout must return a floating-point Tensor"):
        rnnjac.sensitivity(gru, x, max_lag=2, readout=lambda h: h.shape)
    with pytest.raises(TypeError, match="readout must be an nn.Module or a callable"):
        rnnjac.sensitivity(gru, x, max_lag=2, readout="linear")


def test_autograd_method_and_submodule_give_the_same_dataset():
    torch.manual_seed(7)
    gru = torch.nn.GRU(2, 4, num_layers=2, batch_first=True).double()
    x = torch.randn(2, 7, 2, dtype=torch.float64)
    a = rnnjac.sensitivity(gru, x, max_lag=5)
    b = rnnjac.sensitivity(gru, x, max_lag=5, method="autograd")
    assert b.attrs["method"] == "autograd"
    np.testing.assert_allclose(a.input_sensitivity_log_norm, b.input_sensitivity_log_norm, atol=1e-12)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core, self.head = gru, torch.nn.Linear(4, 1).double()

        def forward(self, inp):
            return self.head(self.core(inp)[0])

    c = rnnjac.sensitivity(Net(), x, max_lag=5)
    assert c.attrs["submodule"] == "core"
    np.testing.assert_allclose(a.input_sensitivity_log_norm, c.input_sensitivity_log_norm, atol=1e-12)


def test_float32_readout_follows_the_model_to_float64_and_plots_overlay():
    """dtype=float64 converts a module readout like the model (the caller's readout stays float32), and the
    plot takes label= so that two models share one axes."""
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    gru, head = torch.nn.GRU(2, 5, batch_first=True), torch.nn.Linear(5, 1)
    x = torch.randn(2, 12, 2)
    ds = rnnjac.sensitivity(gru, x, max_lag=4, readout=head, dtype=torch.float64)
    ref = rnnjac.sensitivity(gru.double(), x.double(), max_lag=4, readout=head.double())
    head.float(), gru.float()
    assert head.weight.dtype == torch.float32
    np.testing.assert_allclose(ds.output_sensitivity_log_norm.values, ref.output_sensitivity_log_norm.values)
    ax = rnnjac.plot.sensitivity(ds, label="a")
    rnnjac.plot.sensitivity(ds, ax=ax, label="b", output=True)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    plt.close("all")
