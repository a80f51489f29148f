"""The command line of issues 16-18: ``--warmup/--tangent-warmup/--reortho-every auto``, ``--singular-values K``
and ``--sensitivity --max-lag L``; each checked against an independent reference (SVDs of the Jacobians, the
QR every step, brute-force autograd through the whole trajectory)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import rnnjac
import rnnjac._pipeline
from rnnjac._options import SpectraOptions
from rnnjac.cli import main
from rnnjac.cli._demo import _demo_figures


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rnnjac: error: ") and err.count("\n") == 1, err
    return err


def _no_work(monkeypatch):
    """Make any spectra or sensitivity computation fail the test: refusals must come first."""

    def fail(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(rnnjac._pipeline, "spectra", fail)
    monkeypatch.setattr("rnnjac._sensitivity.sensitivity", fail)


@pytest.fixture
def gru(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gru.pt"
    torch.save(nn.GRU(3, 5).state_dict(), path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """A (2, 12, 3) float64 input file (the analysis reads it; the references use the same array)."""
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).standard_normal((2, 12, 3)))
    return path


def _analyze(ckpt, out, *extra) -> int:
    return main(["analyze", str(ckpt), "-o", str(out), "-q", "--dtype", "float64", *extra])


# ----------------------------------------------------------------------------- auto and top-k
def test_auto_transients_record_what_they_chose_and_equal_the_integer_run(tmp_path, gru, capsys):
    long = tmp_path / "long.npy"
    np.save(long, np.random.default_rng(2).standard_normal((2, 80, 3)))
    auto = tmp_path / "auto.nc"
    assert _analyze(gru, auto, "--inputs", str(long), "--warmup", "auto", "--tangent-warmup", "AUTO") == 0
    a = rnnjac.open_dataset(auto)
    assert (a.attrs["warmup"], a.attrs["tangent_warmup"]) == ("auto", "auto")
    warmup, tangent = int(a.attrs["warmup_used"]), int(a.attrs["tangent_warmup_used"])
    assert 0 <= warmup < 80 and 0 <= tangent < 80
    fixed = tmp_path / "fixed.nc"
    assert _analyze(gru, fixed, "--inputs", str(long), "--warmup", str(warmup), "--tangent-warmup", str(tangent)) == 0
    f = rnnjac.open_dataset(fixed)
    np.testing.assert_allclose(a.lyapunov_exponents, f.lyapunov_exponents, rtol=1e-10, atol=1e-12)
    capsys.readouterr()
    assert main(["info", str(auto)]) == 0
    out = capsys.readouterr().out
    assert f"warmup_used: {warmup}\n" in out and f"tangent_warmup_used: {tangent}\n" in out


def test_reortho_every_auto_gives_the_exponents_of_a_qr_every_step(tmp_path, gru, inputs):
    assert _analyze(gru, tmp_path / "a.nc", "--inputs", str(inputs), "--reortho-every", "auto") == 0
    assert _analyze(gru, tmp_path / "one.nc", "--inputs", str(inputs)) == 0
    a, one = rnnjac.open_dataset(tmp_path / "a.nc"), rnnjac.open_dataset(tmp_path / "one.nc")
    np.testing.assert_allclose(a.lyapunov_exponents, one.lyapunov_exponents, atol=1e-6)
    assert a.attrs["reortho_every"] == "auto"
    assert 1 <= a.attrs["reortho_interval_min"] <= a.attrs["reortho_interval_mean"] <= a.attrs["reortho_interval_max"]


def test_singular_values_k_are_the_top_k_of_the_jacobians(tmp_path, inputs):
    torch.manual_seed(0)
    gru = tmp_path / "gru8.pt"
    torch.save(nn.GRU(3, 8).state_dict(), gru)
    assert _analyze(gru, tmp_path / "s.nc", "--inputs", str(inputs), "--singular-values", "2", "--no-lyapunov") == 0
    ds = rnnjac.open_dataset(tmp_path / "s.nc")
    assert ds.sizes["sv_index"] == 2
    x = torch.from_numpy(np.load(inputs))
    jac = rnnjac.jacobians(rnnjac.load_checkpoint(gru).double(), x)  # (B, T, D, D)
    expected = torch.linalg.svdvals(jac.detach())[..., :2].numpy()
    np.testing.assert_allclose(ds.singular_values.values, expected, rtol=1e-8, atol=1e-12)


BAD = [
    (["--warmup", "abc"], "--warmup must be an integer >= 0 or 'auto'; got 'abc'"),
    (["--tangent-warmup", "-1"], "--tangent-warmup must be an integer >= 0; got -1"),
    (["--reortho-every", "0"], "--reortho-every must be an integer >= 1"),
    (["--reortho-every", "often"], "--reortho-every must be an integer >= 1 or 'auto'; got 'often'"),
    (["--singular-values", "0"], "--singular-values must be an integer K >= 1 (the top K per step); got 0"),
    (["--singular-values", "auto"], "--singular-values must be an integer K >= 1 (the top K per step); got 'auto'"),
    (["--singular-values", "2", "--no-singular-values"], "--no-singular-values skips them: give one"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_auto_and_top_k_values_are_one_line_before_any_work(tmp_path, capsys, extra, message):
    missing = tmp_path / "not-read.pt"  # validation comes first: the checkpoint is never opened
    assert main(["analyze", str(missing), "-o", str(tmp_path / "s.nc"), *extra]) == 2
    assert message in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_top_k_larger_than_d_names_the_flag(tmp_path, gru, capsys):
    assert _analyze(gru, tmp_path / "s.nc", "--steps", "6", "--singular-values", "6") == 2
    err = _one_error(capsys)
    assert "--singular-values must be an integer k with 1 <= k <= D = 5" in err and "got 6" in err
    assert "singular_values" not in err and "True" not in err


def test_demo_figures_with_auto_options_are_those_of_integer_options():
    model = nn.GRU(2, 4, batch_first=True).double()
    x = torch.randn(2, 60, 2, dtype=torch.float64)
    base = {"eigenvalues": True, "end_to_end": True, "local_lyapunov": True}
    auto = SpectraOptions(warmup="auto", tangent_warmup="auto", reortho_every="auto", **base)
    fixed = SpectraOptions(warmup=5, tangent_warmup=5, **base)
    assert _demo_figures(model, x, auto) == _demo_figures(model, x, fixed)
    assert "lyapunov_spectrum" in _demo_figures(model, x, auto)


def test_check_lyapunov_with_auto_uses_the_chosen_transients(tmp_path, gru, capsys):
    out = tmp_path / "s.nc"
    run = ["--batch", "2", "--steps", "150", "-k", "1", "--no-singular-values", "--check-lyapunov"]
    assert _analyze(gru, out, *run, "--warmup", "auto", "--tangent-warmup", "auto") in (0, 1)
    a = rnnjac.open_dataset(out).attrs
    spec = rnnjac._pipeline.InputSpec(batch=2, steps=150)
    x = rnnjac._pipeline.make_inputs(spec, 3, torch.float64)
    ref = rnnjac.verify_lyapunov(
        rnnjac.load_checkpoint(gru).double(),
        x,
        warmup=int(a["warmup_used"]),
        tangent_warmup=int(a["tangent_warmup_used"]),
        generator=torch.Generator().manual_seed(0),
    )
    assert a["lyapunov_check_dns"] == pytest.approx(ref.dns, rel=1e-10)
    # too short for the check once the chosen transients are known: refused, naming 'auto' and what it chose
    options = SpectraOptions(tangent_warmup="auto")
    with pytest.raises(ValueError, match=r"T = 30 steps; the transients chosen by 'auto' are 0 \+ 11 steps"):
        rnnjac._pipeline.lyapunov_check_attrs(
            nn.GRU(3, 5), x[:, :30].float(), None, options, used={"tangent_warmup_used": 11}
        )


# ----------------------------------------------------------------------------- sensitivity
def _brute_force_log_norms(module, x, state_of, max_lag: int) -> np.ndarray:
    """``log ||ds_t/dx_(t-lag)||_F`` (B, T, L + 1) by autograd through the whole trajectory (NaN for t - lag < 1)."""
    b, t, _ = x.shape
    out = np.full((b, t, max_lag + 1), np.nan)
    for i in range(b):
        jac = torch.autograd.functional.jacobian(lambda xs: state_of(module, xs[None])[0], x[i])  # (T, D, T, I)
        for step in range(t):
            for lag in range(min(max_lag, step) + 1):
                out[i, step, lag] = math.log(float(torch.linalg.norm(jac[step, :, step - lag, :])))
    return out


CASES = {  # module class, flags, the states ds_t as a function of the inputs (None: [h; c] of the LSTM)
    "gru-full": (nn.GRU, [], lambda m, xs: m(xs)[0]),
    "lstm-h": (nn.LSTM, ["--state", "h"], lambda m, xs: m(xs)[0]),
    "lstm-full": (nn.LSTM, [], None),
}


@pytest.mark.parametrize("case", ["gru-full", "lstm-h", "lstm-full"])
def test_sensitivity_is_the_brute_force_derivative_and_merges_into_the_spectra(tmp_path, inputs, capsys, case):
    torch.manual_seed(0)
    cls, flags, state_of = CASES[case]
    ckpt = tmp_path / "m.pt"
    torch.save(cls(3, 4).state_dict(), ckpt)
    assert _analyze(ckpt, tmp_path / "plain.nc", "--inputs", str(inputs), *flags) == 0
    args = ["--inputs", str(inputs), *flags, "--sensitivity", "--max-lag", "4"]
    assert _analyze(ckpt, tmp_path / "s.nc", *args) == 0
    assert capsys.readouterr().out.startswith(("λ1 = ", "lambda1 = "))  # -q: the result line only
    ds, plain = rnnjac.open_dataset(tmp_path / "s.nc"), rnnjac.open_dataset(tmp_path / "plain.nc")
    assert ds.attrs["max_lag"] == 4 and ds.sizes["lag"] == 5
    assert ds.input_sensitivity_log_norm.dims == ("batch", "time", "lag")
    for name in plain.data_vars:  # the spectra are those of the run without sensitivities
        np.testing.assert_array_equal(ds[name].values, plain[name].values)
    x = torch.from_numpy(np.load(inputs))
    loaded = rnnjac.load_checkpoint(ckpt).double()
    if state_of is None:  # [h; c] of a one-layer LSTM, from the cell run step by step
        state_of = _lstm_full_state
    expected = _brute_force_log_norms(loaded, x, state_of, 4)
    np.testing.assert_allclose(ds.input_sensitivity_log_norm.values, expected, rtol=1e-9, atol=1e-9)
    assert np.isnan(ds.input_sensitivity_log_norm.values[:, 0, 1:]).all()  # t - lag < 1


def _lstm_full_state(lstm, xs):
    """``(1, T, 2H)`` states ``[h_t; c_t]`` of a one-layer batch-first LSTM on ``xs`` ``(1, T, I)``."""
    cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, f"{name}_l0"))
    h = c = torch.zeros(1, lstm.hidden_size, dtype=xs.dtype)
    states = []
    for t in range(xs.shape[1]):
        h, c = cell(xs[:, t], (h, c))
        states.append(torch.cat([h, c], -1))
    return torch.stack(states, 1)


def test_sensitivity_file_plots_and_shows_in_info(tmp_path, gru, capsys):
    out = tmp_path / "s.nc"
    assert _analyze(gru, out, "--steps", "10", "--batch", "2", "--sensitivity", "--max-lag", "3") == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "input_sensitivity_log_norm('batch', 'time', 'lag')" in text and "ds_t/dx_(t-lag) [nats]" in text
    assert "lag=4" in text and "max_lag: 3\n" in text
    assert main(["plot", str(out), "-o", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "s_sensitivity.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-lag", "3"], "--max-lag needs --sensitivity"),
        (["--sensitivity"], "--sensitivity needs --max-lag L"),
        (["--sensitivity", "--max-lag", "10"], "--max-lag must be smaller than the number of steps T = 10"),
        (["--sensitivity", "--max-lag", "-1"], "--max-lag must be an integer >= 0; got -1"),
    ],
)
def test_sensitivity_misuse_is_one_line_before_any_work(tmp_path, gru, capsys, monkeypatch, extra, message):
    _no_work(monkeypatch)
    assert _analyze(gru, tmp_path / "s.nc", "--steps", "10", *extra) == 2
    err = _one_error(capsys)
    assert message in err and "max_lag" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru.pt"]


def test_max_lag_is_checked_against_the_steps_of_an_inputs_file(tmp_path, gru, inputs, capsys, monkeypatch):
    _no_work(monkeypatch)
    assert _analyze(gru, tmp_path / "s.nc", "--inputs", str(inputs), "--sensitivity", "--max-lag", "12") == 2
    assert "T = 12" in _one_error(capsys)


def test_a_sweep_with_sensitivity_is_refused_before_any_work(tmp_path, gru, capsys, monkeypatch):
    _no_work(monkeypatch)
    monkeypatch.setattr("rnnjac._sweeps.analyze_checkpoints", lambda *a, **k: pytest.fail("work started"))
    argv = ["analyze", str(gru), str(gru), "-o", str(tmp_path / "s.nc"), "--sensitivity", "--max-lag", "2"]
    assert main(argv) == 2
    assert "--sensitivity analyses one checkpoint; got a sweep over 2" in _one_error(capsys)
    assert not (tmp_path / "s.nc").exists()
