"""One frozen options object (rnnjac._options.SpectraOptions): validated once, passed whole, stored whole."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from problems import Problem
from torch import nn

import rnnjac
from rnnjac import _options, cli
from rnnjac import _pipeline as pipeline
from rnnjac import _sweeps as sweeps
from rnnjac._checks import prepare
from rnnjac._pipeline import InputSpec, SpectraOptions

F64 = torch.float64


def test_pipeline_reexports_the_one_options_class():
    assert pipeline.SpectraOptions is _options.SpectraOptions


def test_defaults_json_round_trip_and_frozen():
    opts = SpectraOptions()
    assert (opts.singular_values, opts.lyapunov, opts.eigenvalues, opts.k, opts.seed) == (True, True, False, None, 0)
    full = SpectraOptions(
        eigenvalues=True, k=np.int64(3), warmup=4, local_lyapunov=True, dtype=F64, device=torch.device("cpu")
    )
    assert full.dtype == "float64" and full.device == "cpu" and type(full.k) is int
    assert full.torch_dtype is F64
    assert SpectraOptions.from_json(full.to_json()) == full
    assert json.loads(full.to_json()) == dataclasses.asdict(full)  # every field, plain JSON
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.k = 5
    with pytest.raises(ValueError, match=r"unknown keys \['kk'\]"):
        SpectraOptions.from_json('{"kk": 3}')
    with pytest.raises(ValueError, match="reortho_every must be an integer >= 1; got 0"):
        SpectraOptions.from_json('{"reortho_every": 0}')  # validated again


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"eigenvalues": 1}, TypeError, "eigenvalues must be True or False; got 1"),
        ({"local_lyapunov": "yes"}, TypeError, "local_lyapunov must be True or False"),
        ({"singular_values": False, "lyapunov": False}, ValueError, "nothing to compute"),
        ({"local_lyapunov": True, "lyapunov": False}, ValueError, "local_lyapunov=True needs lyapunov=True"),
        ({"k": 0}, ValueError, "k must be an integer >= 1; got 0"),
        ({"k": 2.0}, ValueError, "k must be an integer"),
        ({"warmup": -1}, ValueError, "warmup must be an integer >= 0; got -1"),
        ({"tangent_warmup": True}, ValueError, "tangent_warmup must be an integer >= 0; got True"),
        ({"reortho_every": 0}, ValueError, "reortho_every must be an integer >= 1; got 0"),
        ({"time_chunk": 0}, ValueError, "time_chunk must be an integer >= 1; got 0"),
        ({"state": "c"}, ValueError, "state must be one of 'full', 'h'; got 'c'"),
        ({"method": "jvp"}, ValueError, "method must be one of 'auto', 'analytic', 'autograd'"),
        ({"seed": 1.5}, ValueError, "seed must be an integer or None; got 1.5"),
        ({"dtype": torch.int32}, ValueError, "dtype must be a floating-point torch dtype"),
        ({"dtype": "float128"}, ValueError, "dtype must be a floating-point torch dtype"),
        ({"device": "gpu"}, ValueError, "device must be a torch.device or a name"),
    ],
)
def test_every_field_is_checked_when_built(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        SpectraOptions(**kwargs)


def test_checks_that_need_the_problem():
    problem = prepare(Problem("gru").module(), Problem("gru").inputs(steps=10))
    SpectraOptions(k=5, warmup=9).check(problem)
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= D = 5 \(state='full'\); got 6"):
        SpectraOptions(k=6).check(problem)
    with pytest.raises(ValueError, match="at least one counted step"):
        SpectraOptions(warmup=5, tangent_warmup=5).check(problem)
    SpectraOptions(warmup=5, tangent_warmup=5, lyapunov=False).check(problem)  # no counted step needed


# ----------------------------------------------------------------------------- spectra(options=...)
def _same(a, b):
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_options_and_keywords_give_the_same_dataset():
    m, x = Problem("lstm", layers=2).module(), Problem("lstm", layers=2).inputs(steps=30)
    kw = dict(k=3, warmup=4, tangent_warmup=2, reortho_every=2, eigenvalues=True, local_lyapunov=True, time_chunk=7)
    by_keywords = rnnjac.spectra(m, x, generator=torch.Generator().manual_seed(5), **kw)
    opts = SpectraOptions(seed=5, **kw)
    by_options = rnnjac.spectra(m, x, options=opts)
    _same(by_keywords, by_options)
    assert SpectraOptions.from_json(by_options.attrs["options_json"]) == opts
    assert by_options.attrs["seed"] == 5 and by_options.attrs["config_json"] == by_keywords.attrs["config_json"]
    # the keyword call records its generator's seed in the same object
    assert SpectraOptions.from_json(by_keywords.attrs["options_json"]) == opts


def test_keyword_call_without_generator_records_seed_none():
    ds = rnnjac.lyapunov_spectrum(Problem("gru").module(), Problem("gru").inputs(steps=8), k=2)
    stored = SpectraOptions.from_json(ds.attrs["options_json"])
    assert stored.seed is None and stored.singular_values is False and stored.k == 2
    assert ds.attrs["seed"] == -1


def test_options_with_keywords_is_an_error_and_a_generator_replaces_the_seed():
    m, x = Problem("gru").module(), Problem("gru").inputs(steps=12)
    with pytest.raises(TypeError, match=r"either as options= or as keywords, not both; got options= and k=2"):
        rnnjac.spectra(m, x, options=SpectraOptions(), k=2)
    with pytest.raises(TypeError, match="options must be a SpectraOptions"):
        rnnjac.spectra(m, x, options={"k": 2})
    ds = rnnjac.spectra(m, x, options=SpectraOptions(seed=1), generator=torch.Generator().manual_seed(9))
    _same(ds, rnnjac.spectra(m, x, options=SpectraOptions(seed=9)))
    assert SpectraOptions.from_json(ds.attrs["options_json"]).seed == 9


def test_lyapunov_spectrum_with_options_computes_the_exponents_alone():
    m, x = Problem("gru").module(), Problem("gru").inputs(steps=20)
    opts = SpectraOptions(k=2, warmup=3, eigenvalues=True, end_to_end=True, seed=2)
    ds = rnnjac.lyapunov_spectrum(m, x, options=opts)
    per_sample = {"lyapunov_exponents", "kaplan_yorke_dimension", "ks_entropy"}
    assert all("time" not in ds[v].dims for v in ds.data_vars)  # no per-step variables
    assert per_sample <= set(ds.data_vars) and "lyapunov_exponents_bounds" in ds  # uncertainty on by default
    assert set(rnnjac.lyapunov_spectrum(m, x, options=dataclasses.replace(opts, ci=None)).data_vars) == per_sample
    ref = rnnjac.lyapunov_spectrum(m, x, k=2, warmup=3, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(ds.lyapunov_exponents.values, ref.lyapunov_exponents.values)


def test_dtype_by_name_converts_a_copy():
    m = Problem("gru", dtype=torch.float32).module()
    x = Problem("gru", dtype=torch.float32).inputs(steps=10)
    ds = rnnjac.spectra(m, x, options=SpectraOptions(dtype="float64", k=2))
    ref = rnnjac.spectra(m, x, dtype=F64, k=2, generator=torch.Generator().manual_seed(0))
    _same(ds, ref)
    assert ds.attrs["dtype"] == "float64" and next(m.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- pipeline, sweeps, command line
@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "gru.pt"
    torch.save(nn.GRU(2, 4).state_dict(), path)
    return path


def test_pipeline_passes_the_options_whole(ckpt):
    opts = SpectraOptions(k=2, warmup=3, eigenvalues=True, dtype="float64", seed=4)
    ds = pipeline.analyze_checkpoint(ckpt, InputSpec(batch=2, steps=12), opts)
    assert ds.attrs["options_json"] == opts.to_json()
    module = rnnjac.load_checkpoint(ckpt).double()
    x = pipeline.make_inputs(InputSpec(batch=2, steps=12), 2, F64)
    _same(ds, rnnjac.spectra(module, x, options=opts))
    with pytest.raises(TypeError, match="options must be a SpectraOptions"):
        pipeline.analyze_checkpoint(ckpt, InputSpec(), {"k": 2})


def test_sweep_configuration_key_is_the_options_json():
    opts = SpectraOptions(k=2, warmup=1)
    key = json.loads(sweeps._config_key(InputSpec(), opts, {}))
    assert key["options"] == json.loads(opts.to_json())
    assert sweeps._config_key(InputSpec(), opts, {}) != sweeps._config_key(InputSpec(), SpectraOptions(k=3), {})


def test_cli_builds_one_options_object_and_passes_it_down(tmp_path, ckpt, monkeypatch):
    seen = []

    def fake(path, inputs, options, **kwargs):
        seen.append(options)
        raise KeyboardInterrupt  # stop before any work or output

    monkeypatch.setattr(pipeline, "analyze_checkpoint", fake)
    argv = ["analyze", str(ckpt), "-o", str(tmp_path / "s.nc"), "-k", "3", "--warmup", "2", "--reortho-every", "4"]
    argv += ["--eigenvalues", "--no-singular-values", "--dtype", "float64", "--seed", "7", "-q"]
    assert cli.main(argv) == 130
    (opts,) = seen
    assert opts == SpectraOptions(
        k=3, warmup=2, reortho_every=4, eigenvalues=True, singular_values=False, dtype="float64", seed=7, device="cpu"
    )


def test_cli_refuses_a_bad_option_before_any_work_naming_the_flag(tmp_path, capsys):
    missing = tmp_path / "not-read.pt"
    assert cli.main(["analyze", str(missing), "-o", str(tmp_path / "s.nc"), "--reortho-every", "0"]) == 2
    err = capsys.readouterr().err
    assert "--reortho-every must be an integer >= 1; got 0" in err and "reortho_every" not in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- "auto" and top-k singular values
def test_auto_transients_reortho_and_top_k_singular_values_are_options():
    opts = SpectraOptions(warmup="auto", tangent_warmup="auto", reortho_every="auto", singular_values=np.int64(3))
    assert (opts.warmup, opts.tangent_warmup, opts.reortho_every) == ("auto", "auto", "auto")
    assert opts.singular_values == 3 and type(opts.singular_values) is int
    assert SpectraOptions.from_json(opts.to_json()) == opts
    assert json.loads(opts.to_json())["reortho_every"] == "auto"
    assert SpectraOptions(singular_values=False, lyapunov=True).singular_values is False


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"reortho_every": "Auto"}, ValueError, "reortho_every must be an integer >= 1 or 'auto'; got 'Auto'"),
        ({"warmup": "long"}, ValueError, "warmup must be an integer >= 0 or 'auto'; got 'long'"),
        ({"tangent_warmup": ""}, ValueError, "tangent_warmup must be an integer >= 0 or 'auto'; got ''"),
        ({"reortho_every": 2.5}, ValueError, "reortho_every must be an integer >= 1; got 2.5"),
        (
            {"singular_values": 0},
            ValueError,
            r"singular_values must be True, False or an integer k >= 1 \(the top k\); got 0",
        ),
        ({"singular_values": 2.0}, TypeError, "singular_values must be True, False or an integer k >= 1"),
        ({"singular_values": "all"}, TypeError, "singular_values must be True, False or an integer k >= 1"),
    ],
)
def test_auto_and_top_k_are_checked_when_built(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        SpectraOptions(**kwargs)
    with pytest.raises(exc, match=message):
        SpectraOptions.from_json(json.dumps({k: v for k, v in kwargs.items()}))


def test_auto_and_top_k_checks_that_need_the_problem():
    problem = prepare(Problem("gru").module(), Problem("gru").inputs(steps=10))
    SpectraOptions(warmup="auto", tangent_warmup=9, reortho_every="auto", singular_values=5).check(problem)
    with pytest.raises(ValueError, match=r"integer k with 1 <= k <= D = 5 \(state='full'\); got 6"):
        SpectraOptions(singular_values=6).check(problem)
    with pytest.raises(ValueError, match="at least one counted step: T = 10, got warmup='auto', tangent_warmup=10"):
        SpectraOptions(warmup="auto", tangent_warmup=10).check(problem)


def test_the_penalty_keeps_integer_schedules():
    from rnnjac._checks import check_lyapunov_options

    problem = prepare(Problem("gru").module(), Problem("gru").inputs(steps=10))
    with pytest.raises(ValueError, match="reortho_every must be an integer >= 1; got 'auto'"):
        check_lyapunov_options(problem, 2, 0, 0, "auto")
    check_lyapunov_options(problem, 2, "auto", "auto", "auto", auto=True)


def test_spectra_merges_the_attrs_of_the_pass(monkeypatch):
    """``spectra_tensors`` may return ``"attrs"``: they become Dataset attributes (over the options' own)."""
    real = rnnjac._spectra.spectra_tensors

    def with_attrs(*args, **kwargs):
        out = real(*args, **kwargs)
        out["attrs"] = {"tangent_warmup": 7, "extra_number": 1.5, "extra_text": "x"}
        return out

    monkeypatch.setattr(rnnjac._spectra, "spectra_tensors", with_attrs)
    m, x = Problem("gru").module(), Problem("gru").inputs(steps=12)
    ds = rnnjac.lyapunov_spectrum(m, x, k=2, ci=None)
    assert (ds.attrs["tangent_warmup"], ds.attrs["extra_number"], ds.attrs["extra_text"]) == (7, 1.5, "x")
    assert "attrs" not in ds.data_vars


def test_spectra_accepts_auto_and_records_it():
    m, x = Problem("gru", hidden=6).module(), Problem("gru", hidden=6).inputs(batch=2, steps=80)
    ds = rnnjac.spectra(m, x, k=3, reortho_every="auto", tangent_warmup="auto", singular_values=False, ci=None)
    assert ds.attrs["reortho_every"] == "auto" and ds.attrs["tangent_warmup"] == "auto"
    assert 0 <= ds.attrs["tangent_warmup_used"] < 40 and ds.attrs["lyapunov_qr_count"] >= 2
    assert SpectraOptions.from_json(ds.attrs["options_json"]).reortho_every == "auto"
