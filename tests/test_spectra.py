"""Spectra: known answers of linear systems, identities, invariances, schema, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from problems import Problem

import rnnjac
from rnnjac._datasets import validate

F64 = torch.float64


def linear_cell(w: torch.Tensor) -> rnnjac.CustomCell:
    n = w.shape[0]
    return rnnjac.CustomCell(lambda s, x: s @ w.T + x, jacobian=lambda s, x: w.expand(s.shape[0], n, n))


def symmetric(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return u @ torch.diag(eigs) @ u.T


def test_linear_system_exponents_are_log_abs_eigenvalues():
    eigs = torch.tensor([0.95, -0.9, 0.7, 0.5, -0.3, 0.1], dtype=F64)
    w = symmetric(eigs)
    steps = 4000
    ds = rnnjac.spectra(
        linear_cell(w),
        torch.zeros(2, steps, 6, dtype=F64),
        torch.randn(2, 6, dtype=F64),
        generator=torch.Generator().manual_seed(0),
    )
    want = np.sort(np.log(np.abs(eigs.numpy())))[::-1]
    # finite-time error of the QR method is O(1/T) for a normal matrix
    np.testing.assert_allclose(ds.lyapunov_exponents.values, np.broadcast_to(want, (2, 6)), atol=5.0 / steps)
    sv = np.sort(np.abs(eigs.numpy()))[::-1]
    np.testing.assert_allclose(ds.singular_values.values, np.broadcast_to(sv, (2, steps, 6)), rtol=1e-12)


def test_nonnormal_linear_system():
    # a triangular (non-normal) matrix: exponents are still log|diag|, singular values are not
    w = torch.tensor([[0.9, 2.0, 0.0], [0.0, 0.5, 3.0], [0.0, 0.0, -0.2]], dtype=F64)
    steps = 3000
    ds = rnnjac.spectra(linear_cell(w), torch.zeros(1, steps, 3, dtype=F64), torch.ones(1, 3, dtype=F64))
    np.testing.assert_allclose(ds.lyapunov_exponents.values[0], np.log([0.9, 0.5, 0.2]), atol=20.0 / steps)
    np.testing.assert_allclose(ds.singular_values.values[0, 0], torch.linalg.svdvals(w).numpy(), rtol=1e-12)


def test_orthogonal_weights_give_zero_exponents():
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(3)))
    ds = rnnjac.lyapunov_spectrum(linear_cell(q), torch.zeros(3, 500, 8, dtype=F64), torch.randn(3, 8, dtype=F64))
    np.testing.assert_allclose(ds.lyapunov_exponents.values, 0.0, atol=1e-12)
    assert float(ds.ks_entropy.max()) < 1e-11


@pytest.mark.parametrize("arch,layers", [("gru", 1), ("lstm", 2), ("rnn_tanh", 1)])
def test_sum_of_exponents_is_mean_log_abs_det(arch, layers):
    p = Problem(arch, layers=layers)
    m, x = p.module(), p.inputs(batch=3, steps=60)
    ds = rnnjac.spectra(m, x, warmup=5, tangent_warmup=7, singular_values=False)
    j = rnnjac.jacobians(m, x)
    logdet = torch.linalg.slogdet(j)[1][:, 12:].mean(1)
    np.testing.assert_allclose(ds.lyapunov_exponents.sum("le_index").values, logdet.detach().numpy(), atol=1e-10)


def test_exponents_do_not_depend_on_reortho_every():
    p = Problem("gru", hidden=6)
    m, x = p.module(), p.inputs(batch=2, steps=600)
    runs = [
        rnnjac.lyapunov_spectrum(
            m, x, warmup=20, tangent_warmup=40, reortho_every=r, generator=torch.Generator().manual_seed(0)
        ).lyapunov_exponents.values
        for r in (1, 3, 5)
    ]
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-9)
    np.testing.assert_allclose(runs[2], runs[0], atol=1e-9)


def test_per_sample_results_equal_single_sample_runs():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs(batch=3, steps=40)
    kw = dict(k=4, eigenvalues=True, end_to_end=True, generator=None)
    whole = rnnjac.spectra(m, x, **{**kw, "generator": torch.Generator().manual_seed(1)})
    for b in range(3):
        one = rnnjac.spectra(m, x[b : b + 1], **{**kw, "generator": torch.Generator().manual_seed(1)})
        for name in ("lyapunov_exponents", "singular_values", "eigenvalues_real", "end_to_end_log_singular_values"):
            np.testing.assert_allclose(one[name].values[0], whole[name].values[b], rtol=1e-9, atol=1e-12)


def test_end_to_end_matches_direct_products_on_short_horizons():
    p = Problem("gru", layers=2)
    m, x = p.module(), p.inputs(batch=2, steps=25)
    ds = rnnjac.spectra(m, x, singular_values=False, lyapunov=False, end_to_end=True)
    with torch.no_grad():
        j = rnnjac.jacobians(m, x)
        prod = torch.eye(10, dtype=F64).expand(2, 10, 10)
        for t in range(25):
            prod = j[:, t] @ prod
            ref = torch.linalg.svdvals(prod)
            ok = (ref > ref[:, :1] * 1e-5).numpy()  # values that direct float64 products resolve well
            got = np.exp(ds.end_to_end_log_singular_values.values[:, t])  # only the log variable is stored
            np.testing.assert_allclose(got[ok], ref.numpy()[ok], rtol=1e-6)
    assert ds.end_to_end_log_singular_values.attrs["units"] == "nats"


def test_end_to_end_is_stable_over_10000_steps():
    eigs = torch.exp(torch.linspace(-0.01, -3.0, 6, dtype=F64))
    eigs[2] = -eigs[2]
    w = symmetric(eigs, seed=2)
    steps = 10_000
    ds = rnnjac.spectra(
        linear_cell(w),
        torch.zeros(1, steps, 6, dtype=F64),
        torch.randn(1, 6, dtype=F64),
        singular_values=False,
        lyapunov=False,
        end_to_end=True,
        time_chunk=2048,
    )
    got = ds.end_to_end_log_singular_values.values[0]
    want = np.arange(1, steps + 1)[:, None] * np.log(np.abs(eigs.numpy()))[None]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-9)  # log sigma reaches -30000 nats


def test_end_to_end_chaotic_model_stays_finite():
    n = 24
    rnn = torch.nn.RNN(1, n, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(5)) * 3 / n**0.5)
    h0 = torch.randn(1, 1, n, dtype=F64, generator=torch.Generator().manual_seed(6))
    ds = rnnjac.spectra(rnn, torch.zeros(1, 3000, 1, dtype=F64), h0, singular_values=False, end_to_end=True, warmup=0)
    e2e = ds.end_to_end_log_singular_values.values[0]
    lam = ds.lyapunov_exponents.values[0]
    assert lam[0] > 0  # chaotic
    assert np.isfinite(e2e).all()
    # finite-time growth rates of the product converge to the exponents
    np.testing.assert_allclose(e2e[-1] / 3000, lam, atol=0.01)


def test_local_lyapunov_and_transients():
    p = Problem("gru")
    m, x = p.module(), p.inputs(batch=2, steps=30)
    ds = rnnjac.spectra(m, x, warmup=4, tangent_warmup=6, reortho_every=2, local_lyapunov=True, k=3)
    loc = ds.local_lyapunov.values
    assert np.isnan(loc[:, :10]).all()
    counted = ~np.isnan(loc[0, :, 0])
    assert counted.sum() == 10  # a QR every 2 counted steps over 20 steps
    # exponents are the average of the local values over the counted steps (each covers 2 steps)
    np.testing.assert_allclose(np.nansum(loc, axis=1) * 2 / 20, ds.lyapunov_exponents.values, atol=1e-12)


def test_state_h_for_lstm():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs()
    ds = rnnjac.spectra(m, x, state="h", keep_states=True)
    assert ds.sizes["sv_index"] == 10 and ds.sizes["unit"] == 10
    assert set(ds.part.values) == {"h"}
    assert "c is held fixed" in ds.attrs["state_note"]


# ----------------------------------------------------------------------------- schema and files
def _producers():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs()
    return {
        "spectra": lambda: rnnjac.spectra(
            m, x, eigenvalues=True, end_to_end=True, keep_states=True, local_lyapunov=True
        ),
        "lyapunov_spectrum": lambda: rnnjac.lyapunov_spectrum(m, x, k=3),
        "verify": lambda: rnnjac.verify(m, x),
    }


@pytest.mark.parametrize("producer", sorted(_producers()))
def test_schema_of_every_producer(producer):
    ds = _producers()[producer]()
    validate(ds)
    for name, var in ds.data_vars.items():
        assert var.attrs["units"], name
    assert ds.time.attrs["units"] == "step" if "time" in ds.coords else True
    assert ds.attrs["rnnjac_version"] == rnnjac.__version__


def test_validate_rejects_bad_datasets():
    ds = _producers()["lyapunov_spectrum"]()
    bad = ds.copy()
    bad["lyapunov_exponents"].attrs.pop("units")
    bad.attrs["flag"] = [1, 2]
    with pytest.raises(ValueError, match="lacks attribute 'units'.*attribute 'flag' is list"):
        validate(bad)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_save_round_trips_exactly(tmp_path, suffix):
    ds = _producers()["spectra"]()
    path = rnnjac.save(ds, tmp_path / f"s{suffix}")
    back = rnnjac.open_dataset(path)
    xr.testing.assert_identical(back, ds)
    assert back.attrs == ds.attrs
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        rnnjac.save(ds, path)
    rnnjac.save(ds.isel(batch=[0]), path, overwrite=True)
    assert rnnjac.open_dataset(path).sizes["batch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"s{suffix}"]  # no temporary left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    ds = _producers()["lyapunov_spectrum"]()

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", boom)
    with pytest.raises(KeyboardInterrupt):
        rnnjac.save(ds, tmp_path / "s.nc")
    assert list(tmp_path.iterdir()) == []


def test_save_errors(tmp_path):
    ds = _producers()["lyapunov_spectrum"]()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rnnjac.save(ds, tmp_path / "missing" / "s.nc")
    with pytest.raises(FileNotFoundError):
        rnnjac.open_dataset(tmp_path / "nothing.nc")


# ----------------------------------------------------------------------------- bad input
def test_bad_options():
    p = Problem("gru")
    m, x = p.module(), p.inputs(steps=10)
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= D = 5.*got 6"):
        rnnjac.spectra(m, x, k=6)
    with pytest.raises(ValueError, match="k must be an integer"):
        rnnjac.lyapunov_spectrum(m, x, k=0)
    with pytest.raises(ValueError, match="warmup must be smaller than the number of steps T = 10"):
        rnnjac.spectra(m, x, warmup=10)
    with pytest.raises(ValueError, match="at least one counted step"):
        rnnjac.spectra(m, x, warmup=5, tangent_warmup=5)
    with pytest.raises(ValueError, match="reortho_every must be an integer >= 1"):
        rnnjac.spectra(m, x, reortho_every=0)
    with pytest.raises(ValueError, match="nothing to compute"):
        rnnjac.spectra(m, x, singular_values=False, lyapunov=False)


def test_nonfinite_jacobian_reports_step():
    def step(s, x):
        return torch.tanh(s) + x

    def jac(s, x):
        j = torch.diag_embed(1 - torch.tanh(s) ** 2)
        if j.shape[0] == 2 * 8:  # the linearisation of a chunk: poison step t=6 of sample 1
            j = j.reshape(2, 8, 3, 3).clone()
            j[1, 5, 0, 0] = float("nan")
            j = j.reshape(16, 3, 3)
        return j

    x = torch.zeros(2, 8, 3, dtype=F64)
    with pytest.raises(rnnjac.NonFiniteError, match="t=6"):
        rnnjac.spectra(rnnjac.CustomCell(step, jac), x, torch.ones(2, 3, dtype=F64))
    with pytest.raises(rnnjac.NonFiniteError, match="t=6"):
        rnnjac.lyapunov_spectrum(rnnjac.CustomCell(step, jac), x, torch.ones(2, 3, dtype=F64))
