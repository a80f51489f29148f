"""Sweeps: same numbers as single analyses (sync and a 2-worker LocalCluster), resumable after a kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import rnnjac
from rnnjac._pipeline import InputSpec, SpectraOptions, analyze_checkpoint

INPUTS = InputSpec(batch=2, steps=25, seed=3)
OPTIONS = SpectraOptions(k=3, warmup=2, eigenvalues=True, dtype="float64", seed=3)  # the CLI uses --seed for both


@pytest.fixture
def checkpoints(tmp_path):
    paths = []
    for step in (300, 100, 200, 400):
        torch.manual_seed(step)
        path = tmp_path / f"run_step{step}.pt"
        torch.save({"state_dict": nn.GRU(2, 5, num_layers=2).state_dict()}, path)
        paths.append(path)
    return paths


def _check_against_single(ds, paths):
    assert list(ds.training_step.values) == [100, 200, 300, 400]
    for p in paths:
        alone = analyze_checkpoint(p, INPUTS, OPTIONS)
        row = ds.sel(checkpoint=str(p))
        for name in ("lyapunov_exponents", "singular_values", "eigenvalues_real"):
            np.testing.assert_allclose(row[name].values, alone[name].values, rtol=1e-12, atol=1e-14)
        assert row.checkpoint_sha256.item() == rnnjac._checkpoints.sha256(p)


def test_sync_sweep_equals_single_analyses(tmp_path, checkpoints):
    out = tmp_path / "sweep.nc"
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    _check_against_single(ds, checkpoints)
    back = rnnjac.open_dataset(out)
    _check_against_single(back, checkpoints)
    rnnjac._datasets.validate(back)
    assert not (tmp_path / "sweep.nc.parts").exists()


@pytest.mark.slow
def test_local_cluster_two_workers(tmp_path, checkpoints):
    out = tmp_path / "sweep.zarr"
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out, workers=2)
    _check_against_single(ds, checkpoints)
    back = rnnjac.open_dataset(out)
    _check_against_single(back, checkpoints)


@pytest.mark.slow
def test_workers_warnings_reach_the_caller_and_no_scratch_is_left(tmp_path, checkpoints, monkeypatch):
    """A worker's warnings are raised again in the caller's process, naming the checkpoint (so the CLI shows them
    as one ``rnnjac: warning:`` line in its own terms, as without workers); dask's scratch space lives in a
    temporary folder that is removed afterwards (it was left in the system's temporary folder)."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    short = InputSpec(batch=2, steps=12, seed=3)  # too short for the exponents to converge: a ConvergenceWarning
    options = SpectraOptions(k=3, dtype="float64", seed=3)
    with pytest.warns(rnnjac.ConvergenceWarning) as caught:
        rnnjac.analyze_checkpoints(checkpoints[:2], inputs=short, options=options, out=tmp_path / "s.nc", workers=2)
    names = sorted({str(w.message).split(":")[0] for w in caught if issubclass(w.category, rnnjac.ConvergenceWarning)})
    assert names and set(names) <= {p.name for p in checkpoints[:2]}, names
    assert list(scratch.iterdir()) == []


def test_rerun_extends_without_recomputing(tmp_path, checkpoints, monkeypatch):
    out = tmp_path / "sweep.nc"
    rnnjac.analyze_checkpoints(checkpoints[:2], inputs=INPUTS, options=OPTIONS, out=out)
    calls = []
    import rnnjac._sweeps as sweeps

    real = sweeps.analyze_checkpoint
    monkeypatch.setattr(sweeps, "analyze_checkpoint", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    assert sorted(calls) == sorted(str(p) for p in checkpoints[2:])
    _check_against_single(ds, checkpoints)
    with pytest.raises(FileExistsError, match="another configuration"):
        rnnjac.analyze_checkpoints(checkpoints, inputs=InputSpec(batch=3), options=OPTIONS, out=out)


def test_killed_sweep_resumes(tmp_path, checkpoints):
    out = tmp_path / "sweep.nc"
    cmd = [
        "rnnjac",
        "analyze",
        *map(str, checkpoints),
        "--out",
        str(out),
        "--batch",
        "2",
        "--steps",
        "25",
        "--seed",
        "3",
        "--k",
        "3",
        "--warmup",
        "2",
        "--eigenvalues",
        "--dtype",
        "float64",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "sweep.nc.parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("*.nc"))) < 2:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup at all
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.nc")}
    assert 1 <= len(finished) < 4 and not out.exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ds = rnnjac.open_dataset(out)
    _check_against_single(ds, checkpoints)
    assert not parts.exists()


def test_sweep_errors(tmp_path, checkpoints):
    torch.save(nn.LSTM(2, 5).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="one architecture and size"):
        rnnjac.analyze_checkpoints([*checkpoints, tmp_path / "other.pt"], inputs=INPUTS, options=OPTIONS)
    with pytest.raises(FileNotFoundError):
        rnnjac.analyze_checkpoints([tmp_path / "nope.pt"])
    from rnnjac.cli import main

    assert main(["analyze", str(tmp_path / "run_*.pt"), "--out", str(tmp_path / "missing" / "s.nc"), "--quiet"]) == 2


# ----------------------------------------------------------------------------- resuming, rerunning, interrupting
INPUTS_B = InputSpec(batch=2, steps=20, seed=4)
OPTIONS_B = SpectraOptions(k=2, warmup=4, dtype="float64", seed=5)


def _reference(path, inputs: InputSpec, options: SpectraOptions) -> np.ndarray:
    """Lyapunov exponents of one checkpoint from rnnjac.lyapunov_spectrum, inputs built here."""
    gru = nn.GRU(2, 5, num_layers=2)
    gru.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    g = torch.Generator().manual_seed(inputs.seed)
    x = torch.randn(inputs.batch, inputs.steps, 2, generator=g, dtype=torch.float64) * inputs.input_std
    ds = rnnjac.lyapunov_spectrum(
        gru,
        x,
        k=options.k,
        warmup=options.warmup,
        batch_first=True,
        generator=torch.Generator().manual_seed(options.seed),
        dtype=torch.float64,
    )
    return ds.lyapunov_exponents.values


def _check_rows(ds, paths, inputs, options):
    assert sorted(ds.checkpoint.values) == sorted(str(p) for p in paths)
    assert ds.sizes["le_index"] == options.k and ds.sizes["batch"] == inputs.batch
    for p in paths:
        np.testing.assert_allclose(
            ds.lyapunov_exponents.sel(checkpoint=str(p)).values, _reference(p, inputs, options), rtol=1e-12, atol=1e-14
        )


@pytest.fixture
def counted(monkeypatch):
    """The checkpoints analysed (in order); ``stop_after`` turns the next call into a Ctrl-C."""
    import rnnjac._sweeps as sweeps

    calls: list[str] = []
    real = sweeps.analyze_checkpoint
    limit = {"n": None}

    def analyze(p, *args, **kwargs):
        if limit["n"] is not None and len(calls) >= limit["n"]:
            raise KeyboardInterrupt
        calls.append(str(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(sweeps, "analyze_checkpoint", analyze)
    return calls, limit


def _stamp(path):
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in _files(path)}


def _files(path):
    if os.path.isfile(path):
        return [str(path)]
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def test_resume_with_other_options_never_mixes_rows(tmp_path, checkpoints, counted):
    calls, limit = counted
    out = tmp_path / "sweep.nc"
    parts = tmp_path / "sweep.nc.parts"
    limit["n"] = 2
    with pytest.raises(rnnjac._io.Interrupted) as info:
        rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    assert str(info.value) == (
        f"interrupted: 2 of 4 checkpoints are finished and kept in {parts}/; {out} was not written; "
        "rerun the same command to resume"
    )
    assert len(list(parts.glob("*.nc"))) == 2 and not out.exists()
    limit["n"] = None
    calls.clear()
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS_B, options=OPTIONS_B, out=out)
    assert sorted(calls) == sorted(map(str, checkpoints))  # the parts of the first options were not used
    _check_rows(ds, checkpoints, INPUTS_B, OPTIONS_B)
    _check_rows(rnnjac.open_dataset(out), checkpoints, INPUTS_B, OPTIONS_B)
    assert len(list(parts.glob("*.nc"))) == 2  # kept for a rerun of their own configuration
    with pytest.raises(FileExistsError, match="another configuration"):
        rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    calls.clear()
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out, overwrite=True)
    assert len(calls) == 2  # resumed from its own two parts
    _check_rows(ds, checkpoints, INPUTS, OPTIONS)
    assert not parts.exists()


def test_identical_files_are_two_rows_with_their_paths(tmp_path, checkpoints):
    twin = tmp_path / "twin.pt"
    shutil.copy(checkpoints[0], twin)
    paths = [checkpoints[0], twin, checkpoints[1]]
    ds = rnnjac.analyze_checkpoints(paths, inputs=INPUTS, options=OPTIONS, out=tmp_path / "s.nc")
    assert sorted(ds.checkpoint.values) == sorted(map(str, paths))
    _check_rows(ds, paths, INPUTS, OPTIONS)
    a, b = ds.sel(checkpoint=str(checkpoints[0])), ds.sel(checkpoint=str(twin))
    assert a.checkpoint_sha256.item() == b.checkpoint_sha256.item()
    assert a.training_step.item() == 300 and b.training_step.item() == -1  # each from its own file name


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_rerun_with_nothing_to_compute_writes_nothing(tmp_path, checkpoints, counted, monkeypatch, suffix):
    calls, _ = counted
    out = tmp_path / f"sweep{suffix}"
    first = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    before, listing = _stamp(out), sorted(os.listdir(tmp_path))
    calls.clear()
    monkeypatch.setattr(rnnjac._io, "_write_checked", lambda *a, **k: pytest.fail("wrote"))
    again = rnnjac.analyze_checkpoints(list(reversed(checkpoints)), inputs=INPUTS, options=OPTIONS, out=out)
    assert calls == [] and _stamp(out) == before and sorted(os.listdir(tmp_path)) == listing
    xr.testing.assert_identical(again.drop_attrs(), first.drop_attrs())


def test_rerun_with_another_list(tmp_path, checkpoints, counted):
    calls, _ = counted
    out = tmp_path / "sweep.nc"
    rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    before = _stamp(out)
    with pytest.raises(FileExistsError, match=r"holds 1 checkpoint\(s\) that are not in this list.*run_step400.pt"):
        rnnjac.analyze_checkpoints(checkpoints[:3], inputs=INPUTS, options=OPTIONS, out=out)
    assert _stamp(out) == before
    calls.clear()
    ds = rnnjac.analyze_checkpoints(checkpoints[:3], inputs=INPUTS, options=OPTIONS, out=out, overwrite=True)
    assert calls == [] and list(rnnjac.open_dataset(out).training_step.values) == [100, 200, 300]
    _check_rows(ds, checkpoints[:3], INPUTS, OPTIONS)
    torch.manual_seed(7)  # the file run_step300.pt changes
    torch.save({"state_dict": nn.GRU(2, 5, num_layers=2).state_dict()}, checkpoints[0])
    with pytest.raises(FileExistsError, match="whose file changed"):
        rnnjac.analyze_checkpoints(checkpoints[:3], inputs=INPUTS, options=OPTIONS, out=out)
    ds = rnnjac.analyze_checkpoints(checkpoints[:3], inputs=INPUTS, options=OPTIONS, out=out, overwrite=True)
    assert calls == [str(checkpoints[0])]
    _check_rows(ds, checkpoints[:3], INPUTS, OPTIONS)


def test_interrupted_before_any_part_is_a_plain_interrupt(tmp_path, checkpoints, counted):
    _, limit = counted
    limit["n"] = 0
    with pytest.raises(KeyboardInterrupt) as info:
        rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=tmp_path / "s.nc")
    assert type(info.value) is KeyboardInterrupt  # plain: nothing was written
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in checkpoints)


def test_extending_a_zarr_sweep_interrupted_in_the_final_write(tmp_path, checkpoints, counted, monkeypatch):
    calls, _ = counted
    out = tmp_path / "sweep.zarr"
    rnnjac.analyze_checkpoints(checkpoints[:2], inputs=INPUTS, options=OPTIONS, out=out)
    before = _stamp(out)
    real = xr.Dataset.to_zarr

    def interrupted(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the new store is being written
        return real(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_zarr", interrupted)
    with pytest.raises(rnnjac._io.Interrupted) as info:
        rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    assert str(info.value) == (
        f"interrupted: 4 of 4 checkpoints are finished and kept (2 in {out}, 2 in {out}.parts/); {out} is unchanged; "
        "rerun the same command to resume"
    )
    assert _stamp(out) == before and not [n for n in os.listdir(tmp_path) if ".rnnjac-" in n]
    assert rnnjac.open_dataset(out).sizes["checkpoint"] == 2
    monkeypatch.setattr(xr.Dataset, "to_zarr", real)
    calls.clear()
    ds = rnnjac.analyze_checkpoints(checkpoints, inputs=INPUTS, options=OPTIONS, out=out)
    assert calls == [] and not (tmp_path / "sweep.zarr.parts").exists()
    _check_rows(rnnjac.open_dataset(out), checkpoints, INPUTS, OPTIONS)
    _check_rows(ds, checkpoints, INPUTS, OPTIONS)


def _nan_checkpoint(tmp_path):
    sd = nn.GRU(2, 5, num_layers=2).state_dict()
    sd["weight_hh_l1"][0, 0] = float("nan")
    path = tmp_path / "bad_step250.pt"
    torch.save({"state_dict": sd}, path)
    return path


def test_failing_checkpoint_is_named(tmp_path, checkpoints):
    bad = _nan_checkpoint(tmp_path)
    with pytest.raises(rnnjac.NonFiniteError) as info:
        rnnjac.analyze_checkpoints([*checkpoints, bad], inputs=INPUTS, options=OPTIONS, out=tmp_path / "s.nc")
    assert str(info.value).startswith(f"checkpoint {bad}: ") and "weight_hh_l1" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_failing_checkpoint_on_workers_is_named_without_logs(tmp_path, checkpoints, capfd):
    bad = _nan_checkpoint(tmp_path)
    with pytest.raises(rnnjac.NonFiniteError) as info:
        rnnjac.analyze_checkpoints([checkpoints[0], bad], inputs=INPUTS, options=OPTIONS, workers=1)
    assert str(info.value).startswith(f"checkpoint {bad}: ") and "\n" not in str(info.value)
    err = capfd.readouterr().err
    assert "distributed" not in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- one API for one job
def test_a_tensor_and_keywords_as_for_spectra(tmp_path, checkpoints):
    """``analyze_checkpoints(paths, x, k=3)`` is ``lyapunov_spectrum(load_checkpoint(p), x, k=3)`` per checkpoint,
    with the tangent basis seeded as documented (a fresh generator seeded with ``seed``, default 0)."""
    x = torch.randn(3, 40, 2, generator=torch.Generator().manual_seed(9))
    ds = rnnjac.analyze_checkpoints(checkpoints, x, k=3)
    for p in checkpoints:
        ref = rnnjac.lyapunov_spectrum(rnnjac.load_checkpoint(p), x, k=3, generator=torch.Generator().manual_seed(0))
        np.testing.assert_array_equal(
            ds.lyapunov_exponents.sel(checkpoint=str(p)).values, ref.lyapunov_exponents.values
        )
    # an array, a file path and generator= give the same rows; keywords are validated as by spectra, before any work
    np.save(tmp_path / "x.npy", x.numpy())
    by_file = rnnjac.analyze_checkpoints(checkpoints[:1], str(tmp_path / "x.npy"), k=3, warmup=0)
    by_array = rnnjac.analyze_checkpoints(checkpoints[:1], x.numpy(), k=3, generator=torch.Generator().manual_seed(0))
    p = str(checkpoints[0])
    for other in (by_file, by_array):
        np.testing.assert_array_equal(
            other.lyapunov_exponents.sel(checkpoint=p), ds.lyapunov_exponents.sel(checkpoint=p)
        )
    with pytest.raises(ValueError, match="reortho_every must be an integer >= 1; got 0"):
        rnnjac.analyze_checkpoints([tmp_path / "never-read.pt"], x, reortho_every=0)
    with pytest.raises(TypeError, match="unexpected keyword argument.*batch_size"):
        rnnjac.analyze_checkpoints(checkpoints, x, batch_size=3)
    with pytest.raises(TypeError, match="either as options= or as keywords"):
        rnnjac.analyze_checkpoints(checkpoints, x, options=SpectraOptions(), k=3)
    with pytest.raises(ValueError, match="inputs have 4 features.*input_size is 2"):
        rnnjac.analyze_checkpoints(checkpoints, torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="3-D"):
        rnnjac.analyze_checkpoints(checkpoints, torch.randn(5, 2))


def test_the_configuration_key_hashes_the_tensor_bytes(tmp_path, checkpoints):
    import rnnjac._sweeps as sweeps

    x = torch.randn(2, 10, 2)
    y = x.clone()
    y[1, 9, 1] += 1e-6
    opts = SpectraOptions(k=2)
    assert sweeps._config_key(x, opts, {}) == sweeps._config_key(x.clone(), opts, {})
    assert sweeps._config_key(x, opts, {}) != sweeps._config_key(y, opts, {})
    assert sweeps._config_key(x, opts, {}) != sweeps._config_key(x, opts, {}, h0=torch.zeros(2, 10))
    # a rerun on other tensor inputs is another configuration: refused, never mixed
    out = tmp_path / "t.nc"
    rnnjac.analyze_checkpoints(checkpoints[:2], x, k=2, out=out)
    with pytest.raises(FileExistsError, match="another configuration"):
        rnnjac.analyze_checkpoints(checkpoints[:2], y, k=2, out=out)
    assert "tensor of shape (2, 10, 2)" in rnnjac.open_dataset(out).attrs["inputs"]
